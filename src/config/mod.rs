//! Configuration: built-in defaults < TOML file < `TUNNELD_*` environment < CLI flags.
//!
//! Everything is validated here, before the daemon binds a single socket, so a typo
//! in a unit file or an env var fails the start with the key and where it came from
//! instead of half-starting.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::core::calendar::parse_utc_offset;
use crate::core::secret::Secret;

/// Used when `--config` is not given and this file exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/tunneld/tunneld.toml";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub api: ApiConfig,
    pub client: ClientConfig,
    pub history: HistoryConfig,
    pub alerts: AlertsConfig,
    pub log: LogConfig,
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
pub struct ServerConfig {
    /// Where clients dial in.
    pub tunnel_listen: SocketAddr,
    /// Shared secret for the HMAC handshake; empty means "generate one and keep it
    /// in the state dir".
    pub secret: Secret,
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
    /// TLS 1.3 on the tunnel port; off only on a trusted network.
    pub tls: bool,
    /// PEM certificate (chain) and key; both unset: a self-signed pair generated
    /// once into the state dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
            state_dir: None,
            bind_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            heartbeat_interval_secs: 10,
            shutdown_grace_secs: 10,
            connect_timeout_secs: 10,
            max_connections_per_mapping: 10_000,
            idle_timeout_secs: 2 * 60 * 60,
            tls: true,
            tls_cert: None,
            tls_key: None,
            pool_idle_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
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

/// Shortest API token accepted: long enough that guessing it online is hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// Whether `ip` is loopback, counting IPv4-mapped IPv6 (`::ffff:127.0.0.1`) too.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// `host:port` of the server's tunnel listener.
    pub server: String,
    /// Who this client is to the server (`/api/client/create`); `secret` is that
    /// client's. `default` is the client whose secret is `server.secret`.
    pub name: String,
    pub secret: Secret,
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
            name: crate::core::names::DEFAULT_CLIENT.to_string(),
            secret: Secret::default(),
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
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
    pub hour_retention: String,
    pub day_retention: String,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            interval_secs: 10,
            utc_offset: "+00:00".into(),
            minute_retention: "2d".into(),
            hour_retention: "90d".into(),
            day_retention: "5y".into(),
        }
    }
}

/// `[history]` after validation, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    pub interval_secs: u64,
    pub utc_offset_secs: i64,
    pub minute_retention_secs: i64,
    pub hour_retention_secs: i64,
    pub day_retention_secs: i64,
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

/// Normalizes a fingerprint as an operator may paste it (`sha256:` prefix optional,
/// colons allowed, any case); `None` when it is not 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let hexpart = text.trim();
    let hexpart = hexpart.strip_prefix("sha256:").or_else(|| hexpart.strip_prefix("SHA256:")).unwrap_or(hexpart);
    let digits: String = hexpart.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    (digits.len() == 64 && digits.chars().all(|c| c.is_ascii_hexdigit())).then(|| format!("sha256:{digits}"))
}

/// What a TLS client without a pin or a CA is told (config validation uses it too).
pub const NO_TRUST_ANCHOR: &str = "TLS is on but the client has no way to verify the server: set client.server_fingerprint \
     (flag --fingerprint) to the output of `tunneld fingerprint` on the server (the server also logs it at start), \
     or set client.tls_ca (and client.tls_server_name) to trust a CA; client.tls = false only on a trusted network";

/// Which role's settings to validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Server,
    Client,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    /// A value that does not parse, or an unknown key; says which and from where.
    #[error("{0}")]
    Source(String),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("config file {0} is empty; refusing to replace the running configuration with defaults")]
    EmptyFile(PathBuf),
}

/// Keys whose environment values are free text and must not be parsed.
const VERBATIM_ENV_KEYS: [&str; 7] =
    ["server.secret", "api.token", "client.secret", "client.name", "client.server", "client.server_fingerprint", "client.tls_server_name"];

/// `api.listen` -> `TUNNELD_API__LISTEN`.
pub fn env_var_name(key: &str) -> String {
    format!("TUNNELD_{}", key.replace('.', "__").to_uppercase())
}

