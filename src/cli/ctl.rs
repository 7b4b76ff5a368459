//! `tunneld ctl`: the operator's command line for a running server's HTTP API, so
//! that day-to-day work needs no hand-written `curl` with a JSON body, a content
//! type and a token.
//!
//! Every subcommand is one or two API calls; the server stays the only place that
//! validates anything, and its message is printed verbatim when it refuses.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::{self, Config, Role};
use crate::core::time::format_utc;

/// An API call the server refused: its HTTP status and the envelope's message.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiRefused {
    pub status: u16,
    pub message: String,
}

/// A connection to one server's API.
pub struct Api {
    pub(super) base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    /// `--api` wins; else the config file's `api.listen` (a wildcard address is
    /// reached on loopback). The token comes from `TUNNELD_API__TOKEN` or the file,
    /// through the same loader the daemon uses, so both agree on precedence.
    pub fn from_settings(api: Option<&str>, config_file: Option<&Path>) -> anyhow::Result<Api> {
        let file = config::file_for(Role::Server, config_file);
        let config = config::merge(file, &[], Role::Server).context("cannot read the configuration")?;
        let base = match api {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => base_url(&config),
        };
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--api must be an http:// URL (got {base:?})");
        }
        let token = Some(config.api.token.expose().to_string())
            .filter(|t| !t.is_empty())
            .or_else(|| file.and_then(|f| token_from_env_file(&f.with_extension("env"))));
        let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(30)).build();
        Ok(Api { base, token, agent })
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.request("GET", path).call())
    }

    pub fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        // send_json sets `Content-Type: application/json`, which the API requires
        // of every mutating request.
        self.call(self.request("POST", path).send_json(body))
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// The envelope's `data` on success; the envelope's `message` as an error
    /// otherwise (or what went wrong on the way).
    fn call(&self, result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<Value> {
        match result {
            Ok(response) => {
                let envelope: Value = response.into_json().context("the API answered with something other than JSON")?;
                Ok(envelope.get("data").cloned().unwrap_or(Value::Null))
            }
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| text.trim().to_string());
                Err(ApiRefused { status, message }.into())
            }
            Err(ureq::Error::Transport(e)) => Err(anyhow::anyhow!("cannot reach the API at {}: {e}", self.base)),
        }
    }
}

/// The packaged units keep secrets in an `EnvironmentFile` beside the config
/// (`/etc/tunneld/server.env` for `server.toml`); an operator who can read it
/// (root) should not have to export the token by hand. `KEY=value` lines, the
/// value optionally quoted, as systemd reads them.
fn token_from_env_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().rev().find_map(|line| {
        let value = line.trim().strip_prefix(&format!("{}=", config::env_var_name("api.token")))?.trim();
        let unquoted = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
        Some(unquoted.to_string()).filter(|t| !t.is_empty())
    })
}

fn base_url(config: &Config) -> String {
    let mut addr = config.api.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    format!("http://{addr}")
}

/// `ctl list`: the mappings as a table.
pub fn list(api: &Api) -> anyhow::Result<String> {
    let data = api.get("/api/mapping/list")?;
    let mappings = data.get("mappings").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut rows = vec![vec!["PORT".to_string(), "TARGET".into(), "MODE".into(), "STATUS".into(), "CREATED".into()]];
    for m in &mappings {
        rows.push(vec![
            field(m, "source_port"),
            format!("{}:{}", text(m, "target_host"), field(m, "target_port")),
            mode(m.get("use_tunnel"), m.get("client")),
            text(m, "status"),
            m.get("created_at").and_then(Value::as_i64).map(format_utc).unwrap_or_default(),
        ]);
    }
    Ok(format!("{}{} mapping(s)\n", table(&rows), mappings.len()))
}

/// `ctl create`: one mapping; `target` is `HOST:PORT`.
pub fn create(api: &Api, port: u16, target: &str, tunnel: bool, client: Option<&str>) -> anyhow::Result<String> {
    let Some((host, target_port)) = config::split_host_port(target) else {
        bail!("target must be HOST:PORT (IPv6 as [::1]:22), got {target:?}");
    };
    let mut body = json!({"source_port": port, "target_host": host, "target_port": target_port, "use_tunnel": tunnel});
    if let Some(client) = client {
        body["client"] = json!(client);
    }
    let m = api.post("/api/mapping/create", body)?;
    Ok(format!(
        "mapping created: port {} -> {}:{} ({}), status {}\n",
        field(&m, "source_port"),
        text(&m, "target_host"),
        field(&m, "target_port"),
        mode(m.get("use_tunnel"), m.get("client")),
        text(&m, "status")
    ))
}

/// `ctl remove`.
pub fn remove(api: &Api, port: u16) -> anyhow::Result<String> {
    api.post("/api/mapping/remove", json!({"port": port}))?;
    Ok(format!("mapping on port {port} removed\n"))
}

