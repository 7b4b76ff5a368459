//! Per-mapping policy end to end on the real binary: fields and live updates,
//! allow/deny lists from real loopback source addresses, and the shared
//! bandwidth cap measured on real sockets.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[test]
fn policy_fields_are_validated_updated_live_and_survive_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let echo = echo_server();
    let port = free_port();
    let mut server = Daemon::server_with_state(state.path(), "policy-secret-123456", &[]);
    let create = json!({
        "source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(),
        "description": "office ssh", "bandwidth_limit": 1_000_000,
        "quota": {"bytes": 10_000_000, "period": "month", "action": "alert"},
        "allow": ["127.0.0.0/8", "::1"], "deny": ["127.0.0.9"],
    });
    // Each bad field is refused with a 400 that names it, and nothing is created.
    let bad = [
        ("bandwidth_limit", json!(0)),
        ("bandwidth_limit", json!(-1)),
        ("allow", json!(["10.0.0.0/33"])),
        ("deny", json!(["not-an-address"])),
        ("quota", json!({"bytes": 5, "period": "week", "action": "block"})),
        ("quota", json!({"bytes": 5, "period": "day", "action": "drop"})),
    ];
    for (field, value) in &bad {
        let mut body = create.clone();
        body[field] = value.clone();
        let (status, json) = post(&server, "/api/mapping/create", body);
        assert_eq!(status, 400, "{field}={value}: {json}");
        assert!(json["message"].as_str().unwrap().contains(&format!("`{field}")), "{json}");
    }
    assert_eq!(get_data(&server, "/api/mapping/list")["count"], 0);

    let (status, created) = post(&server, "/api/mapping/create", create);
    assert_eq!(status, 200, "{created}");
    let m = &created["data"];
    assert_eq!(m["description"], "office ssh");
    assert_eq!(m["bandwidth_limit"], 1_000_000);
    assert_eq!(m["quota"], json!({"bytes": 10_000_000, "period": "month", "action": "alert"}));
    assert_eq!(m["allow"], json!(["127.0.0.0/8", "::1/128"]));
    assert_eq!(m["deny"], json!(["127.0.0.9/32"]));

    // An open connection survives an update.
    let mut open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    open.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).unwrap();

    // Absent fields stay, null removes, unknown fields and bad values are refused.
    let (status, json) = post(&server, "/api/mapping/update", json!({"port": port, "bandwidth_limit": null, "description": "ssh"}));
    assert_eq!(status, 200, "{json}");
    let (status, json) = post(&server, "/api/mapping/update", json!({"port": port, "target_port": 1}));
    assert_eq!(status, 400, "{json}");
    assert!(json["message"].as_str().unwrap().contains("`target_port`"), "{json}");
    let (status, json) = post(&server, "/api/mapping/update", json!({"port": port, "deny": ["300.1.1.1"]}));
    assert_eq!(status, 400, "{json}");
    assert!(json["message"].as_str().unwrap().contains("`deny`"), "{json}");
    let (status, json) = post(&server, "/api/mapping/update", json!({"port": free_port(), "description": "x"}));
    assert_eq!(status, 404, "{json}");
    let m = listed_mapping(&server, port).expect("mapping listed");
    assert_eq!(m["description"], "ssh");
    assert_eq!(m["bandwidth_limit"], Value::Null);
    assert_eq!(m["quota"]["bytes"], 10_000_000);
    assert_eq!(m["deny"], json!(["127.0.0.9/32"]));

    open.write_all(b"after!").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after!", "the open connection was not dropped by the update");
    drop(open);

    server.terminate();
    let server = Daemon::server_with_state(state.path(), "policy-secret-123456", &[]);
    let restored = listed_mapping(&server, port).expect("mapping listed");
    assert_eq!(restored["description"], "ssh");
    assert_eq!(restored["quota"], json!({"bytes": 10_000_000, "period": "month", "action": "alert"}));
    assert_eq!(restored["allow"], json!(["127.0.0.0/8", "::1/128"]));
    // And the restored lists are enforced.
    assert_eq!(visit_from("127.0.0.9".parse().unwrap(), port, b"hi"), Vec::<u8>::new());
    assert_eq!(visit_from("127.0.0.2".parse().unwrap(), port, b"hi"), b"hi");
}

