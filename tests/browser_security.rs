//! Issue #9 item 5, in a real browser (Debian chromium, headless): a page on
//! another origin cannot create mappings on the default tokenless API (the
//! `no-cors` + `text/plain` trick, and a JSON POST that needs a preflight), a
//! DNS-rebinding name is refused, and an origin listed in `api.cors_origins`
//! can read the traffic stats — preflight included.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use common::browser::Browser;
use common::tools::external_tool;
use common::*;
use serde_json::json;

/// A web server on its own port (so its own origin) that serves one blank page.
fn page_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let page = "<!doctype html><title>another site</title><p>hello";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    addr
}

#[test]
fn pages_on_other_origins_cannot_change_the_api_and_read_it_only_when_allowed() {
    let Some(chromium) = external_tool("chromium", "browser_security") else { return };
    let evil = page_server();
    let friend = page_server();
    // The default configuration: tokenless on loopback.
    let server = Daemon::server("browser-secret", &[]);
    let api = format!("http://{}", server.http);
    let echo = echo_server();
    let body = |port: u16| json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port()}).to_string();

    let mut browser = Browser::launch(&chromium, &["MAP rebound.example 127.0.0.1"], None);
    browser.open(&format!("http://{evil}/"));
    // The classic CSRF: a "simple" request the browser sends without asking.
    let no_cors = format!(
        "fetch('{api}/api/mapping/create', {{method: 'POST', mode: 'no-cors', headers: {{'Content-Type': 'text/plain'}}, body: {body:?}}}).then(() => 'sent', e => 'error: ' + e)",
        body = body(free_port())
    );
    assert_eq!(browser.eval(&no_cors), json!("sent"), "the browser sends it (opaque response)");
    // A JSON POST needs a preflight, which this origin does not pass.
    let json_post = format!(
        "fetch('{api}/api/mapping/create', {{method: 'POST', headers: {{'Content-Type': 'application/json'}}, body: {body:?}}}).then(r => 'status ' + r.status, e => 'blocked')",
        body = body(free_port())
    );
    assert_eq!(browser.eval(&json_post), json!("blocked"));
    // Nor can it read anything.
    let read = format!("fetch('{api}/api/stats/traffic').then(r => r.json()).then(j => 'read ' + j.success, e => 'blocked')");
    assert_eq!(browser.eval(&read), json!("blocked"));
    assert_eq!(mapping_count(&server), 0, "no page on another origin created a mapping");

    // DNS rebinding: the attacker's name now resolves to the API's address, so
    // its page is same-origin with the API — and refused by Host.
    browser.open(&format!("http://rebound.example:{}/health", server.http.port()));
    let rebound = format!(
        "fetch('/api/mapping/create', {{method: 'POST', headers: {{'Content-Type': 'application/json'}}, body: {body:?}}}).then(r => r.status)",
        body = body(free_port())
    );
    assert_eq!(browser.eval(&rebound), json!(403));
    assert_eq!(browser.eval("fetch('/api/mapping/list').then(r => r.status)"), json!(403));
    assert_eq!(mapping_count(&server), 0);

    // A configured origin reads the stats, with a preflight (the Authorization
    // header makes the request non-simple).
    let (_dir, config) = config_file(&format!("[api]\ncors_origins = [\"http://{friend}\"]\n"));
    let server = Daemon::server("browser-secret", &["--config", &config]);
    let api = format!("http://{}", server.http);
    browser.open(&format!("http://{friend}/"));
    let read = format!(
        "fetch('{api}/api/stats/traffic', {{headers: {{'Authorization': 'Bearer unused-on-a-tokenless-api'}}}}).then(r => r.json()).then(j => j.success && Array.isArray(j.data.mappings))"
    );
    assert_eq!(browser.eval(&read), json!(true));
}
