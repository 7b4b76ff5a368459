//! systemd behaviour of the real binary: the watchdog cadence and configuration
//! reload (RELOADING=1 / READY=1, live changes, a bad file rejected).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn watchdog_pings_arrive_at_half_the_interval() {
    let server = Daemon::server_env("s", &[], &[("WATCHDOG_USEC", "400000")]);
    let start = Instant::now();
    let mut stamps = Vec::new();
    while stamps.len() < 5 {
        server.wait_for_notify("WATCHDOG=1", Duration::from_secs(5));
        stamps.push(start.elapsed());
    }
    let gaps: Vec<f64> = stamps.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!((0.15..0.3).contains(&mean), "mean gap {mean:.3} s should be about 0.2 s (half of 0.4 s): {gaps:?}");
}

#[test]
fn reload_applies_a_new_token_keeps_connections_and_rejects_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "[api]\ntoken = \"first-token-0123456\"\n").unwrap();
    let server = Daemon::server("s", &["--config", config.to_str().unwrap()]);
    let list = |token: &str| http_with_token("GET", &server.url("/api/mapping/list"), token, None).0;
    assert_eq!(list("first-token-0123456"), 200);

    // A connection open across the reload must survive it.
    let port = free_port();
    let echo = echo_server();
    let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port()});
    let (status, created) = post_with_token(&server, "/api/mapping/create", "first-token-0123456", body);
    assert_eq!(status, 200, "{created}");
    let mut open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    open.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    open.read_exact(&mut buf).unwrap();

    std::fs::write(&config, "[api]\ntoken = \"second-token-012345\"\n[server]\nheartbeat_interval_secs = 3\n").unwrap();
    server.signal("HUP");
    server.wait_for_notify("RELOADING=1", Duration::from_secs(10));
    server.wait_for_notify("READY=1", Duration::from_secs(10));
    assert_eq!(list("second-token-012345"), 200, "new token applied");
    assert_eq!(list("first-token-0123456"), 401, "old token revoked");
    assert!(server.log().contains("server.heartbeat_interval_secs"), "restart-only change reported");

    std::fs::write(&config, "[api]\ntoken = 42\n").unwrap();
    server.signal("HUP");
    let status = server.wait_for_notify("READY=1", Duration::from_secs(10));
    assert!(status.contains("reload rejected"), "{status}");
    assert_eq!(list("second-token-012345"), 200, "the running configuration stays");

    open.write_all(b"pong").unwrap();
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong", "connection survived both reloads");
}

fn tunnel_connected(server: &Daemon) -> Option<f64> {
    scrape_metric(server, "tunneld_tunnel_connected", &[])
}

#[test]
fn a_frozen_client_is_dropped_by_heartbeat_and_comes_back_when_it_thaws() {
    let (_dir, config) = config_file("[server]\nheartbeat_interval_secs = 1\n");
    let server = Daemon::server("s", &["--config", &config]);
    let client = Daemon::client(&server, "s", &[]);
    assert_eq!(tunnel_connected(&server), Some(1.0));

    // SIGSTOP keeps the TCP connection open but silences the peer: only the
    // heartbeat can tell. Three 1 s intervals, plus scheduling slack.
    client.signal("STOP");
    let started = Instant::now();
    wait_for("the server to drop the silent client", Duration::from_secs(10), || (tunnel_connected(&server) == Some(0.0)).then_some(()));
    assert!(started.elapsed() >= Duration::from_secs(2), "dropped after {:?}: too early for a 3-interval limit", started.elapsed());
    assert!(server.log().contains("silent for three heartbeat intervals"));

    client.signal("CONT");
    client.wait_for_notify("STATUS=connected", Duration::from_secs(15));
    wait_for("the tunnel to be back", Duration::from_secs(10), || (tunnel_connected(&server) == Some(1.0)).then_some(()));
}

#[test]
fn a_frozen_server_is_noticed_by_the_client() {
    let (_dir, config) = config_file("[server]\nheartbeat_interval_secs = 1\n");
    let server = Daemon::server("s", &["--config", &config]);
    let client = Daemon::client(&server, "s", &[]);
    server.signal("STOP");
    let started = Instant::now();
    client.wait_for_notify("STATUS=disconnected", Duration::from_secs(10));
    assert!(started.elapsed() >= Duration::from_secs(2), "noticed after {:?}", started.elapsed());
    assert!(client.log().contains("server silent for three heartbeat intervals"));
    server.signal("CONT");
    client.wait_for_notify("STATUS=connected", Duration::from_secs(15));
}

#[test]
fn reload_never_drops_the_token_of_an_api_listening_beyond_loopback() {
    // The API address comes from the file. The new file claims a loopback
    // listener, which makes an empty token valid on its own; but the socket bound
    // now is 0.0.0.0, so the token must stay.
    let port = free_port();
    let (dir, config) = config_file(&format!("[api]\nlisten = \"0.0.0.0:{port}\"\ntoken = \"keep-me-0123456789\"\n"));
    let tunnel = format!("127.0.0.1:{}", free_port());
    let state = dir.path().join("state").display().to_string();
    let args = ["server", "--config", &config, "--tunnel-listen", &tunnel, "--state-dir", &state, "--secret", "s"];
    let server = Daemon::with_args(&args, loopback(port));
    let unauthenticated = || http("GET", &server.url("/api/mapping/list"), None).0;
    assert_eq!(unauthenticated(), 401);

    std::fs::write(&config, format!("[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"\"\n")).unwrap();
    server.signal("HUP");
    server.wait_for_notify("READY=1", Duration::from_secs(10));
    assert_eq!(unauthenticated(), 401, "token must survive the reload");
    assert!(server.log().contains("keeping the token"), "{}", server.log());
}
