//! Stored mappings: what `restore` brings back at start, with each one's policy.

use rusqlite::params;
use serde::{Deserialize, Serialize};

use super::db::{Store, StoreError};
use crate::core::names::DEFAULT_CLIENT;
use crate::core::protocol::{MappingKey, Protocol};
use crate::policy::{Balance, HealthCheck, Policy};

/// A mapping as stored and as the API shows it (plus live status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSpec {
    /// The port the server listens on (1–65535), unique among mappings of its protocol.
    pub source_port: u16,
    /// TCP or UDP: with the port, what identifies the mapping.
    #[serde(default)]
    pub protocol: Protocol,
    /// The host dialed for each visitor (by the server, or by the client when tunneled).
    pub target_host: String,
    /// The port dialed on `target_host`.
    pub target_port: u16,
    /// Whether the target is reached through a tunnel client.
    pub use_tunnel: bool,
    /// The tunnel client that reaches the target; `None` for a direct mapping.
    /// With a group, its first client (`clients[0]`).
    pub client: Option<String>,
    /// Every client of its group, in order (`[client]` for one client); empty
    /// for a direct mapping.
    #[serde(default)]
    pub clients: Vec<String>,
    /// How the group's visitors are shared among its connected clients.
    #[serde(default)]
    pub balance: Balance,
    /// Active checks of the target through each client of the group.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Unix seconds.
    pub created_at: i64,
    /// Who owns it: the API, or the config file's `[[mappings]]`.
    pub source: Source,
}

/// Where a mapping or a client was declared: the API may change only its own;
/// the config file's are reconciled from the file at start and on reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Created through `/api/*` (or `tunneld ctl`); the default for rows made
    /// before declarations existed.
    #[default]
    Api,
    /// Declared in the config file (`[[mappings]]`, `[[clients]]`).
    Config,
}

impl Source {
    /// The name in the database and on the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Config => "config",
        }
    }

    /// Reads a stored name; anything unknown is the API's, which the API may change.
    pub(super) fn parse(name: &str) -> Source {
        match name {
            "config" => Source::Config,
            _ => Source::Api,
        }
    }
}

impl MappingSpec {
    /// What identifies it: its port and protocol.
    pub(crate) fn key(&self) -> MappingKey {
        MappingKey { port: self.source_port, protocol: self.protocol }
    }

    /// The group as stored: `clients` as a JSON array, `balance`, and
    /// `health_check` as JSON (or NULL).
    fn group_columns(&self) -> (Option<String>, &'static str, Option<String>) {
        let clients = (!self.clients.is_empty()).then(|| serde_json::to_string(&self.clients).unwrap_or_else(|_| "[]".into()));
        let check = self.health_check.and_then(|c| serde_json::to_string(&c).ok());
        (clients, self.balance.as_str(), check)
    }
}

fn policy_json(policy: &Policy) -> String {
    serde_json::to_string(policy).unwrap_or_else(|_| "{}".into())
}

impl Store {
    pub(crate) async fn insert(&self, m: MappingSpec, policy: &Policy) -> Result<(), StoreError> {
        let policy = policy_json(policy);
        let (clients, balance, check) = m.group_columns();
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO mappings (source_port, target_host, target_port, use_tunnel, created_at, policy, client, clients, balance, health_check, source, protocol) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![m.source_port, m.target_host, m.target_port, m.use_tunnel, m.created_at, policy, m.client, clients, balance, check, m.source.as_str(), m.protocol.as_str()],
            )?;
            tx.commit()
        })
        .await
    }

    /// Replaces a mapping's policy; returns whether the mapping exists.
    pub(crate) async fn set_policy(&self, key: MappingKey, policy: &Policy) -> Result<bool, StoreError> {
        let policy = policy_json(policy);
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute(
                "UPDATE mappings SET policy = ?2 WHERE source_port = ?1 AND protocol = ?3",
                params![key.port, policy, key.protocol.as_str()],
            )?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    /// Replaces a tunneled mapping's group (`client` follows `clients[0]`);
    /// returns whether the mapping exists.
    pub(crate) async fn set_group(&self, m: &MappingSpec) -> Result<bool, StoreError> {
        let (clients, balance, check) = m.group_columns();
        let (key, client) = (m.key(), m.client.clone());
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute(
                "UPDATE mappings SET client = ?3, clients = ?4, balance = ?5, health_check = ?6 WHERE source_port = ?1 AND protocol = ?2",
                params![key.port, key.protocol.as_str(), client, clients, balance, check],
            )?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    /// Returns whether a row was deleted.
    pub(crate) async fn remove(&self, key: MappingKey) -> Result<bool, StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let n =
                tx.execute("DELETE FROM mappings WHERE source_port = ?1 AND protocol = ?2", params![key.port, key.protocol.as_str()])?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    pub(crate) async fn list(&self) -> Result<Vec<(MappingSpec, Policy)>, StoreError> {
        let rows = self
            .with_conn(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT source_port, target_host, target_port, use_tunnel, created_at, policy, client, clients, balance, health_check, source, protocol FROM mappings ORDER BY source_port, protocol",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, bool>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        (r.get::<_, Option<String>>(7)?, r.get::<_, Option<String>>(8)?, r.get::<_, Option<String>>(9)?),
                        r.get::<_, String>(10)?,
                        r.get::<_, String>(11)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        let port =
            |p: i64| u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| StoreError::BadRow { path: self.path().to_string(), port: p });
        rows.into_iter()
            .map(|(sp, host, tp, tunnel, created, policy, client, (clients, balance, check), source, protocol)| {
                let bad = |e: serde_json::Error| StoreError::BadPolicy { path: self.path().to_string(), port: sp, error: e.to_string() };
                let policy = serde_json::from_str(&policy).map_err(bad)?;
                // A row from before client groups has only `client`: a group of one.
                let client = tunnel.then(|| client.unwrap_or_else(|| DEFAULT_CLIENT.to_string()));
                let clients: Vec<String> = match clients {
                    Some(list) if tunnel => serde_json::from_str(&list).map_err(bad)?,
                    _ => client.iter().cloned().collect(),
                };
                let balance = match balance {
                    Some(b) => serde_json::from_value(serde_json::Value::String(b)).map_err(bad)?,
                    None => Balance::default(),
                };
                let health_check = check.map(|c| serde_json::from_str(&c)).transpose().map_err(bad)?;
                let spec = MappingSpec {
                    source_port: port(sp)?,
                    // Written only by this code, checked by the table: anything
                    // else would be a hand-edited row, read as what rows always were.
                    protocol: Protocol::parse(&protocol).unwrap_or_default(),
                    target_host: host,
                    target_port: port(tp)?,
                    use_tunnel: tunnel,
                    client: clients.first().cloned().or(client),
                    clients,
                    balance,
                    health_check,
                    created_at: created,
                    source: Source::parse(&source),
                };
                Ok((spec, policy))
            })
            .collect()
    }
}
