//! The state database: opening it (private, WAL, exclusive), the errors an
//! operator can act on, and the one connection every query runs on.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::schema;
use crate::core::sync::lock;

/// Why the state database could not be used; each message names the file.

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
            schema::create(&conn)?;
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

    pub(super) async fn with_conn<T: Send + 'static>(
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
}
