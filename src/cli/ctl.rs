//! `tunneld ctl`: the operator's command line for a running server's HTTP API, so
//! that day-to-day work needs no hand-written `curl` with a JSON body, a content
//! type and a token.
//!
//! Every subcommand is one or two API calls; the server stays the only place that
//! validates anything, and its message is printed verbatim when it refuses.
//! Requests and answers are the API's own contract types, so `ctl` and the
//! server cannot drift apart field by field.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;

use super::args::PolicyArgs;
use super::untrusted::{make_printable, printable_message, read_bounded, read_prefix, MAX_ANSWER_BYTES, MAX_ERROR_BYTES};
use crate::api::contract::{
    ClientCreated, ClientList, ClientRemoved, CreateClient, CreateMapping, Envelope, ErrorCode, EventList, Mapping, MappingHealth,
    MappingList, MappingRemoved, RemoveClient, RemoveMapping, TrafficReport, UpdateMapping,
};
use crate::config::{self, Config, Role};
use crate::core::protocol::MappingKey;
use crate::core::time::format_utc;
use crate::net::proxy_header::ProxyVersion;
use crate::policy::{Balance, Cidr, QuotaAction, QuotaPeriod};

/// An API call the server refused: its HTTP status, the envelope's message and
/// its machine-readable `code`, when it has one.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub(super) struct ApiRefused {
    pub status: u16,
    pub message: String,
    pub code: Option<ErrorCode>,
}

/// Where `ctl` found the API token, to say which one was refused.
#[derive(Debug, Clone)]
enum TokenSource {
    Flag,
    Environment,
    ConfigFile(PathBuf),
    EnvFile(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            TokenSource::Flag => f.write_str("--token"),
            TokenSource::Environment => write!(f, "{}", config::env_var_name("api.token")),
            TokenSource::ConfigFile(path) => write!(f, "api.token in {}", path.display()),
            TokenSource::EnvFile(path) => write!(f, "{} in {}", config::env_var_name("api.token"), path.display()),
        }
    }
}

/// A connection to one server's API.
pub(super) struct Api {
    pub(super) base: String,
    token: Option<(String, TokenSource)>,
    /// The config file read, to name it in advice.
    config_file: PathBuf,
    agent: ureq::Agent,
}