/// Connects to `port` on the loopback of `from`'s family from the source
/// address `from`, says `hello`, half-closes, and returns what came back (a
/// refused visitor gets nothing).
fn visit_from(from: IpAddr, port: u16, hello: &[u8]) -> Vec<u8> {
    let to: IpAddr = if from.is_ipv4() { "127.0.0.1".parse().unwrap() } else { "::1".parse().unwrap() };
    let mut visitor = connect_from(from, SocketAddr::new(to, port));
    let _ = visitor.write_all(hello);
    let _ = visitor.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = visitor.read_to_end(&mut out);
    out
}

/// Visitors of `port` refused for `reason`; -1 while the series is missing, so
/// that "none refused" asserts an exported zero.
fn refused(d: &Daemon, port: u16, reason: &str) -> f64 {
    scrape_metric(d, "tunneld_mapping_refused_total", &[("port", &port.to_string()), ("reason", reason)]).unwrap_or(-1.0)
}

/// Visitors of `port` that reached the forwarding stage; -1 while the series is missing.
fn accepted(d: &Daemon, port: u16) -> f64 {
    scrape_metric(d, "tunneld_mapping_connections_total", &[("port", &port.to_string())]).unwrap_or(-1.0)
}

#[test]
fn allow_and_deny_lists_are_checked_at_accept_for_ipv4_and_ipv6() {
    // A dual-stack listener: IPv4 visitors arrive as ::ffff:127.0.0.x.
    let server = Daemon::server_env("policy-secret-123456", &[], &[("TUNNELD_SERVER__BIND_ADDR", "::")]);
    let echo = echo_server();
    let port = free_port();
    let (status, json) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "allow": ["127.0.0.0/8", "::1"], "deny": ["127.0.0.3/32"]}),
    );
    assert_eq!(status, 200, "{json}");
    let v4 = |last: u8| IpAddr::from([127, 0, 0, last]);
    let v6: IpAddr = "::1".parse().unwrap();

    assert_eq!(visit_from(v4(2), port, b"two"), b"two");
    assert_eq!(visit_from(v6, port, b"six"), b"six");
    assert_eq!(visit_from(v4(3), port, b"three"), Vec::<u8>::new(), "denied wins over allowed");
    assert_eq!(refused(&server, port, "acl"), 1.0);
    assert_eq!(accepted(&server, port), 2.0, "a refused visitor never reaches the forwarding stage");

    // Live: deny IPv6 loopback, allow only 127.0.0.4.
    let (status, json) = post(&server, "/api/mapping/update", json!({"port": port, "allow": ["127.0.0.4"], "deny": ["::1/128"]}));
    assert_eq!(status, 200, "{json}");
    assert_eq!(visit_from(v6, port, b"six"), Vec::<u8>::new());
    assert_eq!(visit_from(v4(2), port, b"two"), Vec::<u8>::new(), "not on the allow list");
    assert_eq!(visit_from(v4(4), port, b"four"), b"four");
    assert_eq!(refused(&server, port, "acl"), 3.0);

    // Lists removed: everyone again.
    let (status, json) = post(&server, "/api/mapping/update", json!({"port": port, "allow": null, "deny": null}));
    assert_eq!(status, 200, "{json}");
    assert_eq!(visit_from(v4(3), port, b"three"), b"three");
    assert_eq!(visit_from(v6, port, b"six"), b"six");
    assert_eq!(refused(&server, port, "acl"), 3.0);
    assert_eq!(accepted(&server, port), 5.0);
}

/// Issue 18 item 4: `::ffff:127.0.0.1` was kept as an IPv6 /128 that no visitor
/// (compared in canonical IPv4 form) ever matched, so as a deny entry it failed open.
#[test]
fn an_ipv4_mapped_deny_entry_refuses_its_ipv4_visitor() {
    let server = Daemon::server_env("policy-secret-123456", &[], &[("TUNNELD_SERVER__BIND_ADDR", "::")]);
    let echo = echo_server();
    let port = free_port();
    let (status, json) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "deny": ["::ffff:127.0.0.5", "::ffff:127.0.0.0/120"]}),
    );
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["data"]["deny"], json!(["127.0.0.5/32", "127.0.0.0/24"]), "mapped blocks are listed as the IPv4 blocks they stand for");

    assert_eq!(visit_from(IpAddr::from([127, 0, 0, 5]), port, b"five"), Vec::<u8>::new(), "a mapped deny entry must not fail open");
    assert_eq!(refused(&server, port, "acl"), 1.0);

    // As an allow entry it admits the visitor it names, and only it.
    let (status, json) = post(&server, "/api/mapping/update", json!({"port": port, "deny": null, "allow": ["::ffff:127.0.0.6"]}));
    assert_eq!(status, 200, "{json}");
    assert_eq!(listed_mapping(&server, port).unwrap()["allow"], json!(["127.0.0.6/32"]));
    assert_eq!(visit_from(IpAddr::from([127, 0, 0, 6]), port, b"six"), b"six");
    assert_eq!(visit_from(IpAddr::from([127, 0, 0, 7]), port, b"seven"), Vec::<u8>::new());
    assert_eq!(refused(&server, port, "acl"), 2.0);
}

