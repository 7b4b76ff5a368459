//! SQLite persistence for mappings and traffic history (`history` submodule).
//!
//! Every write is one transaction with `synchronous=FULL`, so a mapping the API
//! reported as created is on disk, and a crash never leaves half a row. Calls are
//! short and rare (API writes, start-up restore); they run on the blocking pool.

pub mod events;
pub mod history;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::core::secret::Secret;
use crate::core::sync::lock;
use crate::policy::Policy;

/// A mapping as stored and as the API shows it (plus live status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSpec {
    pub source_port: u16,
    pub target_host: String,
    pub target_port: u16,
    pub use_tunnel: bool,
    /// The tunnel client that reaches the target; `None` for a direct mapping.
    pub client: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
}

/// A named tunnel client as stored (`default` is not: its secret is `server.secret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClient {
    pub name: String,
    pub secret: Secret,
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}: {error}")]
    StateDir { path: String, error: std::io::Error },
    #[error("cannot make the state database {path} private (mode 0600; it holds the clients' secrets): {error}")]
    Private { path: String, error: std::io::Error },
    /// Each message names the file and, where the operator can act, says how.
    #[error("cannot open the state database {path}: {error}{}", advice(error))]
    Open { path: String, error: rusqlite::Error },
    #[error("state database {path}: {error}{}", advice(error))]
    Sqlite { path: String, error: rusqlite::Error },
    #[error("state database {path}: a stored mapping has an invalid port {port}; delete that row or restore a backup")]
    BadRow { path: String, port: i64 },
    #[error("state database {path}: the mapping on port {port} has an unreadable policy ({error}); fix or delete that row")]
    BadPolicy { path: String, port: i64, error: String },
    #[error("database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What to do about errors an operator can fix.
fn advice(error: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode::*;
    match error.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => {
            " (the file is damaged: stop tunneld, move the file aside or restore a backup, then start again and re-create the mappings)"
        }
        Some(ReadOnly | CannotOpen | PermissionDenied) => " (check that the state directory and the file are writable by tunneld)",
        Some(DiskFull) => " (the disk is full)",
        Some(DatabaseBusy | DatabaseLocked) => " (another process holds the database: only one tunneld may use a state directory)",
        _ => "",
    }
}

fn policy_json(policy: &Policy) -> String {
    serde_json::to_string(policy).unwrap_or_else(|_| "{}".into())
}

/// Databases made before mappings had a policy get the column, empty (`{}`);
/// those made before named clients get the `client` column, with their tunneled
/// mappings belonging to `default`, the one client there was.
fn migrate_mapping_columns(conn: &Connection) -> rusqlite::Result<()> {
    let has = |column: &str| conn.prepare("SELECT 1 FROM pragma_table_info('mappings') WHERE name = ?1")?.exists([column]);
    if !has("policy")? {
        conn.execute_batch("ALTER TABLE mappings ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'")?;
    }
    if !has("client")? {
        conn.execute_batch(
            "ALTER TABLE mappings ADD COLUMN client TEXT;
             UPDATE mappings SET client = 'default' WHERE use_tunnel != 0;",
        )?;
    }
    Ok(())
}

/// The database holds the clients' secrets: readable by tunneld alone (0600),
/// created so and tightened if an older version left it wider. SQLite gives its
/// `-wal` file the same mode.
fn keep_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
                tracing::info!(path = %path.display(), "state database made private (mode 0600): it holds the clients' secrets");
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Arc<str>,
}

impl Store {
    /// Opens (creating if needed) `tunneld.db` in `state_dir`.
    ///
    /// The database is held in exclusive locking mode: with WAL that keeps the
    /// WAL index in process memory instead of a shared-memory `-shm` file, whose
    /// mapping turns any failure to write it (a full or read-only disk, a file
    /// truncated underneath) into SIGBUS instead of an error. Only one tunneld
    /// may use a state directory anyway.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|error| StoreError::StateDir { path: state_dir.display().to_string(), error })?;
        let path = state_dir.join("tunneld.db");
        let path_text = path.display().to_string();
        let open = |path: &Path| -> rusqlite::Result<Connection> {
            let conn = Connection::open(path)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS mappings (
                    source_port INTEGER PRIMARY KEY CHECK (source_port BETWEEN 1 AND 65535),
                    target_host TEXT NOT NULL,
                    target_port INTEGER NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
                    use_tunnel  INTEGER NOT NULL,
                    created_at  INTEGER NOT NULL
                );",
            )?;
            migrate_mapping_columns(&conn)?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS clients (
                    name       TEXT PRIMARY KEY,
                    secret     TEXT NOT NULL,
                    created_at INTEGER NOT NULL
                );",
            )?;
            history::create_schema(&conn)?;
            events::create_schema(&conn)?;
            Ok(conn)
        };
        keep_private(&path).map_err(|error| StoreError::Private { path: path_text.clone(), error })?;
        let conn = open(&path).map_err(|error| StoreError::Open { path: path_text.clone(), error })?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)), path: Arc::from(path_text) })
    }

    /// The database file, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&conn);
            f(&mut guard).map_err(|error| StoreError::Sqlite { path: path.to_string(), error })
        })
        .await?
    }

    pub async fn insert(&self, m: MappingSpec, policy: &Policy) -> Result<(), StoreError> {
        let policy = policy_json(policy);
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO mappings (source_port, target_host, target_port, use_tunnel, created_at, policy, client) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![m.source_port, m.target_host, m.target_port, m.use_tunnel, m.created_at, policy, m.client],
            )?;
            tx.commit()
        })
        .await
    }

    /// Replaces a mapping's policy; returns whether the mapping exists.
    pub async fn set_policy(&self, port: u16, policy: &Policy) -> Result<bool, StoreError> {
        let policy = policy_json(policy);
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("UPDATE mappings SET policy = ?2 WHERE source_port = ?1", params![port, policy])?;
            tx.commit()?;
            Ok(n > 0)
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

    pub async fn list(&self) -> Result<Vec<(MappingSpec, Policy)>, StoreError> {
        let rows = self
            .with_conn(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT source_port, target_host, target_port, use_tunnel, created_at, policy, client FROM mappings ORDER BY source_port",
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
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        let port =
            |p: i64| u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| StoreError::BadRow { path: self.path.to_string(), port: p });
        rows.into_iter()
            .map(|(sp, host, tp, tunnel, created, policy, client)| {
                let policy = serde_json::from_str(&policy).map_err(|e| StoreError::BadPolicy {
                    path: self.path.to_string(),
                    port: sp,
                    error: e.to_string(),
                })?;
                let spec = MappingSpec {
                    source_port: port(sp)?,
                    target_host: host,
                    target_port: port(tp)?,
                    use_tunnel: tunnel,
                    client: if tunnel { Some(client.unwrap_or_else(|| crate::core::names::DEFAULT_CLIENT.to_string())) } else { None },
                    created_at: created,
                };
                Ok((spec, policy))
            })
            .collect()
    }
}