impl Api {
    /// `--api` wins (already checked and made a URL by the flag's parser); else
    /// the config file's `api.listen` (a wildcard address is reached on
    /// loopback). The token: `--token`, else `TUNNELD_API__TOKEN` or the file,
    /// through the same loader the daemon uses so both agree on precedence, else
    /// the env file beside it.
    pub(super) fn from_settings(api: Option<&str>, config_file: Option<&Path>, token: Option<&str>) -> anyhow::Result<Api> {
        let file = config::file_for(Role::Server, config_file);
        let config = config::merge(file, &[], Role::Server).context("cannot read the configuration")?;
        let base = match api {
            Some(url) => url.to_string(),
            None => base_url(&config),
        };
        let from_config = Some(config.api.token.expose().to_string()).filter(|t| !t.is_empty()).map(|t| {
            let from_env = std::env::var(config::env_var_name("api.token")).is_ok_and(|v| !v.is_empty());
            let source = match file {
                Some(path) if !from_env => TokenSource::ConfigFile(path.to_path_buf()),
                _ => TokenSource::Environment,
            };
            (t, source)
        });
        let token = token.map(|t| (t.to_string(), TokenSource::Flag)).or(from_config).or_else(|| {
            let env_file = file?.with_extension("env");
            token_from_env_file(&env_file).map(|t| (t, TokenSource::EnvFile(env_file)))
        });
        let config_file = file.unwrap_or(config::default_file(Role::Server)).to_path_buf();
        let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5)).timeout(Duration::from_secs(30)).build();
        Ok(Api { base, token, config_file, agent })
    }

    /// `GET path`: the answer's `data`.
    pub(super) fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(self.request("GET", path).call())
    }

    /// `POST path` with `body` as JSON: the answer's `data`.
    pub(super) fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> anyhow::Result<T> {
        // send_json sets `Content-Type: application/json`, which the API requires
        // of every mutating request.
        self.call(self.request("POST", path).send_json(body))
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some((token, _)) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// The envelope's `data` on success; the envelope's `message` as an error
    /// otherwise (or what went wrong on the way).
    fn call<T: DeserializeOwned>(&self, result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<T> {
        match result {
            Ok(response) => {
                let body = read_bounded(response.into_reader(), MAX_ANSWER_BYTES)
                    .context("cannot read the API's answer")?
                    .ok_or_else(|| anyhow!("the API's answer is larger than {} MiB; not reading it", MAX_ANSWER_BYTES >> 20))?;
                let mut answer: serde_json::Value = serde_json::from_slice(&body).context("the API's answer is not JSON")?;
                make_printable(&mut answer);
                let envelope: Envelope<T> = serde_json::from_value(answer).context("cannot read the API's answer")?;
                envelope.data.ok_or_else(|| anyhow!("the API answered without data: {}", envelope.message))
            }
            Err(ureq::Error::Status(status, response)) => {
                let reason = printable_message(response.status_text());
                // A body cut short is no envelope, but its start still says something.
                let body = read_prefix(response.into_reader(), MAX_ERROR_BYTES).unwrap_or_default();
                let text = String::from_utf8_lossy(&body);
                let (message, code) = match serde_json::from_str::<Envelope<IgnoredAny>>(&text) {
                    Ok(envelope) => (printable_message(&envelope.message), envelope.code),
                    Err(_) => (printable_message(&text), None),
                };
                let message = if message.is_empty() { format!("the API refused without a message: {status} {reason}") } else { message };
                let message = self.token_advice(code).unwrap_or(message);
                Err(ApiRefused { status, message, code }.into())
            }
            Err(ureq::Error::Transport(e)) => Err(anyhow::anyhow!("cannot reach the API at {}: {e}", self.base)),
        }
    }
}

impl Api {
    /// A refused token, said in ctl's own terms: its flag, variable and file
    /// (the API's words name an HTTP header).
    fn token_advice(&self, code: Option<ErrorCode>) -> Option<String> {
        let ways =
            format!("pass --token TOKEN, or set {} or api.token in {}", config::env_var_name("api.token"), self.config_file.display());
        match code? {
            ErrorCode::TokenRequired => Some(format!("API token required: {ways}")),
            ErrorCode::TokenInvalid => Some(match &self.token {
                Some((_, source)) => format!("invalid API token (the one from {source}): {ways}"),
                None => format!("invalid API token: {ways}"),
            }),
            _ => None,
        }
    }
}

/// The API's refusal code of `error`, when it is one.
fn refusal_code(error: &anyhow::Error) -> Option<ErrorCode> {
    error.downcast_ref::<ApiRefused>().and_then(|refused| refused.code)
}

/// `error` (a refusal) said as `message`, keeping its HTTP status and code.
fn rephrase(error: anyhow::Error, message: String) -> anyhow::Error {
    match error.downcast::<ApiRefused>() {
        Ok(refused) => ApiRefused { message, ..refused }.into(),
        Err(other) => other.context(message),
    }
}

/// "no client named X", with the closest existing name and, where it helps,
/// how to create it with ctl; `error` is the API's refusal.
fn unknown_client(api: &Api, error: anyhow::Error, name: &str, how_to_create: bool) -> anyhow::Error {
    let names: Vec<String> =
        api.get::<ClientList>("/api/client/list").map(|l| l.clients.into_iter().map(|c| c.name).collect()).unwrap_or_default();
    let mut message = format!("no client named {name:?}");
    if let Some(closest) = closest_name(name, &names) {
        let _ = write!(message, "; did you mean {closest:?}?");
    } else if !names.is_empty() {
        let _ = write!(message, " (clients: {})", names.join(", "));
    }
    if how_to_create {
        let _ = write!(message, ". To create it: tunneld ctl client create {name}");
    }
    rephrase(error, message)
}

/// The name in `names` nearest to `typed` (at most two edits away).
fn closest_name<'a>(typed: &str, names: &'a [String]) -> Option<&'a str> {
    names.iter().map(|n| (edit_distance(typed, n), n)).filter(|(d, _)| *d <= 2).min_by_key(|(d, _)| *d).map(|(_, n)| n.as_str())
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
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
    format!("http://{}", config::reachable_here(config.api.listen))
}

