//! The state database: opening it (private, WAL, exclusive), the errors an
//! operator can act on, and the one connection every query runs on.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::schema;
use crate::core::sync::lock;

/// Why the state database could not be used. Each message names the file (or
/// directory) and, where the operator can act, says how.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}: {error}")]
    StateDir {
        /// The directory.
        path: String,
        /// Why not.
        error: std::io::Error,
    },
    /// The database file could not be made readable by tunneld alone.
    #[error("cannot make the state database {path} private (mode 0600; it holds the clients' secrets): {error}")]
    Private {
        /// The database file.
        path: String,
        /// Why not.
        error: std::io::Error,
    },
    /// The database could not be opened or brought up to date.
    #[error("cannot open the state database {path}: {error}{}", advice(error))]
    Open {
        /// The database file.
        path: String,
        /// What SQLite said.
        error: rusqlite::Error,
    },
    /// A query failed.
    #[error("state database {path}: {error}{}", advice(error))]
    Sqlite {
        /// The database file.
        path: String,
        /// What SQLite said.
        error: rusqlite::Error,
    },
    /// A stored mapping's port is outside 1–65535: a damaged row.
    #[error("state database {path}: a stored mapping has an invalid port {port}; delete that row or restore a backup")]
    BadRow {
        /// The database file.
        path: String,
        /// The port as stored.
        port: i64,
    },
    /// A stored mapping's policy does not parse: a damaged row.
    #[error("state database {path}: the mapping on port {port} has an unreadable policy ({error}); fix or delete that row")]
    BadPolicy {
        /// The database file.
        path: String,
        /// The mapping's port.
        port: i64,
        /// Why its policy does not parse.
        error: String,
    },
    /// The blocking task that ran the query panicked or was cancelled.
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

/// The state database, shared by every part of the server (cheap to clone).
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
    pub(crate) fn path(&self) -> &str {
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
