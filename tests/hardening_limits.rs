//! Issue #9, crash and denial of service (items 1–3) and cut-off transfers
//! (item 15): mapping loops, descriptor exhaustion under a real `prlimit`,
//! stalled targets, and resets instead of clean EOFs.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const SECRET: &str = "hardening-limits-secret";

/// Asks for a mapping to `host:target_port`, which may be refused: the status
/// and the reply.
fn create(server: &Daemon, source_port: u16, host: &str, target_port: u16, use_tunnel: bool) -> (u16, serde_json::Value) {
    post(
        server,
        "/api/mapping/create",
        json!({"source_port": source_port, "target_host": host, "target_port": target_port, "use_tunnel": use_tunnel}),
    )
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// A target that accepts and keeps every connection without ever reading it.
fn holding_target() -> (SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            keep.lock().unwrap().push(conn);
        }
    });
    (addr, held)
}

/// Whether the peer has closed `conn` (EOF or reset), reading through whatever
/// it had sent; `false` if it is still open after `wait`.
fn closed_by_peer(conn: &TcpStream, wait: Duration) -> bool {
    let mut conn = conn.try_clone().expect("clone");
    conn.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// Whether the peer closed `conn` (FIN or reset) within `wait`, checked in the
/// kernel's socket table without reading what it had sent: reading would let a
/// stalled relay move on and close cleanly, which is not what is under test.
fn peer_let_go(conn: &TcpStream, wait: Duration) -> bool {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port()),
        SocketAddr::V6(_) => unreachable!("loopback IPv4 only"),
    };
    // No peer address any more (ENOTCONN): the connection was reset already.
    let Ok(peer) = conn.peer_addr() else { return true };
    let (local, remote) = (hex(conn.local_addr().unwrap()), hex(peer));
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let rows = socket_table_rows("/proc/net/tcp", |f| f[1] == local && f[2] == remote);
        let state = rows.first().map(|f| f[3].clone());
        // Gone from the table (reset: TCP_CLOSE is unhashed) or CLOSE_WAIT (FIN).
        if matches!(state.as_deref(), None | Some("08") | Some("07")) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn self_targeting_mappings_are_refused() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    for host in ["127.0.0.1", "0.0.0.0", "localhost", "127.0.0.2", "::ffff:127.0.0.1"] {
        let (status, body) = create(&server, port, host, port, false);
        assert_eq!(status, 400, "{host}: {body}");
        assert!(body["message"].as_str().unwrap().contains("forward to itself"), "{host}: {body}");
    }
    let (status, body) = create(&server, port, "127.0.0.1", server.http.port(), false);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("API port"), "{body}");
    let (status, body) = create(&server, port, "127.0.0.1", server.tunnel.unwrap().port(), false);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("tunnel port"), "{body}");
    // A loop between two mappings cannot be built either.
    let first = free_port();
    assert_eq!(create(&server, first, "127.0.0.1", echo_server().port(), false).0, 200);
    let (status, body) = create(&server, port, "127.0.0.1", first, false);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains(&format!("mapping on port {first}")), "{body}");
    // A tunneled target is the client's business: its 127.0.0.1 is another host.
    assert_eq!(create(&server, port, "127.0.0.1", port, true).0, 200);
}

/// A loop the daemon cannot see (through a relay outside it) ends at
/// `max_connections_per_mapping`, under a real descriptor limit, and the daemon
/// keeps serving its API and its other mappings.
#[test]
fn a_mapping_loop_through_an_outside_relay_is_capped_and_the_daemon_stays_up() {
    let (_dir, config) = config_file("[server]\nmax_connections_per_mapping = 40\n");
    let server = Daemon::server_with_nofile(256, 256, SECRET, &["--config", &config]);
    let looped = free_port();
    // The outside relay: every connection it gets is forwarded back to `looped`.
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for inbound in relay.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", looped)) else { return };
                let (mut a, mut b) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(Shutdown::Both);
                });
                let (mut a, mut b) = (outbound, inbound);
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(Shutdown::Both);
            });
        }
    });
    assert_eq!(create(&server, looped, "127.0.0.1", relay_port, false).0, 200);
    let mut visitor = TcpStream::connect(("127.0.0.1", looped)).unwrap();
    visitor.write_all(b"round and round").unwrap();
    let port = looped.to_string();
    wait_for("the loop to hit the connection limit", Duration::from_secs(60), || {
        scrape_metric(&server, "tunneld_mapping_refused_total", &[("port", &port), ("reason", "connection_limit")]).filter(|v| *v >= 1.0)
    });
    let active = scrape_metric(&server, "tunneld_mapping_active_connections", &[("port", &port)]).unwrap();
    assert!(active <= 40.0, "the cap holds: {active} open");
    // Still serving: the API and another mapping.
    let other = free_port();
    create_mapping(&server, other, echo_server(), false);
    assert_eq!(roundtrip(loopback(other), b"still here"), b"still here");
    assert!(!server.log().contains("Too many open files"), "{}", server.log());
}