/// `ctl list`: the mappings as a table, with why each one that is not `ok`
/// is not, under it (`HEALTH` is `-` from a server too old to report it).
pub(super) fn list(api: &Api) -> anyhow::Result<String> {
    let MappingList { mappings, .. } = api.get("/api/mapping/list")?;
    let mut rows = vec![vec![
        "PORT".to_string(),
        "PROTO".into(),
        "TARGET".into(),
        "MODE".into(),
        "STATUS".into(),
        "HEALTH".into(),
        "CREATED".into(),
        "SOURCE".into(),
        "DESCRIPTION".into(),
    ]];
    let mut reasons = String::new();
    for m in &mappings {
        rows.push(vec![
            m.source_port.to_string(),
            m.protocol.to_string(),
            format!("{}:{}", m.target_host, m.target_port),
            with_proxy_protocol(list_mode(m), m.proxy_protocol),
            m.status.to_string(),
            m.health.map_or("-", MappingHealth::as_str).to_string(),
            format_utc(m.created_at),
            m.source.as_str().to_string(),
            m.description.clone().unwrap_or_default(),
        ]);
        if let Some(health) = m.health.filter(|h| *h != MappingHealth::Ok) {
            let _ = writeln!(reasons, "port {} {}: {}", m.source_port, health.as_str(), m.health_reason);
        }
    }
    let groups = if mappings.iter().any(|m| m.clients.len() > 1) { "(* the clients of a group that take new visitors now)\n" } else { "" };
    Ok(format!("{}{} mapping(s)\n{groups}{reasons}", table(&rows), mappings.len()))
}

/// `ctl list`'s MODE: `direct`, `tunnel:NAME`, or for a group of several
/// clients `tunnel:a*,b failover`, `*` marking those that take new visitors now.
fn list_mode(m: &Mapping) -> String {
    if m.clients.len() < 2 {
        return mode(m.use_tunnel, m.client.as_deref());
    }
    let serving = |name: &str| m.members.iter().any(|c| c.client == name && c.serving);
    let names: Vec<String> = m.clients.iter().map(|c| if serving(c) { format!("{c}*") } else { c.clone() }).collect();
    let balance = m.balance.map_or("", |b| b.as_str());
    format!("tunnel:{} {balance}", names.join(","))
}

/// A mapping's `health` (and `health_reason`) in a list or traffic JSON, when
/// the server reports one.
pub(super) fn health_of(mapping: &serde_json::Value) -> Option<String> {
    let health = mapping.get("health")?.as_str()?;
    Some(match mapping.get("health_reason").and_then(|r| r.as_str()).filter(|r| !r.is_empty() && health != "ok") {
        Some(reason) => format!("{health}: {reason}"),
        None => health.to_string(),
    })
}