/// A target that reads and discards everything, adding what it read to `received`.
fn sink(received: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let received = received.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    addr
}

/// Bytes per second arriving at the target over `window`.
fn rate_over(received: &AtomicU64, window: Duration) -> f64 {
    let (start, before) = (Instant::now(), received.load(Ordering::Relaxed));
    std::thread::sleep(window);
    (received.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64()
}

fn cap_holds_and_lifts_live(connections: usize) {
    const CAP: u64 = 5_000_000;
    let server = Daemon::server("policy-secret-123456", &[]);
    let received = Arc::new(AtomicU64::new(0));
    let target = sink(received.clone());
    let port = free_port();
    let (status, json) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(), "bandwidth_limit": CAP}),
    );
    assert_eq!(status, 200, "{json}");
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..connections)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let chunk = vec![7u8; 128 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if conn.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    wait_for("bytes at the target", Duration::from_secs(20), || (received.load(Ordering::Relaxed) > 0).then_some(()));
    // Past the first burst (the bucket starts full), measure 10 s.
    std::thread::sleep(Duration::from_secs(1));
    let capped = rate_over(&received, Duration::from_secs(10));
    let error = (capped - CAP as f64).abs() / CAP as f64;
    eprintln!("{connections} connection(s): {capped:.0} B/s under a {CAP} B/s cap ({:.2} % off)", error * 100.0);
    assert!(error <= 0.05, "{connections} connection(s) moved {capped:.0} B/s under a cap of {CAP} B/s");

    let (status, json) = post(&server, "/api/mapping/update", json!({"port": port, "bandwidth_limit": null}));
    assert_eq!(status, 200, "{json}");
    let lifted = rate_over(&received, Duration::from_secs(2));
    eprintln!("{connections} connection(s): {lifted:.0} B/s after the cap was lifted");
    assert!(lifted > 3.0 * CAP as f64, "lifting the cap raised throughput only to {lifted:.0} B/s");
    assert_eq!(accepted(&server, port), connections as f64, "no connection was re-made");

    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
}

#[test]
fn a_5_mb_per_second_cap_holds_for_one_connection_and_lifts_live() {
    cap_holds_and_lifts_live(1);
}

#[test]
fn a_5_mb_per_second_cap_is_shared_by_8_connections_and_lifts_live() {
    cap_holds_and_lifts_live(8);
}