/// Idle API connections holding a partial request line are closed after the
/// header timeout, and the API never holds more than its bound at once — the
/// mapping keeps forwarding while they sit there.
#[test]
fn idle_api_connections_are_timed_out_and_bounded() {
    let server = Daemon::server_with_nofile(128, 128, SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    let before = open_descriptors(server.child.id());
    let idle: Vec<TcpStream> = (0..70)
        .map(|_| {
            let mut c = TcpStream::connect(server.http).expect("connect to the API");
            c.write_all(b"GET /api/mapping/list HTTP/1.1\r\n").unwrap();
            c
        })
        .collect();
    // Give the daemon the chance to accept as many as it would.
    wait_for("the API to take its share of idle connections", Duration::from_secs(20), || {
        (open_descriptors(server.child.id()) > before).then_some(())
    });
    assert_eq!(roundtrip(loopback(port), b"forwarding"), b"forwarding");
    let during = open_descriptors(server.child.id());
    assert!(during < before + 40, "API connections are bounded: {before} descriptors before, {during} with 70 idle clients");
    // Idle connections are closed by the header read timeouts: the few reserve
    // connections kept for /health by theirs (1 s), the others by theirs (10 s).
    let started = Instant::now();
    let closed = wait_for("idle API connections to be closed", Duration::from_secs(40), || {
        let n = idle.iter().filter(|c| closed_by_peer(c, Duration::from_millis(20))).count();
        (n >= 8).then_some(n)
    });
    assert!(closed >= 8, "{closed} closed after {:?}", started.elapsed());
}

/// Near the descriptor limit: visitors are refused at once and counted as a
/// local limit — `process_limit` (the visitors' share of the limit is spent;
/// issue 18) or `no_descriptors` (the process is out) — not as target connect
/// errors, with one log line per burst, and the daemon recovers when
/// descriptors free up.
#[test]
fn out_of_descriptors_is_a_refusal_not_a_connect_error() {
    let server = Daemon::server_with_nofile(64, 64, SECRET, &[]);
    let (target, held) = holding_target();
    let port = free_port();
    create_mapping(&server, port, target, false);
    let p = port.to_string();
    let mut visitors = Vec::new();
    for _ in 0..60 {
        if let Ok(mut v) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = v.write_all(b"x");
            visitors.push(v);
        }
    }
    // Refused visitors learn at once: their connection is closed.
    wait_for("visitors to be refused", Duration::from_secs(30), || {
        let refused = visitors.iter().filter(|v| closed_by_peer(v, Duration::from_millis(50))).count();
        (refused >= 5).then_some(refused)
    });
    // Both ends let go, so the daemon's descriptors come back.
    drop(visitors);
    held.lock().unwrap().clear();
    let fetch = || ureq::get(&server.url("/metrics")).call().ok().and_then(|r| r.into_string().ok());
    let text = wait_for("the API to answer again", Duration::from_secs(30), fetch);
    let refused = |reason| metric_value(&text, "tunneld_mapping_refused_total", &[("port", &p), ("reason", reason)]).unwrap();
    assert!(refused("no_descriptors") + refused("process_limit") >= 5.0, "{text}");
    assert_eq!(
        metric_value(&text, "tunneld_mapping_connect_errors_total", &[("port", &p)]),
        Some(0.0),
        "a local limit is not the target's fault"
    );
    let log = server.log();
    assert!(log.matches("accept failed").count() <= 3, "one line per burst, not per attempt:\n{log}");
    assert!(!log.contains("target unreachable"), "{log}");
    let other = free_port();
    wait_for("the API to answer again", Duration::from_secs(30), || {
        let body = json!({"source_port": other, "target_host": "127.0.0.1", "target_port": echo_server().port(), "use_tunnel": false});
        ureq::post(&server.url("/api/mapping/create")).set("Content-Type", "application/json").send_string(&body.to_string()).ok()
    });
    assert_eq!(roundtrip(loopback(other), b"recovered"), b"recovered");
}

#[test]
fn soft_descriptor_limit_is_raised_to_the_hard_limit() {
    let server = Daemon::server_with_nofile(200, 3000, SECRET, &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["3000", "3000"], "{line}");
}

fn with_idle_timeout(secs: u64) -> (tempfile::TempDir, String) {
    config_file(&format!("[server]\nidle_timeout_secs = {secs}\n[client]\nidle_timeout_secs = {secs}\n"))
}