/// `ctl create`: one mapping; `target` is `HOST:PORT`.
pub(super) fn create(
    api: &Api,
    key: MappingKey,
    target: &str,
    tunnel: bool,
    clients: &[String],
    balance: Option<&str>,
    policy: PolicyArgs,
) -> anyhow::Result<String> {
    let Some((host, target_port)) = config::split_host_port(target) else {
        bail!("target must be HOST:PORT (IPv6 as [::1]:22), got {target:?}");
    };
    let balance = match balance {
        Some(mode) => Some(
            serde_json::from_value::<Balance>(serde_json::Value::String(mode.to_string()))
                .map_err(|_| anyhow!("--balance must be failover, round_robin or least_connections, got {mode:?}"))?,
        ),
        None => None,
    };
    // One client is the `client` it always was; several are a group.
    let (client, group) = match clients {
        [one] => (Some(one.as_str()), None),
        [] => (None, None),
        several => (None, Some(several.to_vec())),
    };
    let PolicyArgs { description, bandwidth_limit, quota, allow, deny, proxy_protocol } = policy;
    let request = CreateMapping {
        source_port: key.port,
        protocol: key.protocol,
        target_host: host.to_string(),
        target_port,
        use_tunnel: tunnel,
        client: client.map(str::to_string),
        clients: group,
        balance,
        description: description.map(Some),
        bandwidth_limit: bandwidth_limit.map(Some),
        quota: quota.map(Some),
        allow: allow.map(Some),
        deny: deny.map(Some),
        proxy_protocol: proxy_protocol.map(Some),
        ..CreateMapping::default()
    };
    let m: Mapping = api.post("/api/mapping/create", &request).map_err(|e| match (refusal_code(&e), client) {
        (Some(ErrorCode::UnknownClient), Some(name)) => unknown_client(api, e, name, true),
        _ => e,
    })?;
    Ok(format!("mapping created: port {} -> {}:{} ({}), status {}\n", m.source_port, m.target_host, m.target_port, list_mode(&m), m.status))
}

/// What `ctl update` removes: one flag per policy field.
pub(super) struct Removals {
    pub(super) description: bool,
    pub(super) bandwidth_limit: bool,
    pub(super) quota: bool,
    pub(super) allow: bool,
    pub(super) deny: bool,
    pub(super) proxy_protocol: bool,
}

/// `ctl update`: the fields given are set, those named in `remove` removed, the
/// rest left as they are (absent from the request). Prints the policy stored.
pub(super) fn update(api: &Api, key: MappingKey, set: PolicyArgs, remove: Removals) -> anyhow::Result<String> {
    /// `Some(Some(v))` sets, `Some(None)` (`null`) removes, `None` keeps.
    fn change<T>(value: Option<T>, remove: bool) -> Option<Option<T>> {
        if remove {
            Some(None)
        } else {
            value.map(Some)
        }
    }
    let request = UpdateMapping {
        port: key.port,
        protocol: key.protocol,
        description: change(set.description, remove.description),
        bandwidth_limit: change(set.bandwidth_limit, remove.bandwidth_limit),
        quota: change(set.quota, remove.quota),
        allow: change(set.allow, remove.allow),
        deny: change(set.deny, remove.deny),
        proxy_protocol: change(set.proxy_protocol, remove.proxy_protocol),
        ..UpdateMapping::default()
    };
    let m: Mapping = api.post("/api/mapping/update", &request)?;
    let cidrs =
        |list: &[Cidr]| if list.is_empty() { "-".to_string() } else { list.iter().map(Cidr::to_string).collect::<Vec<_>>().join(", ") };
    let rows = vec![
        vec!["  description".to_string(), m.description.clone().unwrap_or_else(|| "-".into())],
        vec!["  bandwidth limit".into(), m.bandwidth_limit.map(exact_rate).unwrap_or_else(|| "-".into())],
        vec![
            "  quota".into(),
            match m.quota {
                Some(q) => format!(
                    "{} B ({}) per {}, then {}",
                    q.bytes,
                    human_bytes(q.bytes),
                    match q.period {
                        QuotaPeriod::Day => "day",
                        QuotaPeriod::Month => "month",
                    },
                    match q.action {
                        QuotaAction::Alert => "alert",
                        QuotaAction::Block => "block",
                    }
                ),
                None => "-".into(),
            },
        ],
        vec!["  allow".into(), cidrs(&m.allow)],
        vec!["  deny".into(), cidrs(&m.deny)],
        vec!["  proxy protocol".into(), m.proxy_protocol.map_or("-", ProxyVersion::as_str).into()],
    ];
    Ok(format!("mapping on port {} updated:\n{}", m.source_port, table(&rows)))
}

