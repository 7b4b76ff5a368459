//! End-to-end forwarding through the real binary: direct and tunneled mappings,
//! data integrity under concurrency, half-close, authentication, and recovery when
//! either side restarts. Counters are checked exactly along the way.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

const SECRET: &str = "correct horse battery staple";

/// Sends `per_conn` random bytes on each of `conns` concurrent connections through
/// `addr` (to an echo target) and checks every byte came back intact.
fn concurrent_echo(addr: SocketAddr, conns: usize, per_conn: usize) {
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || {
                let payload = random_bytes(per_conn);
                let back = roundtrip(addr, &payload);
                assert_eq!(back.len(), payload.len(), "echoed length");
                assert_eq!(sha256(&back), sha256(&payload), "echoed bytes differ");
            })
        })
        .collect();
    for w in workers {
        w.join().expect("connection worker");
    }
}

fn mapping_bytes(text: &str, port: u16, direction: &str) -> Option<f64> {
    metric_value(text, "tunneld_mapping_bytes_total", &[("port", &port.to_string()), ("direction", direction)])
}

/// 16 MiB each way over one connection, then 16 MiB spread over 50 concurrent
/// ones; afterwards the mapping's counters equal exactly what was sent, in
/// `/metrics` and in `/api/stats/traffic` alike.
fn transfer_and_count(use_tunnel: bool) {
    let (server, _client) = server_and_client(SECRET, use_tunnel);
    let echo = echo_server();
    let port = free_port();
    create_mapping(&server, port, echo, use_tunnel);
    let addr: SocketAddr = loopback(port);

    const TOTAL: usize = 16 << 20;
    concurrent_echo(addr, 1, TOTAL);
    concurrent_echo(addr, 50, TOTAL / 50);
    let expected = (TOTAL + TOTAL / 50 * 50) as f64;

    // The relay counts a chunk right after writing it, so the last count can land
    // a moment after the visitor saw its last byte; wait for the connections to end.
    let text = wait_for("all connections closed", Duration::from_secs(10), || {
        let t = metrics_text(&server);
        (metric_value(&t, "tunneld_mapping_active_connections", &[("port", &port.to_string())]) == Some(0.0)).then_some(t)
    });
    assert_eq!(mapping_bytes(&text, port, "sent"), Some(expected));
    assert_eq!(mapping_bytes(&text, port, "received"), Some(expected));
    assert_eq!(metric_value(&text, "tunneld_mapping_connections_total", &[("port", &port.to_string())]), Some(51.0));

    let traffic = get_data(&server, "/api/stats/traffic");
    let m = &traffic["mappings"][0];
    assert_eq!(m["port"], port);
    assert_eq!(m["bytes_sent"].as_f64(), Some(expected));
    assert_eq!(m["bytes_received"].as_f64(), Some(expected));
    assert_eq!(traffic["total_sent"].as_f64(), Some(expected));
    assert_eq!(traffic["total_received"].as_f64(), Some(expected));

    let tunnel_sent = metric_value(&text, "tunneld_tunnel_bytes_total", &[("direction", "sent")]).unwrap();
    if use_tunnel {
        // Wire bytes include every payload byte plus framing.
        assert!(tunnel_sent > expected, "tunnel wire bytes {tunnel_sent} must exceed payload {expected}");
    } else {
        assert_eq!(tunnel_sent, 0.0, "a direct mapping must not touch the tunnel");
    }
}

#[test]
fn direct_mapping_carries_16_mib_each_way_with_50_concurrent_connections() {
    transfer_and_count(false);
}

#[test]
fn tunneled_mapping_carries_16_mib_each_way_with_50_concurrent_connections() {
    transfer_and_count(true);
}

/// A target that reads until the visitor half-closes, then answers with how many
/// bytes it got and closes.
fn counting_target() -> SocketAddr {
    target(|mut conn| {
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("target read");
        conn.write_all(format!("received {} bytes", got.len()).as_bytes()).expect("target reply");
    })
}

