//! The mapping API's contract: the envelope, every error case with its status and
//! message, and that what it reports is what happened.

mod common;

use std::net::TcpListener;

use common::*;
use serde_json::json;

const SECRET: &str = "api-test-secret";

/// Asserts an error envelope: status, `success: false`, a message containing
/// `needle`, and no `data`.
fn assert_error(reply: (u16, serde_json::Value), status: u16, needle: &str) {
    let (got, body) = reply;
    assert_eq!(got, status, "status for {body}");
    assert_eq!(body["success"], false, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "message {message:?} should mention {needle:?}");
    assert!(body.get("data").is_none(), "errors carry no data: {body}");
}

#[test]
fn create_rejects_bad_input_with_the_right_status_and_a_message() {
    let server = Daemon::server(SECRET, &[]);
    let api_port = server.http.port();
    let tunnel_port = server.tunnel.unwrap().port();
    let create = |body: serde_json::Value| post(&server, "/api/mapping/create", body);
    let valid = |port: u16| json!({"source_port": port, "target_host": "127.0.0.1", "target_port": 9, "use_tunnel": false});

    assert_error(post_raw(&server, "/api/mapping/create", "{not json"), 400, "malformed JSON");
    assert_error(post_raw(&server, "/api/mapping/create", "[1,2]"), 400, "JSON object");
    assert_error(create(json!({"target_host": "127.0.0.1", "target_port": 80})), 400, "source_port");
    assert_error(create(json!({"source_port": 1234, "target_port": 80})), 400, "target_host");
    assert_error(create(json!({"source_port": 1234, "target_host": "127.0.0.1"})), 400, "target_port");
    assert_error(create(json!({"source_port": 0, "target_host": "127.0.0.1", "target_port": 80})), 400, "between 1 and 65535");
    assert_error(create(json!({"source_port": 70000, "target_host": "127.0.0.1", "target_port": 80})), 400, "between 1 and 65535");
    assert_error(create(json!({"source_port": "80", "target_host": "127.0.0.1", "target_port": 80})), 400, "source_port");
    assert_error(create(json!({"source_port": 1234, "target_host": "127.0.0.1", "target_port": -1})), 400, "target_port");
    assert_error(
        create(json!({"source_port": 1234, "target_host": "127.0.0.1", "target_port": 80, "use_tunnel": "yes"})),
        400,
        "use_tunnel",
    );
    assert_error(create(valid(api_port)), 400, "API");
    assert_error(create(valid(tunnel_port)), 400, "tunnel");
    assert_error(create(json!({"source_port": 1234, "target_host": "  ", "target_port": 80})), 400, "must not be empty");
    assert_error(create(json!({"source_port": 1234, "target_host": "no-such-host.invalid", "target_port": 80})), 400, "cannot be resolved");

    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    assert_error(create(valid(taken.local_addr().unwrap().port())), 409, "in use by another process");

    let port = free_port();
    assert_eq!(create(valid(port)).0, 200);
    assert_error(create(valid(port)), 409, "already mapped");

    let huge = format!("{{\"target_host\": \"{}\"}}", "x".repeat(64 * 1024));
    assert_error(post_raw(&server, "/api/mapping/create", &huge), 413, "exceeds");

    // Nothing that failed was stored or left listening.
    let list = get_data(&server, "/api/mapping/list");
    assert_eq!(list["count"], 1, "{list}");
}

#[test]
fn remove_list_routes_and_methods() {
    let server = Daemon::server(SECRET, &[]);
    assert_error(post(&server, "/api/mapping/remove", json!({})), 400, "port");
    assert_error(post(&server, "/api/mapping/remove", json!({"port": 4242})), 404, "no mapping on port 4242");
    assert_error(http("GET", &server.url("/api/mapping/create"), None), 405, "method not allowed");
    assert_error(http("POST", &server.url("/api/mapping/list"), Some("{}")), 405, "method not allowed");
    assert_error(http("GET", &server.url("/api/nothing/here"), None), 404, "no such route");

    // An empty list is still an array.
    let list = get_data(&server, "/api/mapping/list");
    assert_eq!(list, json!({"mappings": [], "count": 0}));

    let echo = echo_server();
    let port = free_port();
    let created = create_mapping(&server, port, echo, false);
    assert_eq!(created["success"], true);
    let m = &created["data"];
    assert_eq!(m["source_port"], port);
    assert_eq!(m["target_host"], "127.0.0.1");
    assert_eq!(m["target_port"], echo.port());
    assert_eq!(m["use_tunnel"], false);
    assert_eq!(m["status"], "active");
    assert!(m["created_at"].as_i64().unwrap() > 1_600_000_000);

    let tunneled = free_port();
    let t = create_mapping(&server, tunneled, echo, true);
    assert_eq!(t["data"]["status"], "waiting_for_tunnel", "no client yet");
    let list = get_data(&server, "/api/mapping/list");
    assert_eq!(list["count"], 2);
    assert_eq!(list["mappings"][0]["source_port"], port.min(tunneled));

    let (status, body) = post(&server, "/api/mapping/remove", json!({"port": port}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!({"port": port, "protocol": "tcp"}));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "listener closed on remove");
    // The port can be mapped again at once.
    create_mapping(&server, port, echo, false);
    assert_eq!(roundtrip(loopback(port), b"again"), b"again");
}

#[test]
fn health_reports_the_tunnel_state() {
    let server = Daemon::server(SECRET, &[]);
    let (status, health) = http("GET", &server.url("/health"), None);
    assert_eq!(status, 200);
    assert_eq!(health, json!({"status": "ok", "reasons": [], "tunnel_enabled": true, "tunnel_connected": false}));
    let _client = Daemon::client(&server, SECRET, &[]);
    assert_eq!(http("GET", &server.url("/health"), None).1["tunnel_connected"], true);
}

#[test]
fn api_token_guards_the_api_but_not_the_page_health_or_metrics() {
    let server = Daemon::server(SECRET, &["--api-token", "t0ken+/=t0ken+/="]);
    assert_error(http("GET", &server.url("/api/mapping/list"), None), 401, "token required");
    assert_eq!(http_with_token("GET", &server.url("/api/mapping/list"), "nope", None).0, 401);
    assert_eq!(http_with_token("GET", &server.url("/api/mapping/list"), "t0ken+/=t0ken+/=", None).0, 200, "authorized");
    assert_eq!(http("GET", &server.url("/api/stats/traffic?token=t0ken%2B%2F%3Dt0ken%2B%2F%3D"), None).0, 200);
    assert_eq!(http("GET", &server.url("/api/stats/monitor"), None).0, 200);
    assert_eq!(http("GET", &server.url("/health"), None).0, 200);
    assert_eq!(http("GET", &server.url("/metrics"), None).0, 200);
}

#[test]
fn a_non_loopback_api_without_a_token_is_refused_before_binding() {
    let out = std::process::Command::new(BIN)
        .args(["server", "--api-listen", "0.0.0.0:0", "--state-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.token"), "{err}");
}