/// A rate as stored, and in the units people read it in.
fn exact_rate(bytes_per_second: u64) -> String {
    let mbit = bytes_per_second as f64 * 8.0 / 1e6;
    format!("{bytes_per_second} B/s ({}/s, {mbit:.1} Mbit/s)", human_bytes(bytes_per_second))
}

/// `ctl remove`.
pub(super) fn remove(api: &Api, key: MappingKey) -> anyhow::Result<String> {
    let MappingRemoved { port, protocol } = api.post("/api/mapping/remove", &RemoveMapping { port: key.port, protocol: key.protocol })?;
    Ok(format!("mapping on port {} removed\n", MappingKey { port, protocol }))
}

/// `ctl events`: the newest `limit` events, newest first.
pub(super) fn events(api: &Api, limit: u32) -> anyhow::Result<String> {
    let EventList { events, .. } = api.get(&format!("/api/events?limit={limit}"))?;
    let mut rows = vec![vec!["TIME".to_string(), "KIND".into(), "PORT".into(), "CLIENT".into(), "MESSAGE".into()]];
    for e in &events {
        rows.push(vec![
            format_utc(e.time as i64),
            e.kind.clone(),
            e.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            e.client.clone().unwrap_or_else(|| "-".into()),
            e.message.clone(),
        ]);
    }
    Ok(format!("{}{} event(s)\n", table(&rows), events.len()))
}

/// `ctl client list`.
pub(super) fn client_list(api: &Api) -> anyhow::Result<String> {
    let ClientList { clients, .. } = api.get("/api/client/list")?;
    let mut rows = vec![vec![
        "NAME".to_string(),
        "SOURCE".into(),
        "STATUS".into(),
        "PEER".into(),
        "SINCE".into(),
        "RTT".into(),
        "UDP".into(),
        "SENT".into(),
        "RECEIVED".into(),
        "MAPPINGS".into(),
    ]];
    for c in &clients {
        rows.push(vec![
            c.name.clone(),
            c.source.as_str().to_string(),
            if c.connected { "connected".into() } else { "not connected".into() },
            c.peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.connected_since.map(|t| format_utc(t as i64)).unwrap_or_else(|| "-".into()),
            c.rtt_seconds.map(human_latency).unwrap_or_else(|| "-".into()),
            c.udp_transport.clone().unwrap_or_else(|| "-".into()),
            human_bytes(c.bytes_sent),
            human_bytes(c.bytes_received),
            c.mappings.to_string(),
        ]);
    }
    Ok(format!("{}{} client(s)\n", table(&rows), clients.len()))
}

/// A short time for a table: `85 µs`, `12.3 ms`, `152 ms`, `1.25 s`.
fn human_latency(seconds: f64) -> String {
    match seconds {
        s if s < 0.001 => format!("{:.0} µs", s * 1e6),
        s if s < 0.1 => format!("{:.1} ms", s * 1e3),
        s if s < 1.0 => format!("{:.0} ms", s * 1e3),
        s => format!("{s:.2} s"),
    }
}

/// `ctl client create`: prints the secret, with how to use it.
pub(super) fn client_create(api: &Api, name: &str) -> anyhow::Result<String> {
    let ClientCreated { name, secret } = api.post("/api/client/create", &CreateClient { name: name.to_string() })?;
    Ok(format!(
        "client {name} created. Its secret is shown only now:\n\n  {secret}\n\nStart the client with --name {name} and this secret (client.name / client.secret).\n",
    ))
}

