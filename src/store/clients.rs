//! Stored tunnel clients: their names and secrets (the reason the database is
//! private).

use rusqlite::params;

use super::db::{Store, StoreError};
use super::mappings::Source;
use crate::core::secret::Secret;

/// A named tunnel client as stored (`default` is not: its secret is `server.secret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredClient {
    pub name: String,
    pub secret: Secret,
    pub created_at: i64,
    /// Created through the API, or declared in the config file (`[[clients]]`).
    pub source: Source,
}

impl Store {
    /// Fails (a constraint error) when the name exists.
    pub(crate) async fn insert_client(&self, client: StoredClient) -> Result<(), StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO clients (name, secret, created_at, source) VALUES (?1, ?2, ?3, ?4)",
                params![client.name, client.secret.expose(), client.created_at, client.source.as_str()],
            )?;
            tx.commit()
        })
        .await
    }

    /// Returns whether a row was deleted.
    pub(crate) async fn remove_client(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM clients WHERE name = ?1", params![name])?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    /// Replaces a client's secret and owner (a declared client's secret was
    /// rotated, or the config file took over a client the API had made).
    /// Returns whether the client exists.
    pub(crate) async fn set_client(&self, name: &str, secret: &Secret, source: Source) -> Result<bool, StoreError> {
        let (name, secret) = (name.to_string(), secret.expose().to_string());
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("UPDATE clients SET secret = ?2, source = ?3 WHERE name = ?1", params![name, secret, source.as_str()])?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    pub(crate) async fn clients(&self) -> Result<Vec<StoredClient>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare("SELECT name, secret, created_at, source FROM clients ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok(StoredClient {
                    name: r.get(0)?,
                    secret: Secret::new(r.get::<_, String>(1)?),
                    created_at: r.get(2)?,
                    source: Source::parse(&r.get::<_, String>(3)?),
                })
            })?;
            rows.collect()
        })
        .await
    }
}