fn half_close(use_tunnel: bool) {
    let (server, _client) = server_and_client(SECRET, use_tunnel);
    let port = free_port();
    create_mapping(&server, port, counting_target(), use_tunnel);
    let mut visitor = TcpStream::connect(("127.0.0.1", port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    visitor.write_all(&[7u8; 100_000]).unwrap();
    visitor.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    visitor.read_to_string(&mut reply).expect("reply after half-close");
    assert_eq!(reply, "received 100000 bytes");
}

#[test]
fn direct_mapping_delivers_the_reply_after_the_visitor_half_closes() {
    half_close(false);
}

#[test]
fn tunneled_mapping_delivers_the_reply_after_the_visitor_half_closes() {
    half_close(true);
}

#[test]
fn wrong_secret_is_refused_and_no_visitor_gets_through() {
    let server = Daemon::server(SECRET, &[]);
    let client = Daemon::client_unconnected(&server, "not the secret", &[]);
    // The client reports the failed session and schedules a retry.
    client.wait_for_notify("STATUS=disconnected", Duration::from_secs(10));
    let text = metrics_text(&server);
    assert!(metric_value(&text, "tunneld_tunnel_sessions_total", &[("result", "auth_failed")]).unwrap() >= 1.0, "{text}");
    assert_eq!(metric_value(&text, "tunneld_tunnel_connected", &[]), Some(0.0));
    assert!(server.log().contains("authentication failed"), "server log names the failure");
    assert!(client.log().contains("rejected authentication"), "client log names the failure");

    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let port = free_port();
    let created = create_mapping(&server, port, target.local_addr().unwrap(), true);
    assert_eq!(created["data"]["status"], "waiting_for_tunnel");
    assert!(visit(port, b"let me in").is_empty(), "visitor must get nothing");
    assert!(target.accept().is_err(), "target must never see a connection");
    let errors = scrape_metric(&server, "tunneld_mapping_connect_errors_total", &[("port", &port.to_string())]);
    assert_eq!(errors, Some(1.0));
    let health = http("GET", &server.url("/health"), None).1;
    assert_eq!(health["tunnel_connected"], false);
}

#[test]
fn killed_client_is_replaced_and_the_tunnel_works_again_without_api_calls() {
    let server = Daemon::server(SECRET, &[]);
    let mut client = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let addr: SocketAddr = loopback(port);
    assert_eq!(roundtrip(addr, b"before"), b"before");

    client.kill();
    let _client2 = Daemon::client(&server, SECRET, &[]);
    assert_eq!(roundtrip(addr, b"after restart"), b"after restart");
    let text = metrics_text(&server);
    assert_eq!(metric_value(&text, "tunneld_tunnel_connected", &[]), Some(1.0));
    assert!(metric_value(&text, "tunneld_tunnel_sessions_total", &[("result", "ok")]).unwrap() >= 2.0);
}

#[test]
fn restarted_server_restores_its_mappings_and_the_client_reconnects() {
    let state = tempfile::tempdir().unwrap();
    let mut server = Daemon::server_with_state(state.path(), SECRET, &[]);
    let tunnel_addr = server.tunnel.unwrap();
    let client = Daemon::client(&server, SECRET, &[]);
    let echo = echo_server();
    let (direct, tunneled) = (free_port(), free_port());
    create_mapping(&server, direct, echo, false);
    create_mapping(&server, tunneled, echo, true);
    assert_eq!(server.terminate().code(), Some(0));

    // Same state dir and same tunnel port, so the running client finds it again.
    let server = Daemon::server_restarted(state.path(), tunnel_addr, SECRET);
    let list = get_data(&server, "/api/mapping/list");
    assert_eq!(list["count"], 2, "{list}");
    let ports: Vec<u64> = list["mappings"].as_array().unwrap().iter().map(|m| m["source_port"].as_u64().unwrap()).collect();
    assert_eq!(ports, vec![direct.min(tunneled) as u64, direct.max(tunneled) as u64]);
    assert_eq!(roundtrip(loopback(direct), b"direct after restart"), b"direct after restart");

    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    assert_eq!(roundtrip(loopback(tunneled), b"tunnel after restart"), b"tunnel after restart");
}

#[test]
fn a_stored_mapping_whose_port_is_taken_is_reported_and_retried() {
    let state = tempfile::tempdir().unwrap();
    let mut server = Daemon::server_with_state(state.path(), SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    assert_eq!(server.terminate().code(), Some(0));

    let squatter = TcpListener::bind(("0.0.0.0", port)).expect("occupy the mapping's port");
    let server = Daemon::server_with_state(state.path(), SECRET, &[]);
    let status = |server: &Daemon| get_data(server, "/api/mapping/list")["mappings"][0]["status"].as_str().unwrap_or("").to_string();
    let first = status(&server);
    assert!(first.starts_with("error: "), "status while the port is taken: {first}");

    drop(squatter);
    wait_for("the mapping to bind once the port is free", Duration::from_secs(15), || (status(&server) == "active").then_some(()));
    assert_eq!(roundtrip(loopback(port), b"finally"), b"finally");
}

#[test]
fn garbage_on_the_tunnel_port_does_not_harm_the_session() {
    let server = Daemon::server(SECRET, &[]);
    let _client = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);

    let mut junk = TcpStream::connect(server.tunnel.unwrap()).unwrap();
    junk.write_all(&[0xff; 64]).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = junk.read_to_end(&mut buf);
    assert!(buf.is_empty(), "garbage gets no answer");

    assert_eq!(roundtrip(loopback(port), b"still fine"), b"still fine");
    let text = metrics_text(&server);
    assert!(metric_value(&text, "tunneld_tunnel_sessions_total", &[("result", "protocol_error")]).unwrap() >= 1.0);
    assert_eq!(metric_value(&text, "tunneld_tunnel_connected", &[]), Some(1.0));
}

fn unreachable_target_is_refused_and_counted(use_tunnel: bool) {
    let (server, client) = server_and_client(SECRET, use_tunnel);
    let closed: SocketAddr = loopback(free_port());
    let port = free_port();
    create_mapping(&server, port, closed, use_tunnel);
    for _ in 0..3 {
        assert!(visit(port, b"anyone there?").is_empty(), "nothing comes back from a closed port");
    }
    let errors = wait_for("three connect errors", Duration::from_secs(10), || {
        let v = scrape_metric(&server, "tunneld_mapping_connect_errors_total", &[("port", &port.to_string())])?;
        (v == 3.0).then_some(v)
    });
    assert_eq!(errors, 3.0);
    if let Some(client) = client {
        assert!(client.log().contains("cannot reach target"), "the client logs the failure");
        // The session survives failed targets.
        assert_eq!(scrape_metric(&server, "tunneld_tunnel_connected", &[]), Some(1.0));
    }
}

#[test]
fn direct_mapping_to_a_closed_port_closes_the_visitor_and_counts_the_error() {
    unreachable_target_is_refused_and_counted(false);
}

#[test]
fn tunneled_mapping_to_a_closed_port_closes_the_visitor_and_counts_the_error() {
    unreachable_target_is_refused_and_counted(true);
}