/// `ctl client remove`.
pub(super) fn client_remove(api: &Api, name: &str, force: bool) -> anyhow::Result<String> {
    let removed: ClientRemoved =
        api.post("/api/client/remove", &RemoveClient { name: name.to_string(), force }).map_err(|e| match refusal_code(&e) {
            Some(ErrorCode::UnknownClient) => unknown_client(api, e, name, false),
            Some(ErrorCode::ClientInUse) => {
                let ports: Vec<u16> = api
                    .get::<MappingList>("/api/mapping/list")
                    .map(|l| l.mappings.into_iter().filter(|m| m.client.as_deref() == Some(name)).map(|m| m.source_port).collect())
                    .unwrap_or_default();
                let message = format!(
                    "client {name:?} is used by the mappings on ports {ports:?}: remove them first (tunneld ctl remove PORT), or pass --force to keep them waiting for a client of this name"
                );
                rephrase(e, message)
            }
            _ => e,
        })?;
    Ok(match removed.mappings_waiting.len() {
        0 => format!("client {name} removed\n"),
        n => format!("client {name} removed; {n} mapping(s) wait for a client of that name\n"),
    })
}

/// `ctl stats`: traffic since the daemon started, per mapping and in total.
pub(super) fn stats(api: &Api) -> anyhow::Result<String> {
    let report: TrafficReport = api.get("/api/stats/traffic")?;
    let mut rows = vec![vec![
        "PORT".to_string(),
        "PROTO".into(),
        "TARGET".into(),
        "MODE".into(),
        "SENT".into(),
        "RECEIVED".into(),
        "OPEN".into(),
        "CONNS".into(),
        "ERRORS".into(),
        "LAST ACTIVITY".into(),
    ]];
    for m in &report.mappings {
        rows.push(vec![
            m.port.to_string(),
            format!("{}:{}", m.target_host, m.target_port),
            mode(m.use_tunnel, m.client.as_deref()),
            human_bytes(m.bytes_sent),
            human_bytes(m.bytes_received),
            m.active_connections.to_string(),
            m.connections_total.to_string(),
            m.connect_errors.to_string(),
            match m.last_update {
                Some(t) => format!("{} ago", human_duration((report.timestamp - t).max(0.0))),
                None => "never".into(),
            },
        ]);
    }
    let mut out = table(&rows);
    let tunnel = &report.tunnel;
    let _ = writeln!(
        out,
        "total: sent {}, received {}; tunnel ({}): sent {}, received {}",
        human_bytes(report.total_sent),
        human_bytes(report.total_received),
        clients_connected(&report),
        human_bytes(tunnel.bytes_sent),
        human_bytes(tunnel.bytes_received),
    );
    Ok(out)
}

/// `1 of 2 clients connected`.
pub(super) fn clients_connected(report: &TrafficReport) -> String {
    let connected = report.clients.iter().filter(|c| c.connected).count();
    format!("{connected} of {} clients connected", report.clients.len())
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
pub(super) fn human_bytes(n: u64) -> String {
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

/// A `MODE` cell with the PROXY header targets receive, when there is one
/// (`direct+proxy_v2`): one word, so the table stays split by whitespace.
fn with_proxy_protocol(mode: String, proxy_protocol: Option<ProxyVersion>) -> String {
    match proxy_protocol {
        Some(version) => format!("{mode}+proxy_{}", version.as_str()),
        None => mode,
    }
}

/// `direct`, `tunnel`, or `tunnel:<client>`.
pub(super) fn mode(use_tunnel: bool, client: Option<&str>) -> String {
    match (use_tunnel, client) {
        (true, Some(client)) => format!("tunnel:{client}"),
        (true, None) => "tunnel".into(),
        (false, _) => "direct".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_the_name_meant() {
        let names = vec!["default".to_string(), "office".to_string(), "home-lab".to_string()];
        assert_eq!(closest_name("ofice", &names), Some("office"));
        assert_eq!(closest_name("homelab", &names), Some("home-lab"));
        assert_eq!(closest_name("warehouse", &names), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
