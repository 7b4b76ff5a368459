//! SQLite persistence for mappings and traffic history (`history` submodule).
//!
//! Every write is one transaction with `synchronous=FULL`, so a mapping the API
//! reported as created is on disk, and a crash never leaves half a row. Calls are
//! short and rare (API writes, start-up restore); they run on the blocking pool.

pub mod history;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

/// A mapping as stored and as the API shows it (plus live status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSpec {
    pub source_port: u16,
    pub target_host: String,
    pub target_port: u16,
    pub use_tunnel: bool,
    /// Unix seconds.
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot create state dir {path}: {source}")]
    StateDir { path: String, source: std::io::Error },
    #[error("database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("database lock poisoned")]
    Poisoned,
    #[error("stored mapping has an invalid port {0}")]
    BadRow(i64),
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if needed) `tunneld.db` in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::StateDir { path: state_dir.display().to_string(), source })?;
        let conn = Connection::open(state_dir.join("tunneld.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS mappings (
                source_port INTEGER PRIMARY KEY CHECK (source_port BETWEEN 1 AND 65535),
                target_host TEXT NOT NULL,
                target_port INTEGER NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
                use_tunnel  INTEGER NOT NULL,
                created_at  INTEGER NOT NULL
            );",
        )?;
        history::create_schema(&conn)?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)) })
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StoreError::Poisoned)?;
            f(&mut guard)
        })
        .await?
    }

    pub async fn insert(&self, m: MappingSpec) -> Result<(), StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO mappings (source_port, target_host, target_port, use_tunnel, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![m.source_port, m.target_host, m.target_port, m.use_tunnel, m.created_at],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Returns whether a row was deleted.
    pub async fn remove(&self, port: u16) -> Result<bool, StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM mappings WHERE source_port = ?1", params![port])?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn list(&self) -> Result<Vec<MappingSpec>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt =
                conn.prepare("SELECT source_port, target_host, target_port, use_tunnel, created_at FROM mappings ORDER BY source_port")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, bool>(3)?, r.get::<_, i64>(4)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (sp, host, tp, tunnel, created) = row?;
                let source_port = u16::try_from(sp).map_err(|_| StoreError::BadRow(sp))?;
                let target_port = u16::try_from(tp).map_err(|_| StoreError::BadRow(tp))?;
                out.push(MappingSpec { source_port, target_host: host, target_port, use_tunnel: tunnel, created_at: created });
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mappings_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = MappingSpec { source_port: 4000, target_host: "127.0.0.1".into(), target_port: 22, use_tunnel: true, created_at: 1 };
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert(m.clone()).await.unwrap();
            assert!(store.insert(m.clone()).await.is_err(), "duplicate port must be refused");
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap(), vec![m]);
        assert!(store.remove(4000).await.unwrap());
        assert!(!store.remove(4000).await.unwrap());
        assert!(store.list().await.unwrap().is_empty());
    }
}