/// A visitor sends into a target that never reads, then goes quiet: after the
/// idle timeout the connection is closed on every side — visitor, the server's
/// `active_connections`, and (tunneled) the client's target socket.
fn stalled_target_is_closed_after_the_idle_timeout(use_tunnel: bool) {
    let (_dir, config) = with_idle_timeout(2);
    let server = Daemon::server(SECRET, &["--config", &config]);
    let _client = use_tunnel.then(|| Daemon::client(&server, SECRET, &["--config", &config]));
    let (target, held) = holding_target();
    let port = free_port();
    create_mapping(&server, port, target, use_tunnel);
    let mut visitor = TcpStream::connect(("127.0.0.1", port)).unwrap();
    visitor.write_all(&random_bytes(64 * 1024)).unwrap();
    let target_conn =
        wait_for("the target to be reached", Duration::from_secs(20), || held.lock().unwrap().first().map(|c| c.try_clone().unwrap()));
    let p = port.to_string();
    wait_for("the idle connection to be closed", Duration::from_secs(30), || {
        scrape_metric(&server, "tunneld_mapping_active_connections", &[("port", &p)]).filter(|v| *v == 0.0)
    });
    assert!(closed_by_peer(&visitor, Duration::from_secs(10)), "the visitor's connection is closed");
    assert!(peer_let_go(&target_conn, Duration::from_secs(10)), "the target's connection is closed");
}

#[test]
fn stalled_direct_target_is_closed_after_the_idle_timeout() {
    stalled_target_is_closed_after_the_idle_timeout(false);
}

#[test]
fn stalled_tunneled_target_is_closed_after_the_idle_timeout() {
    stalled_target_is_closed_after_the_idle_timeout(true);
}

/// The server cuts a tunneled connection (mapping removed) while the target is
/// not reading: the client must drop the target too, not wait on it forever.
#[test]
fn removing_a_mapping_makes_the_client_drop_its_target() {
    let (server, _client) = server_and_client(SECRET, true);
    let (target, held) = holding_target();
    let port = free_port();
    create_mapping(&server, port, target, true);
    let mut writer = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Fills every buffer on the way, then blocks: the target never reads.
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let progress = written.clone();
    std::thread::spawn(move || {
        let chunk = vec![7u8; 64 * 1024];
        while writer.write_all(&chunk).is_ok() {
            progress.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let target_conn =
        wait_for("the target to be reached", Duration::from_secs(20), || held.lock().unwrap().first().map(|c| c.try_clone().unwrap()));
    // Stalled: nothing moves any more (every buffer between visitor and target is
    // full), so the client sits blocked on the target, where it cannot see the
    // data channel's end.
    let mut last = u64::MAX;
    wait_for("the transfer to stall", Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        let stalled = now == last;
        last = now;
        stalled.then_some(())
    });
    let (status, body) = post(&server, "/api/mapping/remove", json!({"port": port}));
    assert_eq!(status, 200, "{body}");
    assert!(peer_let_go(&target_conn, Duration::from_secs(20)), "the client still holds the target open");
}

/// A target streaming without end, so a transfer can be cut in the middle.
fn endless_target() -> SocketAddr {
    target(|mut conn| {
        let chunk = vec![b'z'; 16 * 1024];
        while conn.write_all(&chunk).is_ok() {
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// Reads until the connection ends; `Ok(total)` on EOF, `Err` on a reset.
fn read_until_end(mut visitor: TcpStream) -> std::io::Result<u64> {
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match visitor.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// Starts a visitor on `port` that has received at least 256 KiB when this
/// returns, and is still reading.
fn reading_visitor(port: u16) -> std::thread::JoinHandle<std::io::Result<u64>> {
    let mut visitor = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut first = vec![0u8; 256 * 1024];
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    visitor.read_exact(&mut first).expect("the transfer is under way");
    std::thread::spawn(move || read_until_end(visitor))
}

#[test]
fn client_killed_mid_transfer_resets_the_visitor() {
    let (server, client) = server_and_client(SECRET, true);
    let mut client = client.unwrap();
    let port = free_port();
    create_mapping(&server, port, endless_target(), true);
    let reader = reading_visitor(port);
    client.kill();
    let outcome = reader.join().unwrap();
    assert!(outcome.is_err(), "a cut-off transfer must not end like a complete one: {outcome:?}");
}

#[test]
fn shutdown_grace_end_resets_open_visitors() {
    let (_dir, config) = config_file("[server]\nshutdown_grace_secs = 1\n");
    let mut server = Daemon::server(SECRET, &["--config", &config]);
    let port = free_port();
    create_mapping(&server, port, endless_target(), false);
    let reader = reading_visitor(port);
    server.terminate();
    let outcome = reader.join().unwrap();
    assert!(outcome.is_err(), "a connection cut at the end of the grace period must be reset: {outcome:?}");
}
