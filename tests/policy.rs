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

fn post(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    http("POST", &d.url(path), Some(&body.to_string()))
}

fn mapping_on(d: &Daemon, port: u16) -> Value {
    let list = get_data(d, "/api/mapping/list");
    list["mappings"].as_array().unwrap().iter().find(|m| m["source_port"] == port).cloned().expect("mapping listed")
}

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
    let m = mapping_on(&server, port);
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
    let restored = mapping_on(&server, port);
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
    use socket2::{Domain, Socket, Type};
    let (domain, to): (Domain, IpAddr) =
        if from.is_ipv4() { (Domain::IPV4, "127.0.0.1".parse().unwrap()) } else { (Domain::IPV6, "::1".parse().unwrap()) };
    let socket = Socket::new(domain, Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(from, 0).into()).expect("bind the visitor's source address");
    socket.connect(&SocketAddr::new(to, port).into()).expect("connect to the mapping");
    let mut visitor: TcpStream = socket.into();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = visitor.write_all(hello);
    let _ = visitor.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = visitor.read_to_end(&mut out);
    out
}

fn refused(d: &Daemon, port: u16, reason: &str) -> f64 {
    metric_value(&metrics_text(d), "tunneld_mapping_refused_total", &[("port", &port.to_string()), ("reason", reason)]).unwrap_or(-1.0)
}

fn accepted(d: &Daemon, port: u16) -> f64 {
    metric_value(&metrics_text(d), "tunneld_mapping_connections_total", &[("port", &port.to_string())]).unwrap_or(-1.0)
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
