//! `tunneld ctl`: the operator's command line for a running server's HTTP API, so
//! that day-to-day work needs no hand-written `curl` with a JSON body, a content
//! type and a token.
//!
//! Every subcommand is one or two API calls; the server stays the only place that
//! validates anything, and its message is printed verbatim when it refuses.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::{self, Config};

/// Where a default `ctl` finds its server when no `--api` is given.
pub const PACKAGED_SERVER_CONFIG: &str = "/etc/tunneld/server.toml";

/// An API call the server refused: its HTTP status and the envelope's message.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiRefused {
    pub status: u16,
    pub message: String,
}

/// A connection to one server's API.
pub struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    /// `--api` wins; else the config file's `api.listen` (a wildcard address is
    /// reached on loopback). The token comes from `TUNNELD_API__TOKEN` or the file,
    /// through the same loader the daemon uses, so both agree on precedence.
    pub fn from_settings(api: Option<&str>, config_file: Option<&Path>) -> anyhow::Result<Api> {
        let file = config_file.or_else(|| Path::new(PACKAGED_SERVER_CONFIG).exists().then_some(Path::new(PACKAGED_SERVER_CONFIG)));
        let config = config::merge(file, &[]).context("cannot read the configuration")?;
        let base = match api {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => base_url(&config),
        };
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--api must be an http:// URL (got {base:?})");
        }
        let token =
            Some(config.api.token).filter(|t| !t.is_empty()).or_else(|| file.and_then(|f| token_from_env_file(&f.with_extension("env"))));
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

/// One `/api/stats/traffic` reading, kept to turn the next one into rates.
struct Sample {
    at: f64,
    bytes: std::collections::BTreeMap<u64, (u64, u64)>,
}

impl Sample {
    fn of(data: &Value) -> Sample {
        let bytes = data
            .get("mappings")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m.get("port")?.as_u64()?, (number(m, "bytes_sent"), number(m, "bytes_received")))))
            .collect();
        Sample { at: data.get("timestamp").and_then(Value::as_f64).unwrap_or(0.0), bytes }
    }
}

/// The `ctl top` screen for one reading: mappings ordered by current throughput,
/// rates from the daemon's own timestamps (so a slow terminal does not skew them).
fn top_screen(api_base: &str, data: &Value, previous: Option<&Sample>) -> String {
    let current = Sample::of(data);
    let elapsed = previous.map(|p| current.at - p.at).filter(|dt| *dt > 0.0);
    let rate = |port: u64, now: u64, pick: fn(&(u64, u64)) -> u64| -> f64 {
        match (elapsed, previous.and_then(|p| p.bytes.get(&port))) {
            (Some(dt), Some(before)) => now.saturating_sub(pick(before)) as f64 / dt,
            _ => 0.0,
        }
    };
    let mut lines: Vec<(f64, Vec<String>)> = data
        .get("mappings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| {
            let port = m.get("port").and_then(Value::as_u64).unwrap_or_default();
            let (sent, received) = (number(m, "bytes_sent"), number(m, "bytes_received"));
            let (up, down) = (rate(port, sent, |b| b.0), rate(port, received, |b| b.1));
            let row = vec![
                port.to_string(),
                format!("{}:{}", text(m, "target_host"), field(m, "target_port")),
                mode(m.get("use_tunnel"), m.get("client")),
                format!("{}/s", human_bytes(up as u64)),
                format!("{}/s", human_bytes(down as u64)),
                human_bytes(sent),
                human_bytes(received),
                field(m, "active_connections"),
                text(m, "status"),
            ];
            (up + down, row)
        })
        .collect();
    lines.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1[0].cmp(&b.1[0])));
    let mut rows = vec![vec![
        "PORT".to_string(),
        "TARGET".into(),
        "MODE".into(),
        "SENT/s".into(),
        "RECV/s".into(),
        "SENT".into(),
        "RECEIVED".into(),
        "OPEN".into(),
        "STATUS".into(),
    ]];
    rows.extend(lines.into_iter().map(|(_, row)| row));
    let connected = data.get("tunnel").and_then(|t| t.get("connected")).and_then(Value::as_bool) == Some(true);
    format!(
        "tunneld top — {api_base} — {} mapping(s), {} open connection(s), tunnel {} — q quits\n\n{}",
        field(data, "mapping_count"),
        field(data, "active_connections"),
        if connected { "connected" } else { "not connected" },
        table(&rows)
    )
}

/// `ctl top`: a live view refreshed every `interval` until `q` (or Ctrl-C). A
/// failed poll is shown on screen and retried, so a daemon restart does not end it.
pub fn top(api: &Api, interval: Duration) -> anyhow::Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    use crossterm::{cursor, execute, terminal};

    let mut out = std::io::stdout();
    terminal::enable_raw_mode().context("`ctl top` needs a terminal")?;
    // Restores the terminal however the loop ends (error or panic included).
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = execute!(std::io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
            let _ = terminal::disable_raw_mode();
        }
    }
    let _restore = Restore;
    execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
    let mut previous: Option<Sample> = None;
    loop {
        let screen = match api.get("/api/stats/traffic") {
            Ok(data) => {
                let screen = top_screen(&api.base, &data, previous.as_ref());
                previous = Some(Sample::of(&data));
                screen
            }
            Err(e) => format!("tunneld top — {} — q quits\n\n{e:#}\nretrying every {:.0} s\n", api.base, interval.as_secs_f64()),
        };
        // Raw mode: lines need an explicit carriage return.
        execute!(out, cursor::MoveTo(0, 0), terminal::Clear(terminal::ClearType::All))?;
        out.write_all(screen.replace('\n', "\r\n").as_bytes())?;
        out.flush()?;
        let deadline = Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(key) = event::read()? {
                let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if key.kind == KeyEventKind::Press && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c) {
                    return Ok(());
                }
            }
        }
    }
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
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

fn human_duration(secs: f64) -> String {
    match secs as u64 {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` from Unix seconds, with the history's calendar
/// arithmetic (no time zone database needed).
fn format_utc(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (year, month, day) = crate::store::history::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60, secs % 60)
}

fn mode(use_tunnel: Option<&Value>, client: Option<&Value>) -> String {
    match (use_tunnel.and_then(Value::as_bool), client.and_then(Value::as_str)) {
        (Some(true), Some(client)) => format!("tunnel:{client}"),
        (Some(true), None) => "tunnel".into(),
        _ => "direct".into(),
    }
}

fn number(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn text(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

fn field(v: &Value, key: &str) -> String {
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
    fn units_and_dates() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_795_936_660), "2026-11-29 07:17:40 UTC");
    }

    #[test]
    fn top_orders_by_current_rate() {
        let reading = |t: f64, a: u64, b: u64| {
            json!({"timestamp": t, "mapping_count": 2, "active_connections": 0, "tunnel": {"connected": false},
                   "mappings": [{"port": 1000, "bytes_sent": a, "bytes_received": 0, "target_host": "h", "target_port": 1},
                                {"port": 2000, "bytes_sent": b, "bytes_received": 0, "target_host": "h", "target_port": 2}]})
        };
        let before = Sample::of(&reading(10.0, 0, 0));
        let screen = top_screen("http://x", &reading(12.0, 2048, 4 * 1024 * 1024), Some(&before));
        let rows: Vec<&str> = screen.lines().filter(|l| l.starts_with("1000") || l.starts_with("2000")).collect();
        assert!(rows[0].starts_with("2000") && rows[0].contains("2.0 MiB/s"), "{screen}");
        assert!(rows[1].starts_with("1000") && rows[1].contains("1.0 KiB/s"), "{screen}");
    }
}
