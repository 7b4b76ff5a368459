//! Issue #9: the API's rules (items 5, 9–12 without a browser), reloads (8),
//! state-database faults (4, 16), visibility of unbindable mappings (13) and the
//! restore / check-config reports (17).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

const SECRET: &str = "hardening-api-secret";
const TOKEN: &str = "a-token-of-enough-length";

/// A raw HTTP/1.1 request, so tests control every header (`Host` included).
/// Returns the status and the response head (lower-cased header names).
fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    (status, head)
}

fn get_with_host(server: &Daemon, path: &str, host: &str) -> u16 {
    raw(server.http, &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")).0
}

#[test]
fn api_refuses_foreign_hosts_origins_and_non_json_bodies() {
    // The default configuration: tokenless on loopback.
    let server = Daemon::server(SECRET, &[]);
    let own = server.http.to_string();
    // DNS rebinding: a page under a foreign name reaches this address.
    assert_eq!(get_with_host(&server, "/api/mapping/list", "evil.example"), 403);
    assert_eq!(get_with_host(&server, "/metrics", &format!("evil.example:{}", server.http.port())), 403);
    assert_eq!(get_with_host(&server, "/api/mapping/list", &own), 200);
    assert_eq!(get_with_host(&server, "/api/mapping/list", &format!("localhost:{}", server.http.port())), 200);
    assert_eq!(get_with_host(&server, "/api/mapping/list", "tunnel.example"), 403);

    let body = json!({"source_port": free_port(), "target_host": "127.0.0.1", "target_port": echo_server().port()}).to_string();
    let post = |headers: &str| {
        raw(
            server.http,
            &format!(
                "POST /api/mapping/create HTTP/1.1\r\nHost: {own}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .0
    };
    // The cross-site form/no-cors shapes: no JSON content type.
    assert_eq!(post("Content-Type: text/plain\r\n"), 415);
    assert_eq!(post("Content-Type: application/x-www-form-urlencoded\r\n"), 415);
    assert_eq!(post(""), 415);
    // JSON from a foreign page is refused by its Origin.
    assert_eq!(post("Content-Type: application/json\r\nOrigin: http://evil.example\r\n"), 403);
    assert_eq!(post("Content-Type: application/json\r\nOrigin: null\r\n"), 403);
    assert_eq!(mapping_count(&server), 0, "nothing was created");
    // The API's own page (same origin) may.
    assert_eq!(post(&format!("Content-Type: application/json; charset=utf-8\r\nOrigin: http://{own}\r\n")), 200);
}

#[test]
fn configured_hosts_and_cors_origins_are_allowed() {
    let cors = "http://127.0.0.1:3000";
    let (_dir, config) = config_file(&format!("[api]\nallowed_hosts = [\"tunnel.example\"]\ncors_origins = [\"{cors}\"]\n"));
    let server = Daemon::server(SECRET, &["--config", &config]);
    let own = server.http.to_string();
    assert_eq!(get_with_host(&server, "/api/mapping/list", "tunnel.example"), 200);
    assert_eq!(get_with_host(&server, "/api/mapping/list", "TUNNEL.example:8080"), 200);
    assert_eq!(get_with_host(&server, "/api/mapping/list", "other.example"), 403);

    // CORS: a configured origin reads, with a preflight answer; others get nothing.
    let (status, head) =
        raw(server.http, &format!("GET /api/stats/traffic HTTP/1.1\r\nHost: {own}\r\nOrigin: {cors}\r\nConnection: close\r\n\r\n"));
    assert_eq!(status, 200);
    assert!(head.contains(&format!("access-control-allow-origin: {cors}")), "{head}");
    let (status, head) = raw(
        server.http,
        &format!("GET /api/stats/traffic HTTP/1.1\r\nHost: {own}\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    let preflight = |origin: &str| {
        raw(server.http, &format!("OPTIONS /api/mapping/create HTTP/1.1\r\nHost: {own}\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type, authorization\r\nConnection: close\r\n\r\n"))
    };
    let (status, head) = preflight(cors);
    assert_eq!(status, 204, "{head}");
    assert!(head.contains("access-control-allow-headers: authorization, content-type"), "{head}");
    assert!(head.contains("access-control-allow-methods: get, post"), "{head}");
    assert_eq!(preflight("http://evil.example").0, 403);
}

#[test]
fn unknown_and_duplicate_json_keys_are_refused() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    let target = echo_server().port();
    let (status, body) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target, "use_tunel": true}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("unknown field `use_tunel`"), "{body}");
    let duplicate =
        format!(r#"{{"source_port": {port}, "source_port": {}, "target_host": "127.0.0.1", "target_port": {target}}}"#, free_port());
    let (status, body) = post_raw(&server, "/api/mapping/create", &duplicate);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("duplicate key `source_port`"), "{body}");
    let (status, body) = post(&server, "/api/mapping/remove", json!({"port": port, "force": true}));
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("unknown field `force`"), "{body}");
    assert_eq!(mapping_count(&server), 0);
}