/// `ctl events`: the newest `limit` events, newest first.
pub fn events(api: &Api, limit: u32) -> anyhow::Result<String> {
    let data = api.get(&format!("/api/events?limit={limit}"))?;
    let events = data.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut rows = vec![vec!["TIME".to_string(), "KIND".into(), "PORT".into(), "CLIENT".into(), "MESSAGE".into()]];
    for e in &events {
        rows.push(vec![
            e.get("time").and_then(Value::as_f64).map(|t| format_utc(t as i64)).unwrap_or_default(),
            text(e, "kind"),
            e.get("port").and_then(Value::as_u64).map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            e.get("client").and_then(Value::as_str).unwrap_or("-").to_string(),
            text(e, "message"),
        ]);
    }
    Ok(format!("{}{} event(s)\n", table(&rows), events.len()))
}

/// `ctl client list`.
pub fn client_list(api: &Api) -> anyhow::Result<String> {
    let data = api.get("/api/client/list")?;
    let clients = data.get("clients").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut rows =
        vec![vec!["NAME".to_string(), "STATUS".into(), "PEER".into(), "SINCE".into(), "SENT".into(), "RECEIVED".into(), "MAPPINGS".into()]];
    for c in &clients {
        let connected = c.get("connected").and_then(Value::as_bool) == Some(true);
        rows.push(vec![
            text(c, "name"),
            if connected { "connected".into() } else { "not connected".into() },
            c.get("peer").and_then(Value::as_str).unwrap_or("-").to_string(),
            c.get("connected_since").and_then(Value::as_f64).map(|t| format_utc(t as i64)).unwrap_or_else(|| "-".into()),
            human_bytes(number(c, "bytes_sent")),
            human_bytes(number(c, "bytes_received")),
            field(c, "mappings"),
        ]);
    }
    Ok(format!("{}{} client(s)\n", table(&rows), clients.len()))
}

/// `ctl client create`: prints the secret, with how to use it.
pub fn client_create(api: &Api, name: &str) -> anyhow::Result<String> {
    let data = api.post("/api/client/create", json!({"name": name}))?;
    Ok(format!(
        "client {} created. Its secret is shown only now:\n\n  {}\n\nStart the client with --name {} and this secret (client.name / client.secret).\n",
        text(&data, "name"),
        text(&data, "secret"),
        text(&data, "name"),
    ))
}

/// `ctl client remove`.
pub fn client_remove(api: &Api, name: &str, force: bool) -> anyhow::Result<String> {
    let data = api.post("/api/client/remove", json!({"name": name, "force": force}))?;
    let waiting = data.get("mappings_waiting").and_then(Value::as_array).map(Vec::len).unwrap_or(0);
    Ok(match waiting {
        0 => format!("client {name} removed\n"),
        n => format!("client {name} removed; {n} mapping(s) wait for a client of that name\n"),
    })
}

/// `ctl stats`: traffic since the daemon started, per mapping and in total.
pub fn stats(api: &Api) -> anyhow::Result<String> {
    let data = api.get("/api/stats/traffic")?;
    let mappings = data.get("mappings").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut rows = vec![vec![
        "PORT".to_string(),
        "TARGET".into(),
        "MODE".into(),
        "SENT".into(),
        "RECEIVED".into(),
        "OPEN".into(),
        "CONNS".into(),
        "ERRORS".into(),
        "LAST ACTIVITY".into(),
    ]];
    let now = data.get("timestamp").and_then(Value::as_f64).unwrap_or(0.0);
    for m in &mappings {
        rows.push(vec![
            field(m, "port"),
            format!("{}:{}", text(m, "target_host"), field(m, "target_port")),
            mode(m.get("use_tunnel"), m.get("client")),
            human_bytes(number(m, "bytes_sent")),
            human_bytes(number(m, "bytes_received")),
            field(m, "active_connections"),
            field(m, "connections_total"),
            field(m, "connect_errors"),
            match m.get("last_update").and_then(Value::as_f64) {
                Some(t) => format!("{} ago", human_duration((now - t).max(0.0))),
                None => "never".into(),
            },
        ]);
    }
    let mut out = table(&rows);
    let tunnel = data.get("tunnel").cloned().unwrap_or(Value::Null);
    let _ = writeln!(
        out,
        "total: sent {}, received {}; tunnel ({}): sent {}, received {}",
        human_bytes(number(&data, "total_sent")),
        human_bytes(number(&data, "total_received")),
        if tunnel.get("connected").and_then(Value::as_bool) == Some(true) { "connected" } else { "not connected" },
        human_bytes(number(&tunnel, "bytes_sent")),
        human_bytes(number(&tunnel, "bytes_received")),
    );
    Ok(out)
}

/// Left-aligned columns, two spaces apart.
pub(super) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().enumerate().map(|(c, cell)| format!("{cell:<width$}", width = widths[c])).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Binary units, as the monitor page shows them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub(super) fn human_duration(secs: f64) -> String {
    match secs as u64 {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

pub(super) fn mode(use_tunnel: Option<&Value>, client: Option<&Value>) -> String {
    match (use_tunnel.and_then(Value::as_bool), client.and_then(Value::as_str)) {
        (Some(true), Some(client)) => format!("tunnel:{client}"),
        (Some(true), None) => "tunnel".into(),
        _ => "direct".into(),
    }
}

pub(super) fn number(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

pub(super) fn text(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

pub(super) fn field(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
