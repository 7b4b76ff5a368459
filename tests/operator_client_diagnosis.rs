//! Issue #19, section 4: the client says what is actually wrong when it cannot
//! connect — in its log, its systemd `STATUS=` and its `/metrics` — and keeps
//! saying it once the server throttles its address: a wrong secret becomes
//! "refused for N s after failed attempts from this address" with the cause
//! kept, a wrong fingerprint stays a pin mismatch on every attempt, and a
//! server with TLS off stays "TLS off", never "older than protocol version 2".

mod common;

use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "operator-client-diagnosis-secret";

/// Failed handshakes an address may make before the server throttles it (the
/// server's `FAILURE_BURST`); after it, one more per 12 s.
const FAILURE_BURST: usize = 5;
const FAILURE_REFILL_SECS: u64 = 12;

/// The first `STATUS=` line that contains `needle`, waiting for it.
fn wait_for_status(client: &Daemon, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no STATUS= with {needle:?}\n--- client log ---\n{}", client.log());
        let msg = client.wait_for_notify("STATUS=", left);
        if let Some(line) = msg.lines().find(|l| l.starts_with("STATUS=") && l.contains(needle)) {
            return line.to_string();
        }
    }
}

/// N from "refused for N s" in `text`.
fn refused_for_secs(text: &str) -> u64 {
    let (_, after) = text.split_once("refused for ").unwrap_or_else(|| panic!("no \"refused for\" in {text}"));
    after.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no seconds in {text}"))
}

/// The client's failed attempts, as logged.
fn failures(client: &Daemon) -> Vec<String> {
    client.log().lines().filter(|l| l.contains("tunnel session failed")).map(str::to_string).collect()
}

fn client_metric(client: &Daemon, name: &str, reason: &str) -> f64 {
    scrape_metric(client, name, &[("reason", reason)]).unwrap_or_else(|| panic!("{name}{{reason={reason:?}}} not exported"))
}

#[test]
fn a_wrong_secret_then_throttled_says_for_how_long_and_keeps_the_cause() {
    let server = Daemon::server(SECRET, &[]);
    let client = Daemon::client_unconnected(&server, "not-the-secret-of-this-server", &[]);
    let first = wait_for_status(&client, "STATUS=disconnected", Duration::from_secs(10));
    assert!(first.contains("rejected authentication"), "{first}");

    // After the burst the server refuses the address unheard, and says for how long.
    let status = wait_for_status(&client, "refused for", Duration::from_secs(30));
    let secs = refused_for_secs(&status);
    assert!((1..=FAILURE_REFILL_SECS).contains(&secs), "{status}");
    assert!(status.contains("rejected authentication"), "the cause is kept: {status}");
    let log = client.log();
    let line = log.lines().find(|l| l.contains("refused for")).expect("logged");
    assert!(line.contains("ERROR") && line.contains("reason=\"auth_refused\""), "{line}");
    assert!(!log.contains("older than protocol version 2") && !log.contains("closed the connection"), "{log}");
    assert!(failures(&client).len() > FAILURE_BURST, "{log}");

    assert_eq!(client_metric(&client, "tunneld_client_last_connect_error", "auth_refused"), 1.0);
    assert_eq!(client_metric(&client, "tunneld_client_last_connect_error", "throttled"), 0.0);
    assert!(client_metric(&client, "tunneld_client_connect_failures_total", "throttled") >= 1.0);
    assert!(client_metric(&client, "tunneld_client_connect_failures_total", "auth_refused") >= FAILURE_BURST as f64);
    assert!(tunnel_sessions(&server, "throttled") >= 1.0);
}

#[test]
fn a_wrong_fingerprint_is_named_on_every_attempt_also_once_throttled() {
    let server = Daemon::server(SECRET, &[]);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let client = Daemon::client_with(server.tunnel.unwrap(), SECRET, &["--fingerprint", &wrong]);
    let status = wait_for_status(&client, "refused for", Duration::from_secs(30));
    assert!(status.contains("does not match the pinned") && status.contains(&wrong), "{status}");
    assert!((1..=FAILURE_REFILL_SECS).contains(&refused_for_secs(&status)), "{status}");

    let failed = failures(&client);
    assert!(failed.len() > FAILURE_BURST, "{failed:#?}");
    for line in &failed {
        assert!(line.contains("reason=\"pin_mismatch\"") && line.contains("does not match the pinned"), "every attempt: {line}");
        assert!(!line.contains("older than protocol version 2"), "{line}");
    }
    assert_eq!(client_metric(&client, "tunneld_client_last_connect_error", "pin_mismatch"), 1.0);
    assert!(client_metric(&client, "tunneld_client_connect_failures_total", "pin_mismatch") >= FAILURE_BURST as f64);
    assert!(client_metric(&client, "tunneld_client_connect_failures_total", "throttled") >= 1.0);
}

#[test]
fn a_server_with_tls_off_is_named_on_every_attempt_also_once_throttled() {
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__TLS", "false")]);
    let client = Daemon::client_with(server.tunnel.unwrap(), SECRET, &["--fingerprint", &format!("sha256:{}", "0".repeat(64))]);
    let status = wait_for_status(&client, "refused for", Duration::from_secs(30));
    assert!(status.contains("server.tls = false"), "{status}");
    for line in failures(&client) {
        assert!(line.contains("reason=\"server_tls_off\"") && line.contains("server.tls = false"), "every attempt: {line}");
        assert!(!line.contains("older than protocol version 2"), "{line}");
    }
    assert_eq!(client_metric(&client, "tunneld_client_last_connect_error", "server_tls_off"), 1.0);
}

#[test]
fn once_connected_the_diagnosis_is_cleared() {
    let server = Daemon::server(SECRET, &[]);
    let client = Daemon::client(&server, SECRET, &[]);
    let text = metrics_text(&client);
    for line in text.lines().filter(|l| l.starts_with("tunneld_client_last_connect_error{")) {
        assert!(line.ends_with(" 0"), "nothing is wrong: {line}");
    }
    assert_eq!(metric_value(&text, "tunneld_client_connect_failures_total", &[("reason", "unreachable")]), Some(0.0), "{text}");
}

#[test]
fn a_plain_client_of_a_tls_server_is_told_tls_is_required_also_once_throttled() {
    let server = Daemon::server(SECRET, &[]);
    let client = Daemon::client_with_env(server.tunnel.unwrap(), SECRET, &[], &[("TUNNELD_CLIENT__TLS", "false")]);
    let status = wait_for_status(&client, "throttled by the server", Duration::from_secs(30));
    assert!(status.contains("requires TLS"), "{status}");
    let failed = failures(&client);
    assert!(failed.len() > FAILURE_BURST, "{failed:#?}");
    for line in &failed {
        assert!(line.contains("reason=\"server_requires_tls\"") && line.contains("requires TLS"), "every attempt: {line}");
        assert!(!line.contains("frame of"), "no framing jargon: {line}");
    }
    assert_eq!(client_metric(&client, "tunneld_client_last_connect_error", "server_requires_tls"), 1.0);
}