#[test]
fn ipv4_mapped_loopback_counts_as_loopback() {
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let listen = format!("[::ffff:127.0.0.1]:{port}");
    let tunnel = format!("127.0.0.1:{}", free_port());
    let state_dir = state.path().display().to_string();
    let server =
        Daemon::with_args(&["server", "--api-listen", &listen, "--tunnel-listen", &tunnel, "--state-dir", &state_dir], loopback(port));
    assert_eq!(http("GET", &server.url("/health"), None).0, 200, "started without a token, as on 127.0.0.1");
}

#[test]
fn bidi_and_zero_width_characters_are_refused_in_target_hosts() {
    let server = Daemon::server(SECRET, &[]);
    for host in ["exa\u{202E}lpmoc.example", "inter\u{200B}nal.example", "\u{2066}db.lan\u{2069}", "b\u{fc}cher.example"] {
        let body = json!({"source_port": free_port(), "target_host": host, "target_port": 80, "use_tunnel": true});
        let (status, reply) = post(&server, "/api/mapping/create", body);
        assert_eq!(status, 400, "{host:?}: {reply}");
        assert!(reply["message"].as_str().unwrap().contains("not a valid host name"), "{reply}");
    }
    let body = json!({"source_port": free_port(), "target_host": "xn--bcher-kva.example", "target_port": 80, "use_tunnel": true});
    assert_eq!(post(&server, "/api/mapping/create", body).0, 200, "punycode is fine");
}

/// Runs the daemon expecting it to exit on its own; one that is still running
/// after 20 s (it started when it should not have) is killed and reported as
/// exit code `None`.
fn start_failure(args: &[&str]) -> (Option<i32>, String) {
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .stdout(std::process::Stdio::null())
        .stderr(stderr.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(stderr.path()).unwrap_or_default())
}

#[test]
fn whitespace_and_short_api_tokens_are_refused_at_start() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap();
    for (listen, token) in [("0.0.0.0:0", " "), ("127.0.0.1:0", "short"), ("127.0.0.1:0", " a-token-of-enough-length ")] {
        let (code, err) =
            start_failure(&["server", "--api-listen", listen, "--tunnel-listen", "127.0.0.1:0", "--state-dir", dir, "--api-token", token]);
        assert_eq!(code, Some(2), "{token:?}: {err}");
        assert!(err.contains("api.token") && err.contains("at least 16 characters"), "{err}");
    }
}

#[test]
fn metrics_token_is_optional_and_enforced_when_required() {
    let (_dir, config) = config_file("[api]\nmetrics_token_required = true\n");
    let server = Daemon::server(SECRET, &["--config", &config, "--api-token", TOKEN]);
    assert_eq!(http("GET", &server.url("/metrics"), None).0, 401);
    let authorized = ureq::get(&server.url("/metrics")).set("Authorization", &format!("Bearer {TOKEN}")).call().unwrap();
    assert!(authorized.into_string().unwrap().contains("tunneld_build_info"));
    let open = Daemon::server(SECRET, &["--api-token", TOKEN]);
    assert_eq!(http("GET", &open.url("/metrics"), None).0, 200, "open by default, for scrapers");
    let (code, err) = start_failure(&["check-config", "--config", &config, "server"]);
    assert_eq!(code, Some(2), "required without a token is refused: {err}");
    assert!(err.contains("api.metrics_token_required"), "{err}");
}

#[test]
fn reload_refuses_an_empty_file_and_warns_when_auth_is_switched_off() {
    let (_dir, config) = config_file(&format!("[api]\ntoken = \"{TOKEN}\"\n"));
    let server = Daemon::server(SECRET, &["--config", &config]);
    let unauthenticated = || http("GET", &server.url("/api/mapping/list"), None).0;
    assert_eq!(unauthenticated(), 401);
    std::fs::write(&config, "").unwrap();
    server.signal("HUP");
    let status = server.wait_for_notify("READY=1", Duration::from_secs(10));
    assert!(status.contains("reload rejected"), "{status}");
    assert_eq!(unauthenticated(), 401, "an empty file must not drop the token");
    assert!(server.log().contains("is empty"), "{}", server.log());

    std::fs::write(&config, "[log]\nlevel = \"info\"\n").unwrap();
    server.signal("HUP");
    server.wait_for_notify("READY=1", Duration::from_secs(10));
    assert_eq!(unauthenticated(), 200, "a deliberate change applies");
    let log = server.log();
    let line = log.lines().find(|l| l.contains("no longer asks for authentication")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("WARN"), "{line}");
}