impl Store {
    /// Fails (a constraint error) when the name exists.
    pub async fn insert_client(&self, client: StoredClient) -> Result<(), StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO clients (name, secret, created_at) VALUES (?1, ?2, ?3)",
                params![client.name, client.secret.expose(), client.created_at],
            )?;
            tx.commit()
        })
        .await
    }

    /// Returns whether a row was deleted.
    pub async fn remove_client(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let n = tx.execute("DELETE FROM clients WHERE name = ?1", params![name])?;
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn clients(&self) -> Result<Vec<StoredClient>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare("SELECT name, secret, created_at FROM clients ORDER BY name")?;
            let rows = stmt.query_map([], |r| {
                Ok(StoredClient { name: r.get(0)?, secret: Secret::new(r.get::<_, String>(1)?), created_at: r.get(2)? })
            })?;
            rows.collect()
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
        let m = MappingSpec {
            source_port: 4000,
            target_host: "127.0.0.1".into(),
            target_port: 22,
            use_tunnel: true,
            client: Some("office".into()),
            created_at: 1,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert(m.clone(), &Policy::default()).await.unwrap();
            assert!(store.insert(m.clone(), &Policy::default()).await.is_err(), "duplicate port must be refused");
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap(), vec![(m, Policy::default())]);
        let policy =
            Policy { bandwidth_limit: Some(5), allow: vec![crate::policy::Cidr::parse("10.0.0.0/8").unwrap()], ..Policy::default() };
        assert!(store.set_policy(4000, &policy).await.unwrap());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap()[0].1, policy);
        assert!(store.remove(4000).await.unwrap());
        assert!(!store.remove(4000).await.unwrap());
        assert!(store.list().await.unwrap().is_empty());
        assert!(!dir.path().join("tunneld.db-shm").exists(), "no shared-memory file to fault on");
    }

    #[tokio::test]
    async fn a_database_from_before_policies_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("tunneld.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE mappings (source_port INTEGER PRIMARY KEY, target_host TEXT NOT NULL, target_port INTEGER NOT NULL,
                 use_tunnel INTEGER NOT NULL, created_at INTEGER NOT NULL);
                 INSERT INTO mappings VALUES (4000, 'example.com', 22, 0, 7);",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows = store.list().await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].1, Policy::default());
        assert_eq!(rows[0].0.client, None, "a direct mapping has no client");
        assert!(store.set_policy(4000, &Policy { description: Some("x".into()), ..Policy::default() }).await.unwrap());
    }

    #[tokio::test]
    async fn tunneled_mappings_from_before_named_clients_belong_to_default() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("tunneld.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE mappings (source_port INTEGER PRIMARY KEY, target_host TEXT NOT NULL, target_port INTEGER NOT NULL,
                 use_tunnel INTEGER NOT NULL, created_at INTEGER NOT NULL, policy TEXT NOT NULL DEFAULT '{}');
                 INSERT INTO mappings VALUES (4000, '10.0.0.5', 22, 1, 7, '{}');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.list().await.unwrap()[0].0.client.as_deref(), Some("default"));
    }

    #[tokio::test]
    async fn clients_survive_reopen_and_names_are_unique() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tunneld.db");
        let office = StoredClient { name: "office".into(), secret: Secret::new("s".repeat(64)), created_at: 3 };
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert_client(office.clone()).await.unwrap();
            assert!(store.insert_client(office.clone()).await.is_err(), "a name is unique");
        }
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600, "secrets inside: private");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600, "tightened");
        assert_eq!(store.clients().await.unwrap(), vec![office]);
        assert!(store.remove_client("office").await.unwrap());
        assert!(!store.remove_client("office").await.unwrap());
        assert!(store.clients().await.unwrap().is_empty());
    }

    #[test]
    fn a_damaged_file_is_named_once_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tunneld.db"), vec![b'x'; 8192]).unwrap();
        let err = Store::open(dir.path()).err().expect("garbage is not a database").to_string();
        assert!(err.contains(&dir.path().join("tunneld.db").display().to_string()), "{err}");
        assert!(err.contains("move the file aside"), "{err}");
        assert_eq!(err.matches("not a database").count(), 1, "{err}");
    }
}
