//! Calls to a daemon's HTTP API, and the mappings and clients the tests create
//! through it.
//!
//! The plain calls ([`http`], [`post`], ...) return the status and the reply and
//! never panic on a 4xx/5xx, because tests assert on those; the `get_data` /
//! `create_*` helpers assert success themselves, for set-up steps that must work.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use super::daemon::Daemon;

/// One HTTP call: its status and body, the body parsed as JSON (one that is not
/// JSON comes back as a JSON string). Panics only when the daemon cannot be
/// reached at all.
pub fn http(method: &str, url: &str, body: Option<&str>) -> (u16, Value) {
    request(method, url, None, body)
}

/// [`http`] with `Authorization: Bearer <token>`, for an API started with
/// `--api-token`.
pub fn http_with_token(method: &str, url: &str, token: &str, body: Option<&str>) -> (u16, Value) {
    request(method, url, Some(token), body)
}

fn request(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(10));
    if let Some(token) = token {
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    let res = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

/// POSTs `body` as JSON to `path`; the status and the reply envelope.
pub fn post(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    http("POST", &d.url(path), Some(&body.to_string()))
}

/// POSTs `body` byte for byte, labelled as JSON: for bodies that are not a
/// well-formed JSON value on purpose (malformed, duplicate keys, oversized),
/// which [`post`] cannot send.
pub fn post_raw(d: &Daemon, path: &str, body: &str) -> (u16, Value) {
    http("POST", &d.url(path), Some(body))
}

/// [`post`] with the API token.
pub fn post_with_token(d: &Daemon, path: &str, token: &str, body: Value) -> (u16, Value) {
    http_with_token("POST", &d.url(path), token, Some(&body.to_string()))
}

/// `data` field of a successful envelope from GET `path`.
pub fn get_data(d: &Daemon, path: &str) -> Value {
    envelope_data("GET", path, http("GET", &d.url(path), None))
}

/// [`get_data`] with the API token.
pub fn get_data_with_token(d: &Daemon, path: &str, token: &str) -> Value {
    envelope_data("GET", path, http_with_token("GET", &d.url(path), token, None))
}

fn envelope_data(method: &str, path: &str, (status, json): (u16, Value)) -> Value {
    assert_eq!(status, 200, "{method} {path}: {json}");
    assert_eq!(json["success"], true, "{method} {path}: {json}");
    json["data"].clone()
}

/// Creates a mapping through the API and asserts it succeeded; the whole envelope.
pub fn create_mapping(server: &Daemon, source_port: u16, target: SocketAddr, use_tunnel: bool) -> Value {
    let body = json!({
        "source_port": source_port,
        "target_host": target.ip().to_string(),
        "target_port": target.port(),
        "use_tunnel": use_tunnel,
    });
    let (status, json) = post(server, "/api/mapping/create", body);
    assert_eq!(status, 200, "create mapping: {json}");
    json
}

/// Creates a named tunnel client through the API and returns its secret (shown
/// only in this answer).
pub fn create_client(server: &Daemon, name: &str) -> String {
    let (status, json) = post(server, "/api/client/create", json!({ "name": name }));
    assert_eq!(status, 200, "create client {name}: {json}");
    assert_eq!(json["data"]["name"], name, "{json}");
    json["data"]["secret"].as_str().unwrap_or_else(|| panic!("create client {name}: no secret in {json}")).to_string()
}

/// Creates a tunneled mapping served by the client named `client`; returns the
/// mapping as the API shows it.
pub fn create_tunneled_mapping(server: &Daemon, source_port: u16, target: SocketAddr, client: &str) -> Value {
    let body = json!({
        "source_port": source_port,
        "target_host": target.ip().to_string(),
        "target_port": target.port(),
        "use_tunnel": true,
        "client": client,
    });
    let (status, json) = post(server, "/api/mapping/create", body);
    assert_eq!(status, 200, "create mapping for client {client}: {json}");
    json["data"].clone()
}

/// How many mappings `/api/mapping/list` counts.
pub fn mapping_count(d: &Daemon) -> u64 {
    get_data(d, "/api/mapping/list")["count"].as_u64().expect("a mapping count")
}

/// A mapping on a free port to `target` (on 127.0.0.1), direct or through the
/// tunnel, with `extra` fields (policy, caps) merged into the request; its port.
pub fn create_mapping_with(server: &Daemon, target: SocketAddr, use_tunnel: bool, extra: Value) -> u16 {
    let port = super::net::free_port();
    let mut body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(), "use_tunnel": use_tunnel});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let (status, reply) = post(server, "/api/mapping/create", body);
    assert_eq!(status, 200, "{reply}");
    port
}

/// The open connection of `port` as `/api/connections` shows it now.
pub fn open_connection(server: &Daemon, port: u16) -> Option<Value> {
    get_data(server, &format!("/api/connections?port={port}"))["connections"].as_array()?.first().cloned()
}

/// The mapping on `port` as `/api/mapping/list` shows it, if there is one.
pub fn listed_mapping(d: &Daemon, port: u16) -> Option<Value> {
    get_data(d, "/api/mapping/list")["mappings"].as_array()?.iter().find(|m| m["source_port"] == port).cloned()
}

/// The mapping on `port` as `/api/stats/traffic` counts it, if there is one.
pub fn traffic_entry(d: &Daemon, port: u16) -> Option<Value> {
    get_data(d, "/api/stats/traffic")["mappings"].as_array()?.iter().find(|m| m["port"] == port).cloned()
}
