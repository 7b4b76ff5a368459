//! Issue #9, the tunnel port: throttled and aggregated handshake failures and a
//! bound on unauthenticated connections (item 6), flapping clients (item 7),
//! and bytes counted only when they reached the target (item 14).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tunneld::tunnel::frame::{self, FRAME_HEADER};
use tunneld::tunnel::message::{Auth, Challenge, Opening, Verdict, PROTOCOL_VERSION};

const SECRET: &str = "hardening-tunnel-secret";

/// One frame, written with the crate's own framing.
fn write_frame<T: Serialize>(conn: &mut TcpStream, msg: &T) -> std::io::Result<()> {
    conn.write_all(&frame::encode_frame(msg))
}

/// The next frame as the message it must be, or `None` when the server closed
/// the connection (or sent something else).
fn read_frame<T: DeserializeOwned>(conn: &mut TcpStream) -> Option<T> {
    let mut len = [0u8; FRAME_HEADER];
    conn.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    conn.read_exact(&mut body).ok()?;
    frame::decode(&body).ok()
}

/// One handshake with a wrong HMAC. `true` when the server got as far as a
/// challenge (and then rejected the answer), `false` when it refused unheard.
fn guess(from: IpAddr, tunnel: SocketAddr) -> bool {
    let mut conn = connect_from(from, tunnel);
    let hello = Opening::Control { version: PROTOCOL_VERSION, client: "default".into(), features: vec![] };
    if write_frame(&mut conn, &hello).is_err() {
        return false;
    }
    match read_frame(&mut conn) {
        Some(Challenge::Challenge { .. }) => {
            write_frame(&mut conn, &Auth::Auth { mac: "00".repeat(32) }).unwrap();
            let answer: Verdict = read_frame(&mut conn).expect("an answer to the guess");
            assert!(matches!(answer, Verdict::Rejected { .. }), "{answer:?}");
            true
        }
        _ => false,
    }
}

/// A server whose tunnel speaks plain TCP (`server.tls = false`), so a guess can
/// reach the HMAC step with hand-written frames; with TLS on, the same plain
/// hellos are TLS mismatches, which go through the same per-source throttle.
fn plain_server() -> Daemon {
    Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__TLS", "false")])
}

#[test]
fn wrong_secret_guessing_is_throttled_per_source_and_logged_in_aggregate() {
    let server = plain_server();
    let tunnel = server.tunnel.unwrap();
    let attacker: IpAddr = "127.0.0.1".parse().unwrap();
    let challenged = (0..40).filter(|_| guess(attacker, tunnel)).count();
    assert!(challenged <= 6, "{challenged} of 40 guesses were heard");
    assert!(tunnel_sessions(&server, "throttled") >= 34.0, "{}", metrics_text(&server));
    assert!(tunnel_sessions(&server, "auth_failed") <= 6.0);
    // Another address is not punished for this one.
    assert!(guess("127.0.0.2".parse().unwrap(), tunnel), "another source still gets a challenge");
    let log = server.log();
    let warnings = log.lines().filter(|l| l.contains("WARN") && l.contains("tunnel")).count();
    assert!(warnings <= 4, "logged in aggregate, not per attempt ({warnings} lines):\n{log}");
}

#[test]
fn silent_tunnel_connections_are_bounded_and_logged_in_aggregate() {
    let server = plain_server();
    let tunnel = server.tunnel.unwrap();
    let quiet: IpAddr = "127.0.0.1".parse().unwrap();
    let idle: Vec<TcpStream> = (0..100).map(|_| connect_from(quiet, tunnel)).collect();
    // Connections beyond the per-source bound are closed at once — well before
    // the 10 s handshake timeout would close any of them.
    for c in &idle {
        c.set_nonblocking(true).unwrap();
    }
    let closed = |c: &TcpStream| {
        let mut c = c;
        match c.read(&mut [0u8; 1]) {
            Ok(0) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    };
    let refused = wait_for("connections beyond the bound to be closed", Duration::from_secs(8), || {
        let n = idle.iter().filter(|c| closed(c)).count();
        (n >= 80).then_some(n)
    });
    assert!(refused >= 80, "only {refused} of 100 idle connections were refused");
    assert!(tunnel_sessions(&server, "throttled") >= 80.0);
    // Another source still gets through while they sit there.
    assert!(guess("127.0.0.3".parse().unwrap(), tunnel));
    let log = server.log();
    let refusals = log.lines().filter(|l| l.contains("tunnel connection refused")).count();
    assert!(refusals <= 1, "one line for the burst, not one per connection:\n{log}");
}

#[test]
fn two_clients_with_one_secret_are_reported_as_flapping() {
    let server = Daemon::server(SECRET, &[]);
    let _first = Daemon::client(&server, SECRET, &[]);
    let _second = Daemon::client(&server, SECRET, &[]);
    let health = wait_for("/health to report flapping", Duration::from_secs(90), || {
        let (_, health) = http("GET", &server.url("/health"), None);
        (health["status"] == "degraded" && health["reasons"].to_string().contains("flapping")).then_some(health)
    });
    assert!(tunnel_sessions(&server, "replaced") >= 4.0, "{health}");
    let log = server.log();
    let line = log.lines().find(|l| l.contains("ERROR") && l.contains("flapping")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("previous=127.0.0.1:") && line.contains("latest=127.0.0.1:"), "names both peers: {line}");
}

#[test]
fn a_tunneled_visitor_refused_by_its_target_counts_no_bytes() {
    let (server, _client) = server_and_client(SECRET, true);
    let port = free_port();
    let closed = loopback(free_port());
    create_mapping(&server, port, closed, true);
    assert!(visit(port, b"hello").is_empty());
    let p = port.to_string();
    wait_for("the connect error to be counted", Duration::from_secs(20), || {
        scrape_metric(&server, "tunneld_mapping_connect_errors_total", &[("port", &p)]).filter(|v| *v == 1.0)
    });
    let text = metrics_text(&server);
    for direction in ["sent", "received"] {
        assert_eq!(
            metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &p), ("direction", direction)]),
            Some(0.0),
            "{direction}: nothing reached the target\n{text}"
        );
    }
    assert_eq!(metric_value(&text, "tunneld_mapping_last_activity_timestamp_seconds", &[("port", &p)]), Some(0.0));
    let traffic = get_data(&server, "/api/stats/traffic");
    assert_eq!(traffic["mappings"][0]["last_update"], Value::Null, "{traffic}");
}
