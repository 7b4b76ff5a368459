//! Issue #18: the API's connection slots under slow bodies and many streams
//! (item 6), and the small ones (item 9): client names, descriptions, report
//! labels and advice, repeated query parameters, `/health` on a full disk.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "hardening-api-round2-secret";

/// `/health` within `limit` (connect, request and answer), or why not.
fn health_within(addr: SocketAddr, limit: Duration) -> Result<Value, String> {
    let started = Instant::now();
    let answer = ureq::get(&format!("http://{addr}/health")).timeout(limit).call().map_err(|e| format!("{e}"))?;
    let body: Value = answer.into_json().map_err(|e| format!("{e}"))?;
    let took = started.elapsed();
    if took > limit {
        return Err(format!("answered after {took:?}"));
    }
    Ok(body)
}

/// Opens a connection and sends `head` (and nothing after it).
fn send_head(addr: SocketAddr, head: &str) -> TcpStream {
    let mut conn = TcpStream::connect(addr).expect("connect to the API");
    conn.write_all(head.as_bytes()).expect("send the request head");
    conn
}

/// The status of the answer on `conn` and its head and body as text, read
/// until the server closes or `limit` passes.
fn read_answer(conn: &mut TcpStream, limit: Duration) -> (u16, String) {
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    (text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

/// Seconds of CPU (user + system) the process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat has a command").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = String::from_utf8(std::process::Command::new("getconf").arg("CLK_TCK").output().unwrap().stdout).unwrap();
    ticks as f64 / per_second.trim().parse::<f64>().unwrap_or(100.0)
}

#[test]
fn health_answers_while_slow_bodies_hold_the_api() {
    let server = Daemon::server(SECRET, &[]);
    let host = server.http.to_string();
    // 140 POSTs that announce 16,000 bytes and then trickle them, one byte a
    // second: more than the API has connections.
    let head =
        format!("POST /api/mapping/create HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 16000\r\n\r\n{{");
    let started = Instant::now();
    let slow: Vec<TcpStream> = (0..140).map(|_| send_head(server.http, &head)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let mut conns: Vec<TcpStream> = slow.iter().map(|c| c.try_clone().unwrap()).collect();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for c in &mut conns {
                    let _ = c.write_all(b" ");
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    // The reserve: /health answers at once.
    let health = health_within(server.http, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("/health while 140 slow bodies are held: {e}\n{}", server.log()));
    assert_eq!(health["status"], "ok", "{health}");

    // Each slow request is answered: refused at once beyond the requests'
    // share (503), cut off at the body timeout (408) within it.
    let answers: Vec<(u16, String)> =
        slow.into_iter().map(|mut conn| read_answer(&mut conn, Duration::from_secs(20).saturating_sub(started.elapsed()))).collect();
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    let took = started.elapsed();
    let count = |status: u16| answers.iter().filter(|(s, _)| *s == status).count();
    assert_eq!(
        count(408) + count(503),
        140,
        "every slow request is answered within {took:?}: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert!(count(408) >= 1 && count(503) >= 1, "408: {}, 503: {}", count(408), count(503));
    assert!(took < Duration::from_secs(16), "the body timeout (10 s) held: {took:?}");
    let timed_out = answers.iter().find(|(s, _)| *s == 408).unwrap();
    assert!(timed_out.1.contains("did not arrive within 10 s"), "{}", timed_out.1);
    let refused = answers.iter().find(|(s, _)| *s == 503).unwrap();
    assert!(refused.1.to_ascii_lowercase().contains("retry-after: 1") && refused.1.contains("the API is busy"), "{}", refused.1);
    // And the API serves again.
    assert_eq!(mapping_count(&server), 0);
}

#[test]
fn health_answers_while_idle_connections_fill_the_api() {
    let server = Daemon::server(SECRET, &[]);
    // 130 connections that send half a request head and then nothing: more
    // than the API's connection budget (128).
    let started = Instant::now();
    let idle: Vec<TcpStream> = (0..130).map(|_| send_head(server.http, "GET /api/mapping/list HTTP/1.1\r\n")).collect();
    let health = health_within(server.http, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("/health while 130 idle connections are open: {e}\n{}", server.log()));
    assert_eq!(health["status"], "ok", "{health}");
    // Each idle connection is closed at the header timeout (10 s).
    for mut conn in idle {
        read_answer(&mut conn, Duration::from_secs(15).saturating_sub(started.elapsed()));
    }
    assert!(started.elapsed() < Duration::from_secs(15), "idle connections closed after {:?}", started.elapsed());
    assert_eq!(mapping_count(&server), 0);
}

/// Opens `/api/stats/stream` on a connection of its own and reads the answer's
/// status line.
fn open_stream(addr: SocketAddr, query: &str) -> (u16, BufReader<TcpStream>) {
    let conn = send_head(addr, &format!("GET /api/stats/stream{query} HTTP/1.1\r\nHost: {addr}\r\n\r\n"));
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(conn);
    let mut status = String::new();
    let _ = reader.read_line(&mut status);
    (status.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), reader)
}

#[test]
fn streams_are_capped_and_health_answers_beside_them() {
    let server = Daemon::server(SECRET, &[]);
    // More streams than the API has connections, opened together.
    let opened: Vec<(u16, BufReader<TcpStream>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200).map(|_| s.spawn(|| open_stream(server.http, "?interval_ms=1000"))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let open = opened.iter().filter(|(s, _)| *s == 200).count();
    let refused = opened.iter().filter(|(s, _)| *s == 503).count();
    assert_eq!(open + refused, 200, "every stream request is answered: {:?}", opened.iter().map(|o| o.0).collect::<Vec<_>>());
    assert!(open >= 1 && refused >= 1, "open {open}, refused {refused}");
    assert!(open <= 64, "streams are capped well below the connections: {open} open");

    // The refusal says why, and closes its connection.
    let (_, mut reader) = opened.into_iter().find(|(s, _)| *s == 503).unwrap();
    let mut rest = String::new();
    reader.get_mut().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    reader.read_to_string(&mut rest).expect("the refused stream's connection is closed");
    assert!(rest.contains("event streams are open") && rest.contains("/api/stats/traffic"), "{rest}");

    // With every stream slot taken, /health still answers at once, and so does the API.
    let health = health_within(server.http, Duration::from_secs(2)).unwrap_or_else(|e| panic!("/health beside {open} streams: {e}"));
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(mapping_count(&server), 0);
}

/// The `data:` lines a stream sends in `window`, each with when it came.
fn stream_events(addr: SocketAddr, query: &str, window: Duration) -> Vec<(Instant, String)> {
    let (status, mut reader) = open_stream(addr, query);
    assert_eq!(status, 200);
    let end = Instant::now() + window;
    let mut events = Vec::new();
    let mut line = String::new();
    while Instant::now() < end {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                if let Some(data) = line.strip_prefix("data: ") {
                    events.push((Instant::now(), data.trim_end().to_string()));
                }
            }
            Err(e) => panic!("reading the stream: {e}"),
        }
    }
    events
}

#[test]
fn streams_share_one_event_per_interval() {
    let server = Daemon::server(SECRET, &[]);
    // Enough mappings that a report is real work (about 50 KB of JSON).
    let echo = echo_server();
    for _ in 0..120 {
        map_some_port(&server, echo);
    }
    let pid = server.child.id();
    let streams = 24;
    let window = Duration::from_millis(4500);
    let cpu_before = cpu_seconds(pid);
    // Asks for 250 ms: the daemon's minimum, 1 s, applies.
    let received: Vec<Vec<(Instant, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..streams).map(|_| s.spawn(|| stream_events(server.http, "?interval_ms=250", window))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cpu = cpu_seconds(pid) - cpu_before;

    let timestamp = |data: &str| serde_json::from_str::<Value>(data).expect("event JSON")["timestamp"].as_f64().expect("a timestamp");
    // Builds: one per stream for its first event, then one per second for all.
    let builds: std::collections::BTreeSet<String> = received.iter().flatten().map(|(_, data)| timestamp(data).to_string()).collect();
    eprintln!("{streams} streams, {} builds, {cpu:.3} s CPU in {window:?}", builds.len());
    for events in &received {
        // First event at once, then one a second at most.
        assert!(events.len() >= 3 && events.len() <= 7, "{} events in {window:?}", events.len());
        for pair in events[1..].windows(2) {
            assert!(pair[1].0 - pair[0].0 >= Duration::from_millis(800), "events {:?} apart", pair[1].0 - pair[0].0);
        }
    }
    // Every stream's second-to-last event came from one build: the same bytes.
    let shared: Vec<&String> = received.iter().map(|events| &events[events.len() - 2].1).collect();
    let mut by_build: std::collections::BTreeMap<String, Vec<&String>> = Default::default();
    for data in &shared {
        by_build.entry(timestamp(data).to_string()).or_default().push(data);
    }
    let (_, largest) = by_build.iter().max_by_key(|(_, v)| v.len()).unwrap();
    assert!(
        largest.len() >= streams - 2,
        "streams received the same event: {:?}",
        by_build.iter().map(|(t, v)| (t, v.len())).collect::<Vec<_>>()
    );
    assert!(largest.iter().all(|d| *d == largest[0]), "one build, identical bytes");
    assert!(builds.len() <= streams + 8, "{} distinct reports built for {streams} streams in {window:?}", builds.len());
    assert!(cpu < 1.5, "the daemon used {cpu:.2} s of CPU in {window:?} for {streams} streams");
}

/// Creates a direct mapping to `target` on some free port, trying another
/// when the one picked was taken meanwhile (other tests bind ports too).
fn map_some_port(server: &Daemon, target: SocketAddr) -> u16 {
    for _ in 0..10 {
        let port = free_port();
        let body = json!({ "source_port": port, "target_host": "127.0.0.1", "target_port": target.port() });
        match post(server, "/api/mapping/create", body) {
            (200, _) => return port,
            (409, _) => continue,
            (status, answer) => panic!("create mapping: {status} {answer}"),
        }
    }
    panic!("no free port after 10 tries");
}

#[test]
fn client_names_must_begin_with_a_letter_or_digit() {
    let server = Daemon::server(SECRET, &[]);
    for name in ["-", "--force", "-v", "_x"] {
        let (status, answer) = post(&server, "/api/client/create", json!({ "name": name }));
        assert_eq!(status, 400, "{name}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains("must begin with a letter or digit"), "{name}: {answer}");
    }
    for name in ["9lives", "lab-"] {
        let (status, answer) = post(&server, "/api/client/create", json!({ "name": name }));
        assert_eq!(status, 200, "{name}: {answer}");
    }
}

#[test]
fn descriptions_refuse_bidi_controls_and_line_separators() {
    let server = Daemon::server(SECRET, &[]);
    let echo = echo_server();
    let port = free_port();
    create_mapping(&server, port, echo, false);
    for (text, what) in [
        ("ssh\u{202E}gpj.exe", "bidi control (U+202E)"),
        ("a\u{202A}b", "bidi control (U+202A)"),
        ("a\u{2066}b", "bidi control (U+2066)"),
        ("a\u{2069}b", "bidi control (U+2069)"),
        ("office\u{2028}FAKE: ok", "line separator (U+2028)"),
        ("a\u{2029}b", "line separator (U+2029)"),
    ] {
        let (status, answer) = post(&server, "/api/mapping/update", json!({ "port": port, "description": text }));
        assert_eq!(status, 400, "{text:?}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.starts_with("`description`") && message.contains(what), "{text:?}: {message}");
        let body = json!({ "source_port": free_port(), "target_host": "127.0.0.1", "target_port": echo.port(), "description": text });
        let (status, answer) = post(&server, "/api/mapping/create", body);
        assert_eq!(status, 400, "create with {text:?}: {answer}");
    }
    assert_eq!(mapping_count(&server), 1, "nothing was created");
    // Text in any script is still a description.
    let (status, answer) = post(&server, "/api/mapping/update", json!({ "port": port, "description": "é 東京 مرحبا" }));
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn report_advice_names_the_period_parameter() {
    let server = Daemon::server(SECRET, &[]);
    let (status, answer) = http("GET", &server.url("/api/stats/report?period=hour&from=0&to=100000000"), None);
    assert_eq!(status, 400, "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("use period=day") && !message.contains("step="), "{message}");
    // /history's parameter is `step`, and its advice says so.
    let (status, answer) = http("GET", &server.url("/api/stats/history?step=minute&from=0&to=100000000"), None);
    assert_eq!(status, 400, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("use step=hour"), "{answer}");
}

#[test]
fn hourly_report_rows_carry_the_hour() {
    let (_dir, config) = config_file("[history]\ninterval_secs = 1\nutc_offset = \"+05:30\"\n");
    let server = Daemon::server(SECRET, &["--config", &config]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    echo_through(port, 1000);
    wait_for_history_flush(&server, unix_now());
    let hourly = get_data(&server, "/api/stats/report?period=hour");
    let row = hourly["rows"].as_array().unwrap().iter().find(|r| r["port"] == port).unwrap_or_else(|| panic!("{hourly}")).clone();
    let label = row["period"].as_str().unwrap();
    let start = row["period_start"].as_i64().unwrap();
    let local = start + 5 * 3600 + 1800;
    let (hour, minute) = (local.rem_euclid(86_400) / 3600, local.rem_euclid(3600) / 60);
    let daily = get_data(&server, "/api/stats/report?period=day");
    let day = daily["rows"].as_array().unwrap().iter().find(|r| r["port"] == port).unwrap()["period"].as_str().unwrap().to_string();
    assert_eq!(label, format!("{day}T{hour:02}:{minute:02}"), "{row}");
    let csv = ureq::get(&server.url("/api/stats/report?period=hour&format=csv")).call().unwrap().into_string().unwrap();
    assert!(csv.contains(&format!("\r\n{label},{start},{port},")), "{csv}");
}

#[test]
fn a_repeated_query_parameter_is_refused() {
    let server = Daemon::server(SECRET, &[]);
    for (path, parameter) in [
        ("/api/stats/history?port=1&port=2", "port"),
        ("/api/stats/history?step=hour&from=0&step=day", "step"),
        ("/api/stats/report?period=day&period=hour", "period"),
        ("/api/events?limit=1&limit=2", "limit"),
        ("/api/stats/stream?interval_ms=1000&interval_ms=2000", "interval_ms"),
    ] {
        let (status, answer) = http("GET", &server.url(path), None);
        assert_eq!(status, 400, "{path}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("`{parameter}`")), "{path}: {message}");
    }
}

#[test]
fn health_degrades_while_history_cannot_be_written() {
    let (_dir, config) = config_file("[history]\ninterval_secs = 1\n");
    let Some(server) = Daemon::server_on_small_disk(2048, SECRET, &["--config", &config]) else { return };
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    echo_through(port, 1000);
    wait_for_history_flush(&server, unix_now());
    assert_eq!(get_data_health(&server)["status"], "ok");

    // Fill the state disk, then move bytes the recorder must write.
    let filler = server.state_file("filler");
    {
        let mut file = std::fs::File::create(&filler).expect("create the filler");
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
    }
    echo_through(port, 1000);
    let health = wait_for("/health to report the failing history", Duration::from_secs(15), || {
        let health = get_data_health(&server);
        (health["status"] == "degraded").then_some(health)
    });
    let reasons = health["reasons"].to_string();
    assert!(reasons.contains("traffic history is not being recorded") && reasons.contains("full"), "{health}");
    // Forwarding is unaffected.
    echo_through(port, 1000);

    // Room again: the history is written and /health is ok.
    std::fs::remove_file(&filler).unwrap();
    wait_for("/health ok again", Duration::from_secs(15), || (get_data_health(&server)["status"] == "ok").then_some(()));
}

/// `/health`'s answer (outside the envelope).
fn get_data_health(server: &Daemon) -> Value {
    let (status, health) = http("GET", &server.url("/health"), None);
    assert_eq!(status, 200, "{health}");
    health
}
