//! Configuration: built-in defaults < TOML file < `TUNNELD_*` environment < CLI flags.
//!
//! Everything is validated here, before the daemon binds a single socket, so a typo
//! in a unit file or an env var fails the start with the key and where it came from
//! instead of half-starting.
//!
//! May import `core` only: every other layer reads its settings from here.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;

mod declared;
mod error;
mod sections;
mod validate;
mod values;

pub use declared::{client_entry, mapping_entry, DeclaredClient, DeclaredMapping};
pub use error::ConfigError;
pub use sections::{
    state_dir, AlertsConfig, ApiConfig, ClientConfig, Config, HistoryConfig, HistorySettings, LogConfig, ServerConfig, ServerEntry,
};
pub use validate::Role;
pub use values::{is_loopback, parse_fingerprint, reachable_here, split_host_port, MAX_POOL_SIZE, MIN_TOKEN_LEN, NO_TRUST_ANCHOR};

/// The file `role` reads when `--config` is not given: the packaged layout's,
/// so `tunneld fingerprint` or `tunneld ctl` typed on a packaged host find the
/// same settings as the service.
pub fn default_file(role: Role) -> &'static Path {
    Path::new(match role {
        Role::Server => "/etc/tunneld/server.toml",
        Role::Client => "/etc/tunneld/client.toml",
    })
}

/// The file to read: the one given, else `role`'s default when it exists.
pub fn file_for(role: Role, given: Option<&Path>) -> Option<&Path> {
    given.or_else(|| Some(default_file(role)).filter(|default| default.exists()))
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
    /// The dotted key, as in TOML (`api.listen`).
    pub key: &'static str,
    /// The value as typed on the command line.
    pub value: String,
}

/// Like [`load`], for a reload (SIGHUP): an empty file is refused, because
/// truncating the file by accident would otherwise apply the defaults — and
/// silently drop `api.token`.
pub fn load_for_reload(file: Option<&Path>, overrides: &[Override], role: Role) -> Result<Config, ConfigError> {
    if let Some(path) = file_for(role, file) {
        if std::fs::read_to_string(path).is_ok_and(|text| text.trim().is_empty()) {
            return Err(ConfigError::EmptyFile(path.to_path_buf()));
        }
    }
    load(file, overrides, role)
}

/// Loads, merges and validates the configuration for `role`.
pub fn load(file: Option<&Path>, overrides: &[Override], role: Role) -> Result<Config, ConfigError> {
    let mut config = merge(file, overrides, role)?;
    config.read_secret_files()?;
    if role == Role::Server {
        declared::read_declared_clients(&mut config.clients)?;
    }
    config.validate(role)?;
    Ok(config)
}

/// Loads and merges the configuration without checking it for `role` (whose
/// default file is read when `file` is `None`): for tools such as `tunneld ctl`
/// that only read a few keys (the API address and token) and must not refuse a
/// file over an unrelated requirement.
pub fn merge(file: Option<&Path>, overrides: &[Override], role: Role) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    match file_for(role, file) {
        Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.to_path_buf())),
        Some(path) => figment = figment.merge(Toml::file_exact(path)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::calendar::parse_utc_offset;
    use values::valid_origin;

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
    fn declared_clients_take_their_secret_from_a_file_and_only_the_server_reads_declarations() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("office.secret");
        std::fs::write(&secret, "office-secret\n").unwrap();
        let file = dir.path().join("server.toml");
        let write = |text: String| std::fs::write(&file, text).unwrap();
        write(format!("[[clients]]\nname = \"office\"\nsecret_file = {:?}\n", secret.display().to_string()));
        let cfg = load(Some(&file), &[], Role::Server).expect("valid");
        assert_eq!(cfg.clients[0].secret.expose(), "office-secret");
        assert!(!cfg.to_masked_toml(Role::Server).contains("office-secret"), "never shown");
        let err = load(Some(&file), &[Override { key: "client.server", value: "h:9000".into() }], Role::Client).unwrap_err();
        assert!(err.to_string().contains("`clients`"), "{err}");
        for (text, want) in [
            ("[[clients]]\nname = \"office\"\n", "needs its secret"),
            ("[[clients]]\nname = \"office\"\nsecret = \"inline\"\n", "not written in the config file"),
            ("[[clients]]\nname = \"default\"\nsecret_env = \"X\"\n", "server.secret"),
            ("[[clients]]\nname = \"Office!\"\nsecret_env = \"X\"\n", "name:"),
        ] {
            write(text.to_string());
            let err = load(Some(&file), &[], Role::Server).unwrap_err().to_string();
            assert!(err.contains("clients[0]") && err.contains(want), "{text}: {err}");
        }
        write(format!(
            "[[clients]]\nname = \"a\"\nsecret_file = {0:?}\n[[clients]]\nname = \"a\"\nsecret_file = {0:?}\n",
            secret.display().to_string()
        ));
        let err = load(Some(&file), &[], Role::Server).unwrap_err().to_string();
        assert!(err.contains("clients[1]") && err.contains("declared twice"), "{err}");
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

    #[test]
    fn a_server_list_becomes_one_configuration_per_server() {
        let pin = format!("sha256:{}", "ab".repeat(32));
        let entry = |address: &str, fingerprint: Option<&str>| ServerEntry {
            address: address.into(),
            fingerprint: fingerprint.map(str::to_string),
            tls_ca: None,
            tls_server_name: None,
        };
        let mut config = Config::default();
        config.client.secret = crate::core::secret::Secret::new("a secret");
        config.client.tls_ca = Some("/etc/tunneld/ca.pem".into());
        config.client.servers = vec![entry("a:9000", Some(&pin)), entry("b:9000", None)];
        config.validate(Role::Client).expect("valid");
        let each = config.client.per_server();
        let shown: Vec<_> = each.iter().map(|c| (c.server.as_str(), c.server_fingerprint.is_some(), c.tls_ca.is_some())).collect();
        // The pinned entry ignores the shared CA; the other one uses it.
        assert_eq!(shown, [("a:9000", true, false), ("b:9000", false, true)]);
        assert!(each.iter().all(|c| c.servers.is_empty()));

        let one =
            Config { client: ClientConfig { server: "a:9000".into(), servers: Vec::new(), ..config.client.clone() }, ..Config::default() };
        assert_eq!(one.client.per_server().len(), 1);

        let mut both = config.clone();
        both.client.server = "c:9000".into();
        let err = both.validate(Role::Client).unwrap_err().to_string();
        assert!(err.contains("client.servers") && err.contains("not both"), "{err}");
        let mut untrusted = config.clone();
        untrusted.client.tls_ca = None;
        let err = untrusted.validate(Role::Client).unwrap_err().to_string();
        assert!(err.contains("entry 2") && err.contains("b:9000"), "{err}");
    }
}
