//! `/api/connections`, `/api/connection/close`, `/api/connections/log` and
//! `/api/stats/sources`: who is connected now, who was, and who moved the most.

use serde::{Deserialize, Serialize};

/// One open visitor connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenConnection {
    /// Unique in the process (and, with the log on, across restarts).
    pub id: u64,
    /// The mapping's port.
    pub port: u16,
    /// `tcp`.
    pub protocol: String,
    /// The tunnel client serving it; `null` for a direct mapping.
    pub client: Option<String>,
    /// The visitor's `ip:port`.
    pub source: String,
    /// When it was accepted (Unix seconds).
    pub started_at: f64,
    /// Visitor → target bytes so far: the same counting as the mapping's `bytes_sent`.
    pub bytes_sent: u64,
    /// Target → visitor bytes so far.
    pub bytes_received: u64,
    /// Visitor → target bytes per second over the last `rate_window_secs`.
    pub sent_rate: f64,
    /// Target → visitor bytes per second over the last `rate_window_secs`.
    pub received_rate: f64,
}

/// `GET /api/connections`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionList {
    /// Oldest first, at most `?limit=`.
    pub connections: Vec<OpenConnection>,
    /// How many match in all (may exceed `connections.len()`).
    pub count: usize,
    /// The window the rates are over, in seconds.
    pub rate_window_secs: f64,
}

/// `POST /api/connection/close`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseConnection {
    /// The open connection to reset.
    pub id: u64,
}

/// `POST /api/connection/close`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionClosed {
    /// The connection that was reset.
    pub id: u64,
}

/// One ended (or refused) visitor connection from the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedConnection {
    /// Its id while it was open.
    pub id: u64,
    /// The mapping's port.
    pub port: u16,
    /// `tcp`.
    pub protocol: String,
    /// The tunnel client that served it; `null` for a direct mapping.
    pub client: Option<String>,
    /// The visitor's `ip:port`.
    pub source: String,
    /// When it was accepted (Unix seconds).
    pub started_at: f64,
    /// When it ended.
    pub ended_at: f64,
    /// Visitor → target bytes.
    pub bytes_sent: u64,
    /// Target → visitor bytes.
    pub bytes_received: u64,
    /// How it ended: `closed`, `visitor_reset`, `target_reset`, `idle_timeout`,
    /// `target_unreachable`, `refused`, `mapping_removed`, `client_removed`,
    /// `shutdown`, `closed_by_api` (new ones may come).
    pub end: String,
    /// For `refused`: why (`acl`, `quota`, `connection_limit`, `process_limit`,
    /// `loop`, `no_descriptors`); for `target_unreachable` and `target_reset`,
    /// what was said, when something was; else `null`.
    pub reason: Option<String>,
}

/// `GET /api/connections/log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionLog {
    /// Newest first, at most `?limit=`.
    pub connections: Vec<LoggedConnection>,
    /// `connections.len()`.
    pub count: usize,
    /// Whether the log is on (`history.connection_log`): off, it stays empty.
    pub enabled: bool,
}

/// One source address's share of a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceTotals {
    /// The visitor's IP address (without the port: one visitor comes from many ports).
    pub source: String,
    /// Its connections that ended in the range (refused ones included).
    pub connections: u64,
    /// Visitor → target bytes.
    pub bytes_sent: u64,
    /// Target → visitor bytes.
    pub bytes_received: u64,
}

/// `GET /api/stats/sources`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sources {
    /// Most bytes (sent plus received) first.
    pub sources: Vec<SourceTotals>,
    /// The mapping asked about; `null`: all.
    pub port: Option<u16>,
    /// The range (Unix seconds, `[from, to)`, by when connections ended).
    pub from: i64,
    /// End of the range.
    pub to: i64,
}