/// A webhook receiver: answers its first request with a 500 (so the daemon has
/// to retry), then 200; keeps every JSON body it accepted, in order.
fn webhook_receiver() -> (SocketAddr, Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::BufRead;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::new(AtomicU64::new(0));
    let out = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (received, seen) = (received.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut writer = conn.try_clone().unwrap();
                let mut reader = std::io::BufReader::new(conn);
                loop {
                    let mut length = 0usize;
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let status = if seen.fetch_add(1, Ordering::SeqCst) == 0 { "500 Internal Server Error" } else { "200 OK" };
                    if status.starts_with("200") {
                        received.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                    }
                    let _ = write!(writer, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    (addr, out)
}

#[test]
fn a_blocking_quota_alerts_at_80_and_100_percent_then_refuses_new_visitors() {
    const QUOTA: u64 = 10_000_000;
    let (hook, delivered) = webhook_receiver();
    let (_dir, config) = config_file(&format!("[alerts]\nwebhook_url = \"http://{hook}/hook\"\n"));
    let server = Daemon::server("policy-secret-123456", &["--config", &config]);
    let at_target = Arc::new(AtomicU64::new(0));
    let target = sink(at_target.clone());
    let port = free_port();
    let (status, json) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(),
               "quota": {"bytes": QUOTA, "period": "month", "action": "block"}}),
    );
    assert_eq!(status, 200, "{json}");
    let kinds = || delivered.lock().unwrap().iter().map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect::<Vec<_>>();
    let push = |conn: &mut TcpStream, bytes: u64| {
        let before = at_target.load(Ordering::Relaxed);
        conn.write_all(&vec![1u8; bytes as usize]).unwrap();
        wait_for("the bytes at the target", Duration::from_secs(30), || {
            (at_target.load(Ordering::Relaxed) >= before + bytes).then_some(())
        });
    };

    let mut open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    push(&mut open, 8_500_000);
    wait_for("the 80 % event at the webhook", Duration::from_secs(30), || (kinds() == ["quota_warning"]).then_some(()));
    assert_eq!(visit_from("127.0.0.2".parse().unwrap(), port, b""), Vec::<u8>::new());
    assert_eq!(refused(&server, port, "quota"), 0.0, "not blocked at 85 %");

    push(&mut open, 2_000_000);
    wait_for("the 100 % event at the webhook", Duration::from_secs(30), || (kinds().len() == 2).then_some(()));
    assert_eq!(kinds(), ["quota_warning", "quota_exhausted"], "in order");
    let first = delivered.lock().unwrap()[0].clone();
    assert_eq!(first["port"], port);
    assert!(first["message"].as_str().unwrap().contains("85 %"), "{first}");
    let text = metrics_text(&server);
    let ratio = metric_value(&text, "tunneld_mapping_quota_used_ratio", &[("port", &port.to_string())]).unwrap();
    assert!((ratio - 1.05).abs() < 0.01, "ratio {ratio}");
    assert!(metric_value(&text, "tunneld_alert_webhook_failures_total", &[]).unwrap() >= 1.0, "the 500 was counted");

    // New visitors are refused; the open connection may finish.
    let before = accepted(&server, port);
    for _ in 0..2 {
        let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
        late.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(late.read(&mut buf), Ok(0) | Err(_)), "a late visitor is closed at once");
    }
    assert_eq!(refused(&server, port, "quota"), 2.0);
    assert_eq!(accepted(&server, port), before);
    push(&mut open, 1_000_000);

    let (status, json) = http("GET", &server.url("/api/events?limit=1&since=0"), None);
    assert_eq!(status, 400, "unknown parameters are refused: {json}");
    assert_eq!(get_data(&server, "/api/events?limit=1")["events"].as_array().unwrap().len(), 1);
    // `?token=` is how the API token may travel; it is not an unknown parameter.
    assert_eq!(get_data(&server, "/api/events?token=policy-token-0123456789")["count"], 2);
    let events = get_data(&server, "/api/events");
    let listed: Vec<&str> = events["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(listed, ["quota_exhausted", "quota_warning"], "newest first: {events}");
}

fn event_kinds(d: &Daemon) -> Vec<String> {
    let events = get_data(d, "/api/events");
    events["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn unbindable_mappings_and_lost_clients_are_events() {
    let secret = "policy-secret-123456";
    let mut server = Daemon::server(secret, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    server.terminate();
    let blocker = TcpListener::bind(("0.0.0.0", port)).expect("take the mapping's port");
    let server = Daemon::server_with_state(&server.state_dir.clone(), secret, &[]);
    wait_for("a mapping_down event", Duration::from_secs(20), || event_kinds(&server).contains(&"mapping_down".into()).then_some(()));
    drop(blocker);
    wait_for("a mapping_up event", Duration::from_secs(30), || (event_kinds(&server)[0] == "mapping_up").then_some(()));
    let events = get_data(&server, "/api/events");
    assert_eq!(events["events"][0]["port"], port, "{events}");

    let mut client = Daemon::client(&server, secret, &[]);
    // The watcher samples the tunnel once a second (a session shorter than that
    // is not worth an alert, and there is no signal to wait on): let it see one.
    std::thread::sleep(Duration::from_millis(2500));
    client.kill();
    wait_for("a client_lost event", Duration::from_secs(20), || (event_kinds(&server)[0] == "client_lost").then_some(()));
    let _client = Daemon::client(&server, secret, &[]);
    wait_for("a client_back event", Duration::from_secs(20), || (event_kinds(&server)[0] == "client_back").then_some(()));
    assert_eq!(get_data(&server, "/api/events")["events"][0]["client"], "default");
}