#[test]
fn the_state_database_keeps_no_shared_memory_file_to_fault_on() {
    let server = Daemon::server(SECRET, &[]);
    create_mapping(&server, free_port(), echo_server(), false);
    let shm = server.state_dir.join("tunneld.db-shm");
    // The fault: the shared-memory file shrinks under the daemon (a full disk
    // does the same to a write). Mapped memory beyond the end is SIGBUS.
    if shm.exists() {
        std::fs::OpenOptions::new().write(true).open(&shm).unwrap().set_len(0).unwrap();
    }
    let (status, body) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": free_port(), "target_host": "127.0.0.1", "target_port": echo_server().port()}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(mapping_count(&server), 2);
    assert!(!shm.exists(), "WAL index in process memory, no -shm file");
}

#[test]
fn a_corrupt_database_is_named_once_with_what_to_do() {
    let state = tempfile::tempdir().unwrap();
    let db = state.path().join("tunneld.db");
    std::fs::write(&db, vec![b'#'; 16 * 1024]).unwrap();
    let (code, err) = start_failure(&[
        "server",
        "--api-listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "127.0.0.1:0",
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&db.display().to_string()), "names the file: {err}");
    assert!(err.contains("move the file aside"), "says what to do: {err}");
    assert_eq!(err.matches("not a database").count(), 1, "said once: {err}");
}

/// Stops `server`, changes its database behind its back, and moves the state
/// dir somewhere that outlives the daemon's own temp dir.
fn tamper(mut server: Daemon, sql: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    server.terminate();
    let conn = rusqlite::Connection::open(server.state_dir.join("tunneld.db")).unwrap();
    conn.execute_batch(sql).unwrap();
    drop(conn);
    let keep = tempfile::tempdir().unwrap();
    let state = keep.path().join("state");
    std::fs::rename(&server.state_dir, &state).unwrap();
    (keep, state)
}

#[test]
fn a_failed_remove_says_remove_names_the_file_and_logs_the_500() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    let (_keep, state) =
        tamper(server, "CREATE TRIGGER keep_rows BEFORE DELETE ON mappings BEGIN SELECT RAISE(ABORT, 'rows are kept'); END;");
    let server = Daemon::server_with_state(&state, SECRET, &[]);
    let (status, body) = post(&server, "/api/mapping/remove", json!({"port": port}));
    assert_eq!(status, 500, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(&format!("could not remove the mapping on port {port}")), "{message}");
    assert!(message.contains(&state.join("tunneld.db").display().to_string()), "{message}");
    let log = server.log();
    assert_eq!(log.lines().filter(|l| l.contains("API request failed") && l.contains("rows are kept")).count(), 1, "{log}");
}

#[test]
fn a_bad_stored_row_names_the_file() {
    let server = Daemon::server(SECRET, &[]);
    create_mapping(&server, free_port(), echo_server(), false);
    let (_keep, state) =
        tamper(server, "PRAGMA ignore_check_constraints = ON; INSERT INTO mappings (source_port, target_host, target_port, use_tunnel, created_at) VALUES (70000, '127.0.0.1', 80, 0, 0);");
    let (code, err) =
        start_failure(&["server", "--api-listen", "127.0.0.1:0", "--tunnel-listen", "127.0.0.1:0", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&state.join("tunneld.db").display().to_string()) && err.contains("invalid port 70000"), "{err}");
}

#[test]
fn an_unbindable_mapping_is_down_in_metrics_and_degrades_health() {
    let mut server = Daemon::server(SECRET, &[]);
    let (blocked, fine) = (free_port(), free_port());
    let echo = echo_server();
    create_mapping(&server, blocked, echo, false);
    create_mapping(&server, fine, echo, false);
    server.terminate();
    let blocker = TcpListener::bind(("0.0.0.0", blocked)).expect("take the mapping's port");
    let server = Daemon::server_with_state(&server.state_dir.clone(), SECRET, &[]);
    // Item 17: the restore line counts the failed mapping apart.
    assert!(server.log().contains("restored=1 failed=1"), "{}", server.log());
    let b = blocked.to_string();
    let text = metrics_text(&server);
    assert_eq!(metric_value(&text, "tunneld_mapping_up", &[("port", &b)]), Some(0.0), "{text}");
    assert_eq!(metric_value(&text, "tunneld_mapping_up", &[("port", &fine.to_string())]), Some(1.0));
    assert_eq!(
        metric_value(&text, "tunneld_mapping_info", &[("port", &b), ("target", &echo.to_string()), ("mode", "direct")]),
        Some(1.0),
        "{text}"
    );
    let (_, health) = http("GET", &server.url("/health"), None);
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["reasons"][0].as_str().unwrap().contains(&format!("port {blocked}")), "{health}");
    drop(blocker);
    wait_for("the mapping to bind its port", Duration::from_secs(30), || {
        scrape_metric(&server, "tunneld_mapping_up", &[("port", &b)]).filter(|v| *v == 1.0)
    });
    assert_eq!(http("GET", &server.url("/health"), None).1["status"], "ok");
}

#[test]
fn check_config_prints_the_state_dir() {
    let out = Command::new(BIN).args(["check-config", "server"]).env_remove("STATE_DIRECTORY").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("state_dir = \"./data\""), "{text}");
}