/// One line per problem: the key (as written in TOML), what is wrong, and where
/// the value came from (file path, env var name, or flag).
fn describe(errors: figment::Error) -> String {
    errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let origin = match &e.metadata {
                Some(md) if md.name.contains("environment") => format!("environment variable {}", env_var_name(&key)),
                Some(md) => match &md.source {
                    Some(figment::Source::File(path)) => format!("file {}", path.display()),
                    // Defaults cannot be invalid, so any other provider is a flag.
                    _ => "command-line flag".to_string(),
                },
                None => "command-line flag".to_string(),
            };
            let key = if key.is_empty() { "(top level)".to_string() } else { format!("`{key}`") };
            format!("{key}: {} (from {origin})", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One CLI flag that overrides a config key (dotted path, e.g. `api.listen`).
pub struct Override {
    pub key: &'static str,
    pub value: String,
}

/// Like [`load`], for a reload (SIGHUP): an empty file is refused, because
/// truncating the file by accident would otherwise apply the defaults — and
/// silently drop `api.token`.
pub fn load_for_reload(file: Option<&Path>, overrides: &[Override], role: Role) -> Result<Config, ConfigError> {
    let path = file.map(Path::to_path_buf).or_else(|| Path::new(DEFAULT_CONFIG_FILE).exists().then(|| PathBuf::from(DEFAULT_CONFIG_FILE)));
    if let Some(path) = path {
        if std::fs::read_to_string(&path).is_ok_and(|text| text.trim().is_empty()) {
            return Err(ConfigError::EmptyFile(path));
        }
    }
    load(file, overrides, role)
}

/// Loads, merges and validates the configuration for `role`.
pub fn load(file: Option<&Path>, overrides: &[Override], role: Role) -> Result<Config, ConfigError> {
    let config = merge(file, overrides)?;
    config.validate(role)?;
    Ok(config)
}

/// Loads and merges the configuration without checking it for a role: for tools
/// such as `tunneld ctl` that only read a few keys (the API address and token) and
/// must not refuse a file over an unrelated role's requirement.
pub fn merge(file: Option<&Path>, overrides: &[Override]) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    match file {
        Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.to_path_buf())),
        Some(path) => figment = figment.merge(Toml::file_exact(path)),
        None if Path::new(DEFAULT_CONFIG_FILE).exists() => figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE)),
        None => {}
    }
    // Only `TUNNELD_<SECTION>__<KEY>` is configuration; other TUNNELD_* variables
    // (a wrapper script's, say) are not ours to reject.
    figment = figment.merge(Env::prefixed("TUNNELD_").filter(|key| key.as_str().contains("__")).split("__"));
    // Env parses values that look like numbers as numbers ("00123" -> 123), which
    // would corrupt a secret; take free-text keys from the environment verbatim.
    for key in VERBATIM_ENV_KEYS {
        if let Ok(raw) = std::env::var(env_var_name(key)) {
            figment = figment.merge(Serialized::default(key, raw));
        }
    }
    for o in overrides {
        figment = figment.merge(Serialized::default(o.key, &o.value));
    }
    figment.extract().map_err(|e| ConfigError::Source(describe(e)))
}

