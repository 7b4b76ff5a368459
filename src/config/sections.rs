//! The configuration's sections as serde types: every key, its default, and
//! what it means. Unknown keys are refused (`deny_unknown_fields`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::declared::{DeclaredClient, DeclaredMapping};
use super::error::ConfigError;
use crate::core::calendar::parse_utc_offset;
use crate::core::names::DEFAULT_CLIENT;
use crate::core::secret::Secret;

/// The whole configuration file: one section per table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: the tunnel port, state, limits and timeouts.
    pub server: ServerConfig,
    /// `[api]`: the HTTP API's address, token and browser rules.
    pub api: ApiConfig,
    /// `[client]`: where the client dials and how it trusts the server.
    pub client: ClientConfig,
    /// `[history]`: the traffic recorder.
    pub history: HistoryConfig,
    /// `[alerts]`: the event webhook.
    pub alerts: AlertsConfig,
    /// `[log]`: the log filter.
    pub log: LogConfig,
    /// `[[clients]]`: tunnel clients declared here (server role).
    pub clients: Vec<DeclaredClient>,
    /// `[[mappings]]`: mappings declared here (server role).
    pub mappings: Vec<DeclaredMapping>,
}

/// `[alerts]`: where events (quota thresholds, unbindable mappings, clients
/// lost and back) are sent besides the log and `/api/events`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// `http://…` URL each event is POSTed to as JSON; empty: none. Plain HTTP
    /// only: the binary has no TLS client.
    pub webhook_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// `[server]`: what the server role listens on, keeps and allows.
pub struct ServerConfig {
    /// Where clients dial in.
    pub tunnel_listen: SocketAddr,
    /// Shared secret for the HMAC handshake; empty means "generate one and keep it
    /// in the state dir".
    pub secret: Secret,
    /// A file holding `secret` (its first line), so that the secret is in neither
    /// this world-readable file nor a command line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// SQLite and the generated secret live here. Unset: `$STATE_DIRECTORY` under
    /// systemd, else `./data`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Address the mapping listeners bind (each mapping's `source_port`).
    pub bind_addr: IpAddr,
    /// Heartbeat period on the control channel; a peer silent for three periods is
    /// dropped.
    pub heartbeat_interval_secs: u64,
    /// How long open connections may finish after SIGTERM before they are cut.
    pub shutdown_grace_secs: u64,
    /// Bound on dialing a target (direct) or getting a data channel (tunnel).
    pub connect_timeout_secs: u64,
    /// Open connections one mapping may hold; further visitors are refused and
    /// counted (`reason="connection_limit"`). Keeps a loop between mappings, or a
    /// flood on one port, from taking every descriptor of the process.
    pub max_connections_per_mapping: usize,
    /// A forwarded connection on which no byte moved either way for this long is
    /// closed (with a reset), so a stalled target or a vanished visitor cannot pin
    /// descriptors and `active_connections` forever.
    pub idle_timeout_secs: u64,
    /// A UDP session (one visitor address, with its own socket toward the
    /// target) ends after this long without a datagram either way.
    pub udp_session_idle_secs: u64,
    /// UDP sessions one mapping may hold; datagrams from further visitor
    /// addresses are dropped and counted (`reason="session_limit"`), so a
    /// spoofed-source flood cannot take every descriptor or all memory.
    pub max_udp_sessions_per_mapping: usize,
    /// The largest UDP datagram (payload bytes) a mapping forwards; larger ones
    /// are dropped whole and counted (`reason="too_large"`), never truncated.
    pub max_udp_datagram_bytes: usize,
    /// TLS 1.3 on the tunnel port; off only on a trusted network.
    pub tls: bool,
    /// PEM certificate (chain) and key; both unset: a self-signed pair generated
    /// once into the state dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The private key (PEM) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Idle pooled data channels are closed after this long (the client opens
    /// fresh ones), so a pool never holds connections a middlebox dropped.
    pub pool_idle_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tunnel_listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9000)),
            secret: Secret::default(),
            secret_file: None,
            state_dir: None,
            bind_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            heartbeat_interval_secs: 10,
            shutdown_grace_secs: 10,
            connect_timeout_secs: 10,
            max_connections_per_mapping: 10_000,
            idle_timeout_secs: 2 * 60 * 60,
            udp_session_idle_secs: 60,
            max_udp_sessions_per_mapping: 10_000,
            max_udp_datagram_bytes: 65_507,
            tls: true,
            tls_cert: None,
            tls_key: None,
            pool_idle_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// `[api]`: the HTTP API and the rules that keep browsers from misusing it.
