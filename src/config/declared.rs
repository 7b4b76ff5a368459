//! `[[clients]]` and `[[mappings]]`: tunnel clients and mappings declared in the
//! server's config file, which the server reconciles with what it runs at start
//! and on every reload (created, changed, removed to match), and which the API
//! may show but not change.
//!
//! A declared client's secret is never written in the file itself: the file is
//! meant to be shared (the same one on a fleet of servers, in a repository, in
//! an Ansible role), so it names where the secret is, a file (`secret_file`,
//! mode 0600, or a systemd credential) or an environment variable
//! (`secret_env`, e.g. from the unit's `EnvironmentFile=`).
//!
//! A declared mapping has exactly the fields of `POST /api/mapping/create`
//! (`source_port`, `target_host`, `target_port`, `use_tunnel`, `client`, the
//! policy fields): this layer keeps each one as the table it was written as,
//! and the process reads it with the API's own request type, so a field the
//! API gains is a field the file has, with the same checks and messages.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use crate::core::names::{invalid_client_name, DEFAULT_CLIENT};
use crate::core::secret::Secret;

/// One `[[mappings]]` table, as written: the fields of `/api/mapping/create`.
pub type DeclaredMapping = serde_json::Map<String, serde_json::Value>;

/// One `[[clients]]` table: a tunnel client the file declares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredClient {
    /// Its name (1 to 64 of `a-z`, `0-9`, `-`, `_`; not `default`, whose
    /// secret is `server.secret`).
    pub name: String,
    /// A file whose only line is the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// The name of an environment variable holding the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// Filled from `secret_file` or `secret_env` when the file is loaded.
    /// Accepted from the file only to refuse it with advice (never shown).
    #[serde(default, skip_serializing)]
    pub secret: Secret,
}

/// `clients[1] (name "office")`: how an entry is named in messages.
pub fn client_entry(index: usize, name: &str) -> String {
    format!("clients[{index}] (name {name:?})")
}

/// `mappings[0] (source_port 4000)`, or `mappings[0]` when it has no usable port.
pub fn mapping_entry(index: usize, table: &DeclaredMapping) -> String {
    match table.get("source_port").and_then(serde_json::Value::as_u64) {
        Some(port) => format!("mappings[{index}] (source_port {port})"),
        None => format!("mappings[{index}]"),
    }
}

/// Checks every `[[clients]]` entry and reads its secret. Server role only:
/// the variables and files are the server's.
pub(super) fn read_declared_clients(clients: &mut [DeclaredClient]) -> Result<(), ConfigError> {
    let mut names = BTreeSet::new();
    for (index, client) in clients.iter_mut().enumerate() {
        let entry = client_entry(index, &client.name);
        let refuse = |reason: String| ConfigError::Declared { entry: entry.clone(), reason };
        if let Some(why) = invalid_client_name(&client.name) {
            return Err(refuse(format!("name: {why}")));
        }
        if client.name == DEFAULT_CLIENT {
            return Err(refuse("the client `default` is not declared: its secret is server.secret".into()));
        }
        if !names.insert(client.name.clone()) {
            return Err(refuse("declared twice (names are unique)".into()));
        }
        if !client.secret.is_empty() {
            return Err(refuse(
                "a declared client's secret is not written in the config file (it is shared, often world-readable): \
                     set secret_file = \"/etc/tunneld/NAME.secret\" or secret_env = \"VARIABLE\""
                    .into(),
            ));
        }
        client.secret = match (&client.secret_file, &client.secret_env) {
            (Some(_), Some(_)) => return Err(refuse("set either secret_file or secret_env, not both".into())),
            (None, None) => return Err(refuse("needs its secret: secret_file = \"PATH\" or secret_env = \"VARIABLE\"".into())),
            (Some(path), None) => {
                let mut secret = Secret::default();
                crate::core::secret::read_secret_file_into(&mut secret, path).map_err(|why| refuse(format!("secret_file: {why}")))?;
                secret
            }
            (None, Some(variable)) => match std::env::var(variable) {
                Ok(value) if !value.trim().is_empty() => Secret::new(value.trim()),
                Ok(_) => return Err(refuse(format!("secret_env: the environment variable {variable} is empty"))),
                Err(_) => return Err(refuse(format!("secret_env: the environment variable {variable} is not set"))),
            },
        };
    }
    Ok(())
}