impl Config {
    fn validate(&self, role: Role) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.to_string() });
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid("log.level", "not a log filter (try `info` or `debug`)");
        }
        match role {
            Role::Server => {
                if !is_loopback(self.api.listen.ip()) && self.api.token.is_empty() {
                    return invalid("api.token", "must be set when api.listen is not a loopback address");
                }
                let token = self.api.token.expose();
                if !token.is_empty() && (token.trim() != token || token.chars().count() < MIN_TOKEN_LEN) {
                    return invalid("api.token", "must be at least 16 characters, with no leading or trailing whitespace");
                }
                if self.api.metrics_token_required && token.is_empty() {
                    return invalid("api.metrics_token_required", "needs api.token to be set");
                }
                if let Some(origin) = self.api.cors_origins.iter().find(|o| !valid_origin(o)) {
                    return invalid(
                        "api.cors_origins",
                        &format!("{origin:?} is not an origin like \"https://dash.example.com\" (scheme://host[:port], no path)"),
                    );
                }
                if let Some(host) = self.api.allowed_hosts.iter().find(|h| h.is_empty() || h.contains(['/', ' ', ':'])) {
                    return invalid("api.allowed_hosts", &format!("{host:?} is not a host name (no scheme, port or path)"));
                }
                if self.server.max_connections_per_mapping == 0 {
                    return invalid("server.max_connections_per_mapping", "must be at least 1");
                }
                if self.server.idle_timeout_secs == 0 {
                    return invalid("server.idle_timeout_secs", "must be at least 1");
                }
                if self.api.listen.port() != 0 && self.api.listen.port() == self.server.tunnel_listen.port() {
                    return invalid("api.listen", "must not use the same port as server.tunnel_listen");
                }
                if self.server.heartbeat_interval_secs == 0 {
                    return invalid("server.heartbeat_interval_secs", "must be at least 1");
                }
                if self.server.connect_timeout_secs == 0 {
                    return invalid("server.connect_timeout_secs", "must be at least 1");
                }
                self.history.settings()?;
                if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
                    return invalid("server.tls_cert", "server.tls_cert and server.tls_key go together (or neither: self-signed)");
                }
                if self.server.pool_idle_secs == 0 {
                    return invalid("server.pool_idle_secs", "must be at least 1");
                }
                let url = &self.alerts.webhook_url;
                // The binary carries no TLS client: an https:// receiver sits behind a
                // local relay (or gets a plain-HTTP listener on a trusted network).
                if !url.is_empty() && !url.starts_with("http://") {
                    return invalid("alerts.webhook_url", "must be an http:// URL (or empty)");
                }
            }
            Role::Client => {
                if self.client.server.is_empty() {
                    return invalid("client.server", "is required (host:port of the server's tunnel listener)");
                }
                if split_host_port(&self.client.server).is_none() {
                    return invalid("client.server", "must be host:port");
                }
                if let Some(why) = crate::core::names::invalid_client_name(&self.client.name) {
                    return invalid("client.name", &why);
                }
                if self.client.secret.is_empty() {
                    return invalid(
                        "client.secret",
                        "is required (server.secret for the client `default`, else the secret /api/client/create returned)",
                    );
                }
                if self.client.pool_size > 256 {
                    return invalid("client.pool_size", "must be at most 256");
                }
                if self.client.connect_timeout_secs == 0 {
                    return invalid("client.connect_timeout_secs", "must be at least 1");
                }
                if self.client.idle_timeout_secs == 0 {
                    return invalid("client.idle_timeout_secs", "must be at least 1");
                }
                if self.client.pool_idle_secs == 0 {
                    return invalid("client.pool_idle_secs", "must be at least 1");
                }
                if let Some(pin) = &self.client.server_fingerprint {
                    if parse_fingerprint(pin).is_none() {
                        return invalid("client.server_fingerprint", "must be sha256: followed by 64 hex digits (`tunneld fingerprint`)");
                    }
                }
                if self.client.tls && self.client.server_fingerprint.is_none() && self.client.tls_ca.is_none() {
                    return invalid("client.server_fingerprint", NO_TRUST_ANCHOR);
                }
            }
        }
        Ok(())
    }

    /// Keys whose new values only take effect on restart (listeners, secrets,
    /// state) — reported on reload so an operator is not surprised.
    pub fn restart_only_changes(&self, new: &Config, role: Role) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |key, differs: bool| {
            if differs {
                changed.push(key);
            }
        };
        match role {
            Role::Server => {
                let (a, b) = (&self.server, &new.server);
                check("server.tunnel_listen", a.tunnel_listen != b.tunnel_listen);
                check("server.secret", a.secret != b.secret);
                check("server.state_dir", a.state_dir != b.state_dir);
                check("server.bind_addr", a.bind_addr != b.bind_addr);
                check("server.heartbeat_interval_secs", a.heartbeat_interval_secs != b.heartbeat_interval_secs);
                check("server.shutdown_grace_secs", a.shutdown_grace_secs != b.shutdown_grace_secs);
                check("server.connect_timeout_secs", a.connect_timeout_secs != b.connect_timeout_secs);
                check("server.max_connections_per_mapping", a.max_connections_per_mapping != b.max_connections_per_mapping);
                check("server.idle_timeout_secs", a.idle_timeout_secs != b.idle_timeout_secs);
                check("server.tls", a.tls != b.tls);
                check("server.tls_cert", a.tls_cert != b.tls_cert);
                check("server.tls_key", a.tls_key != b.tls_key);
                check("server.pool_idle_secs", a.pool_idle_secs != b.pool_idle_secs);
                check("api.listen", self.api.listen != new.api.listen);
                check("api.allowed_hosts", self.api.allowed_hosts != new.api.allowed_hosts);
                check("api.cors_origins", self.api.cors_origins != new.api.cors_origins);
                check("api.metrics_token_required", self.api.metrics_token_required != new.api.metrics_token_required);
                check("history", format!("{:?}", self.history) != format!("{:?}", new.history));
                check("alerts.webhook_url", self.alerts.webhook_url != new.alerts.webhook_url);
            }
            Role::Client => {
                let (a, b) = (&self.client, &new.client);
                check("client.server", a.server != b.server);
                check("client.secret", a.secret != b.secret);
                check("client.name", a.name != b.name);
                check("client.metrics_listen", a.metrics_listen != b.metrics_listen);
                check("client.pool_size", a.pool_size != b.pool_size);
                check("client.connect_timeout_secs", a.connect_timeout_secs != b.connect_timeout_secs);
                check("client.idle_timeout_secs", a.idle_timeout_secs != b.idle_timeout_secs);
                check("client.tls", a.tls != b.tls);
                check("client.server_fingerprint", a.server_fingerprint != b.server_fingerprint);
                check("client.tls_ca", a.tls_ca != b.tls_ca);
                check("client.tls_server_name", a.tls_server_name != b.tls_server_name);
                check("client.pool_idle_secs", a.pool_idle_secs != b.pool_idle_secs);
            }
        }
        changed
    }

    /// The effective configuration as TOML with secrets masked, for `check-config`.
    pub fn to_masked_toml(&self, role: Role) -> String {
        fn mask(secret: &str, empty: &str) -> String {
            if secret.is_empty() {
                empty.to_string()
            } else {
                "********".to_string()
            }
        }
        let mut shown = self.clone();
        shown.server.secret = Secret::new(mask(shown.server.secret.expose(), "(generated on first start, stored in the state dir)"));
        shown.api.token = Secret::new(mask(shown.api.token.expose(), ""));
        shown.client.secret = Secret::new(mask(shown.client.secret.expose(), ""));
        // Show where state really goes, not just whether it was configured.
        shown.server.state_dir = Some(state_dir(&self.server));
        let value = match role {
            Role::Server => toml::to_string_pretty(&ServerView {
                server: &shown.server,
                api: &shown.api,
                history: &shown.history,
                alerts: &shown.alerts,
                log: &shown.log,
            }),
            Role::Client => toml::to_string_pretty(&ClientView { client: &shown.client, log: &shown.log }),
        };
        value.unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[derive(Serialize)]
struct ServerView<'a> {
    server: &'a ServerConfig,
    api: &'a ApiConfig,
    history: &'a HistoryConfig,
    alerts: &'a AlertsConfig,
    log: &'a LogConfig,
}