pub struct ApiConfig {
    /// Where the API, `/metrics` and the monitor page listen.
    pub listen: SocketAddr,
    /// Bearer token for `/api/*`; required before `listen` may leave loopback.
    pub token: Secret,
    /// Host names (besides IP literals and `localhost`) the API answers to; any
    /// other `Host` header is refused, which defeats DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) whose pages may call the API from a browser.
    pub cors_origins: Vec<String>,
    /// `/metrics` asks for the API token too (off: scrapers read it freely).
    pub metrics_token_required: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            token: Secret::default(),
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            metrics_token_required: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// `[client]`: the client role: its server, its name and secret, its pool.
pub struct ClientConfig {
    /// `host:port` of the server's tunnel listener: the one-server form
    /// (`servers` is the form for several).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub server: String,
    /// Several servers, each with its own trust; the client holds a session
    /// to every one at once, so the same mappings declared on each survive
    /// the loss of any one of them. Empty: the one server is `server`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerEntry>,
    /// Who this client is to the server (`/api/client/create`); `secret` is that
    /// client's. `default` is the client whose secret is `server.secret`.
    pub name: String,
    /// This client's secret (`server.secret` for `default`, else what `/api/client/create` returned).
    pub secret: Secret,
    /// A file holding `secret` (its first line): unlike `--secret`, it does not
    /// show in every user's `ps`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// The client's own `/metrics`; off when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Data channels kept open ahead of need, so a visitor costs no extra round trip.
    pub pool_size: usize,
    /// Bound on dialing a target inside the client's network.
    pub connect_timeout_secs: u64,
    /// Like `server.idle_timeout_secs`, for the client's side of a connection.
    pub idle_timeout_secs: u64,
    /// TLS 1.3 to the server; must match `server.tls`.
    pub tls: bool,
    /// The server certificate's `sha256:<hex>` (`tunneld fingerprint`); pins it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_fingerprint: Option<String>,
    /// Alternatively, a CA bundle (PEM) that signed the server's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// The name checked against a CA-signed certificate; default: the host of `server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// An idle pooled channel is closed after this long. A backstop: keep it above
    /// `server.pool_idle_secs`, since the server, which hands channels out, should be
    /// the side that expires them.
    pub pool_idle_secs: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            server: String::new(),
            servers: Vec::new(),
            name: DEFAULT_CLIENT.to_string(),
            secret: Secret::default(),
            secret_file: None,
            metrics_listen: None,
            pool_size: 4,
            connect_timeout_secs: 10,
            idle_timeout_secs: 2 * 60 * 60,
            tls: true,
            server_fingerprint: None,
            tls_ca: None,
            tls_server_name: None,
            pool_idle_secs: 75,
        }
    }
}

/// One of `client.servers`: a server's tunnel address and how to trust it (a
/// pinned fingerprint, or a CA; `client.tls_ca` is the CA of entries that
/// name neither).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    /// `host:port` of that server's tunnel listener.
    pub address: String,
    /// That server's certificate `sha256:<hex>` (`tunneld fingerprint` on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// A CA bundle (PEM) that signed that server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// The name checked against a CA-signed certificate; default: the host of `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
}

impl ClientConfig {
    /// One configuration per server this client keeps a session with, each in
    /// the one-server form (`server`, `server_fingerprint`, `tls_ca`,
    /// `tls_server_name`), so dialing, TLS and its diagnosis have a single
    /// shape whether one server is configured or several.
    pub fn per_server(&self) -> Vec<ClientConfig> {
        if self.servers.is_empty() {
            return vec![self.clone()];
        }
        self.servers
            .iter()
            .map(|entry| {
                let mut one = self.clone();
                one.servers = Vec::new();
                one.server = entry.address.clone();
                one.server_fingerprint = entry.fingerprint.clone();
                // A pinned entry ignores the shared CA; one with neither uses it.
                one.tls_ca = match &entry.fingerprint {
                    Some(_) => entry.tls_ca.clone(),
                    None => entry.tls_ca.clone().or_else(|| self.tls_ca.clone()),
                };
                one.tls_server_name = entry.tls_server_name.clone();
                one
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
/// `[log]`: how much the daemon logs.
pub struct LogConfig {
    /// A `tracing` filter (`info`, `debug`, `tunneld=debug,info`); `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into() }
    }
}

/// `[history]`: the traffic recorder (see `crate::history`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Seconds between two readings of the registry; a crash loses at most one.
    pub interval_secs: u64,
    /// `+HH:MM` / `-HH:MM`: where a "day" and a "month" begin for reports.
    pub utc_offset: String,
    /// How long each resolution is kept: a number and a unit (`h`, `d`, `y` = 365 d).
    pub minute_retention: String,
    /// How long hour buckets are kept.
    pub hour_retention: String,
    /// How long day buckets are kept (at least 31 days: a month report needs them).
    pub day_retention: String,
    /// Whether ended visitor connections are logged (who, from which address,
    /// how long, how many bytes, how it ended). Source addresses are personal
    /// data: turn this off where you may not keep them.
    pub connection_log: bool,
    /// How long the connection log keeps a row (`h`, `d`, `y`).
    pub connection_log_retention: String,
    /// Most rows the connection log keeps; the oldest go first.
    pub connection_log_max_rows: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            interval_secs: 10,
            utc_offset: "+00:00".into(),
            minute_retention: "2d".into(),
            hour_retention: "90d".into(),
            day_retention: "5y".into(),
            connection_log: true,
            connection_log_retention: "7d".into(),
            connection_log_max_rows: DEFAULT_CONNECTION_LOG_MAX_ROWS,
        }
    }
}

