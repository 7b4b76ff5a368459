//! Whole-configuration checks for a role, what a reload cannot change live, and
//! the masked view `check-config` prints.

use serde::Serialize;

use super::declared::{DeclaredClient, DeclaredMapping};
use super::error::ConfigError;
use super::sections::{state_dir, AlertsConfig, ApiConfig, ClientConfig, Config, HistoryConfig, LogConfig, ServerConfig};
use super::values::{is_loopback, parse_fingerprint, split_host_port, valid_origin, MAX_POOL_SIZE, MIN_TOKEN_LEN, NO_TRUST_ANCHOR};
use crate::core::secret::Secret;

/// Which role's settings to validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The server role (mappings, tunnel port, API).
    Server,
    /// The client role (dials the server).
    Client,
}

impl Config {
    pub(super) fn validate(&self, role: Role) -> Result<(), ConfigError> {
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
                if self.server.udp_session_idle_secs == 0 {
                    return invalid("server.udp_session_idle_secs", "must be at least 1");
                }
                if self.server.max_udp_sessions_per_mapping == 0 {
                    return invalid("server.max_udp_sessions_per_mapping", "must be at least 1");
                }
                if !(1..=65_535).contains(&self.server.max_udp_datagram_bytes) {
                    return invalid("server.max_udp_datagram_bytes", "must be between 1 and 65535");
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
                // Declarations are the server's: in a client's file they would be ignored in silence.
                if !self.clients.is_empty() {
                    return invalid("clients", "[[clients]] are declared in the server's config file, not the client's");
                }
                if !self.mappings.is_empty() {
                    return invalid("mappings", "[[mappings]] are declared in the server's config file, not the client's");
                }
                self.validate_servers()?;
                if let Some(why) = crate::core::names::invalid_client_name(&self.client.name) {
                    return invalid("client.name", &why);
                }
                if self.client.secret.is_empty() {
                    return invalid(
                        "client.secret",
                        "is required (server.secret for the client `default`, else the secret /api/client/create returned)",
                    );
                }
                if self.client.pool_size > MAX_POOL_SIZE {
                    return invalid("client.pool_size", &format!("must be at most {MAX_POOL_SIZE}"));
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
            }
        }
        Ok(())
    }

    /// `client.server` (with `client.server_fingerprint`) or `client.servers`:
    /// exactly one of the two forms, every address `host:port` and named once,
    /// every server with a way to be trusted.
    fn validate_servers(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let client = &self.client;
        const BAD_PIN: &str = "must be sha256: followed by 64 hex digits (`tunneld fingerprint`)";
        if client.servers.is_empty() {
            if client.server.is_empty() {
                return invalid(
                    "client.server",
                    "is required (host:port of the server's tunnel listener; or client.servers for several servers)".into(),
                );
            }
            if split_host_port(&client.server).is_none() {
                return invalid("client.server", "must be host:port".into());
            }
            if let Some(pin) = &client.server_fingerprint {
                if parse_fingerprint(pin).is_none() {
                    return invalid("client.server_fingerprint", BAD_PIN.into());
                }
            }
            if client.tls && client.server_fingerprint.is_none() && client.tls_ca.is_none() {
                return invalid("client.server_fingerprint", NO_TRUST_ANCHOR.into());
            }
            return Ok(());
        }
        let both = "set either client.server (one server, with client.server_fingerprint) or client.servers (several, each with \
                    its own fingerprint), not both";
        if !client.server.is_empty() {
            return invalid("client.servers", format!("{both} (client.server is {:?})", client.server));
        }
        if client.server_fingerprint.is_some() {
            return invalid("client.servers", format!("{both}: with client.servers, each server's fingerprint goes in its entry"));
        }
        if client.tls_server_name.is_some() {
            return invalid(
                "client.servers",
                "client.tls_server_name is per server with client.servers: set tls_server_name in the entry".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, entry) in client.servers.iter().enumerate() {
            let which = format!("entry {} ({:?})", i + 1, entry.address);
            if split_host_port(&entry.address).is_none() {
                return invalid("client.servers", format!("{which}: address must be host:port"));
            }
            if !seen.insert(entry.address.to_ascii_lowercase()) {
                return invalid("client.servers", format!("{which}: this address is listed twice"));
            }
            if entry.fingerprint.as_deref().is_some_and(|pin| parse_fingerprint(pin).is_none()) {
                return invalid("client.servers", format!("{which}: fingerprint {BAD_PIN}"));
            }
            if client.tls && entry.fingerprint.is_none() && entry.tls_ca.is_none() && client.tls_ca.is_none() {
                return invalid(
                    "client.servers",
                    format!(
                        "{which}: TLS is on but there is no way to verify this server: set its fingerprint \
                         (`tunneld fingerprint` on that server), or tls_ca in the entry or client.tls_ca for a CA"
                    ),
                );
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
                check("server.udp_session_idle_secs", a.udp_session_idle_secs != b.udp_session_idle_secs);
                check("server.max_udp_sessions_per_mapping", a.max_udp_sessions_per_mapping != b.max_udp_sessions_per_mapping);
                check("server.max_udp_datagram_bytes", a.max_udp_datagram_bytes != b.max_udp_datagram_bytes);
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
                check("client.servers", a.servers != b.servers);
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

    /// Fills `server.secret` and `client.secret` from their `secret_file`s. Both
    /// a secret and its file set is refused: which one wins would be a guess.
    pub(crate) fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        read_secret_file(&mut self.server.secret, self.server.secret_file.as_deref(), "server.secret_file")?;
        read_secret_file(&mut self.client.secret, self.client.secret_file.as_deref(), "client.secret_file")
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
        if !shown.alerts.webhook_url.is_empty() {
            shown.alerts.webhook_url = crate::core::secret::redacted_url(&shown.alerts.webhook_url);
        }
        // Show where state really goes, not just whether it was configured.
        shown.server.state_dir = Some(state_dir(&self.server));
        let value = match role {
            Role::Server => toml::to_string_pretty(&ServerView {
                server: &shown.server,
                api: &shown.api,
                history: &shown.history,
                alerts: &shown.alerts,
                log: &shown.log,
                clients: &shown.clients,
                mappings: &shown.mappings,
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
    /// Secrets are never serialized: only where they come from.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    clients: &'a [DeclaredClient],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    mappings: &'a [DeclaredMapping],
}

#[derive(Serialize)]
struct ClientView<'a> {
    client: &'a ClientConfig,
    log: &'a LogConfig,
}

/// The first line of `file` into `secret` (a trailing newline, as `echo` or an
/// editor leaves it, is not part of the secret).
fn read_secret_file(secret: &mut Secret, file: Option<&std::path::Path>, key: &'static str) -> Result<(), ConfigError> {
    let Some(file) = file else { return Ok(()) };
    let secret_key = key.trim_end_matches("_file");
    if !secret.is_empty() {
        return Err(ConfigError::Invalid { key, reason: format!("set either `{secret_key}` or `{key}`, not both") });
    }
    crate::core::secret::read_secret_file_into(secret, file).map_err(|reason| ConfigError::Invalid { key, reason })
}