#[derive(Serialize)]
struct ClientView<'a> {
    client: &'a ClientConfig,
    log: &'a LogConfig,
}

/// `scheme://host[:port]` with nothing after it, as browsers send in `Origin`.
fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains(['/', '?', '#', ' '])
}

/// Splits `host:port` (IPv6 as `[::1]:9000`); `None` when malformed.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then_some((host, port))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_forms_operators_paste() {
        let hex64 = "ab".repeat(32);
        let want = Some(format!("sha256:{hex64}"));
        assert_eq!(parse_fingerprint(&format!("sha256:{hex64}")), want);
        assert_eq!(parse_fingerprint(&hex64.to_uppercase()), want);
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(parse_fingerprint(&format!("SHA256:{}", colons.join(":"))), want);
        assert_eq!(parse_fingerprint("sha256:abcd"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("example.com:9000"), Some(("example.com", 9000)));
        assert_eq!(split_host_port("[::1]:9000"), Some(("::1", 9000)));
        assert_eq!(split_host_port("example.com"), None);
        assert_eq!(split_host_port(":9000"), None);
        assert_eq!(split_host_port("h:0"), None);
    }

    #[test]
    fn flags_override_defaults_and_are_validated() {
        let cfg = load(None, &[Override { key: "api.listen", value: "127.0.0.1:18080".into() }], Role::Server).expect("valid");
        assert_eq!(cfg.api.listen.port(), 18080);
        let err = load(None, &[Override { key: "api.listen", value: "not-an-address".into() }], Role::Server).unwrap_err();
        assert!(err.to_string().contains("api.listen"), "{err}");
        let err = load(None, &[Override { key: "api.listen", value: "0.0.0.0:8080".into() }], Role::Server).unwrap_err();
        assert!(err.to_string().contains("api.token"), "{err}");
    }

    #[test]
    fn tokens_follow_the_rule_and_mapped_loopback_is_loopback() {
        let with = |token: &str| load(None, &[Override { key: "api.token", value: token.into() }], Role::Server);
        assert!(with(" ").is_err());
        assert!(with("short").is_err());
        assert!(with(" padded-token-of-length ").is_err());
        assert!(with("a-token-of-enough-length").is_ok());
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
        assert!(valid_origin("http://127.0.0.1:8000") && !valid_origin("http://x/y") && !valid_origin("x.example"));
    }

    #[test]
    fn history_settings_are_validated() {
        let defaults = HistoryConfig::default().settings().expect("defaults are valid");
        assert_eq!(defaults.minute_retention_secs, 2 * 86_400);
        assert_eq!(defaults.day_retention_secs, 5 * 365 * 86_400);
        assert_eq!(parse_utc_offset("+08:00"), Some(8 * 3600));
        assert_eq!(parse_utc_offset("-05:30"), Some(-(5 * 3600 + 1800)));
        for bad in ["08:00", "+8:00", "+15:00", "+08:60", "", "+08"] {
            assert_eq!(parse_utc_offset(bad), None, "{bad}");
        }
        for (key, value) in [
            ("history.utc_offset", "UTC+8"),
            ("history.interval_secs", "0"),
            ("history.minute_retention", "2 days"),
            ("history.day_retention", "7d"),
        ] {
            let err = load(None, &[Override { key, value: value.into() }], Role::Server).unwrap_err();
            assert!(err.to_string().contains(key), "{key}={value}: {err}");
        }
    }
}