/// The connection log's default row cap: under 130 MB on disk (see
/// `store::connection_log`), whatever the traffic and however long it runs.
pub(crate) const DEFAULT_CONNECTION_LOG_MAX_ROWS: u64 = 1_000_000;

/// `[history]` after validation, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    /// Seconds between two readings of the registry.
    pub interval_secs: u64,
    /// Where days and months begin, in seconds east of UTC.
    pub utc_offset_secs: i64,
    /// How long minute buckets are kept, in seconds.
    pub minute_retention_secs: i64,
    /// How long hour buckets are kept, in seconds.
    pub hour_retention_secs: i64,
    /// How long day buckets are kept, in seconds.
    pub day_retention_secs: i64,
    /// Whether ended connections are logged.
    pub connection_log: bool,
    /// How long a connection log row is kept, in seconds.
    pub connection_log_retention_secs: i64,
    /// Most connection log rows kept.
    pub connection_log_max_rows: u64,
}

impl HistoryConfig {
    /// The validated settings, or the first bad key and why.
    pub fn settings(&self) -> Result<HistorySettings, ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid { key, reason };
        if !(1..=60).contains(&self.interval_secs) {
            return Err(invalid("history.interval_secs", "must be between 1 and 60 (a minute bucket needs a reading)".into()));
        }
        let utc_offset_secs = parse_utc_offset(&self.utc_offset).ok_or_else(|| {
            invalid("history.utc_offset", format!("{:?} is not an offset like +08:00 or -05:30 (at most 14 h)", self.utc_offset))
        })?;
        let retention = |key, text: &str, min_secs: i64, min_text: &str| {
            let secs = parse_retention(text).ok_or_else(|| invalid(key, format!("{text:?} is not a duration like 48h, 90d or 5y")))?;
            if secs < min_secs {
                return Err(invalid(key, format!("must be at least {min_text}")));
            }
            Ok(secs)
        };
        Ok(HistorySettings {
            interval_secs: self.interval_secs,
            utc_offset_secs,
            minute_retention_secs: retention("history.minute_retention", &self.minute_retention, 3600, "1h")?,
            hour_retention_secs: retention("history.hour_retention", &self.hour_retention, 86_400, "1d")?,
            // A month report needs the whole month's days.
            day_retention_secs: retention("history.day_retention", &self.day_retention, 31 * 86_400, "31d")?,
            connection_log: self.connection_log,
            connection_log_retention_secs: retention("history.connection_log_retention", &self.connection_log_retention, 3600, "1h")?,
            connection_log_max_rows: match self.connection_log_max_rows {
                0 => {
                    return Err(invalid(
                        "history.connection_log_max_rows",
                        "must be at least 1 (to keep no log, set history.connection_log = false)".into(),
                    ))
                }
                n => n,
            },
        })
    }
}

/// `36h`, `2d`, `5y` (365 days) -> seconds.
fn parse_retention(text: &str) -> Option<i64> {
    let unit = match text.chars().last()? {
        'h' => 3600,
        'd' => 86_400,
        'y' => 365 * 86_400,
        _ => return None,
    };
    let n: i64 = text[..text.len() - 1].parse().ok()?;
    (n > 0 && n <= 1000).then_some(n * unit)
}

/// The state directory: explicit config, else `$STATE_DIRECTORY` (systemd), else `./data`.
pub fn state_dir(server: &ServerConfig) -> PathBuf {
    if let Some(dir) = &server.state_dir {
        return dir.clone();
    }
    std::env::var_os("STATE_DIRECTORY")
        // systemd may pass several colon-separated dirs; the first is ours.
        .and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("./data"))
}
