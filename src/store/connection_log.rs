//! The connection log: one row per ended visitor connection (who, from where,
//! how long, how many bytes, how it ended), written in batches by
//! `history::connection_log` and read by `/api/connections/log` and
//! `/api/stats/sources`. Bounded by age and by a row cap.
//!
//! A row is about 126 bytes on disk with its indexes (measured: an IPv4
//! source, a short client name): at the default cap of 1,000,000 rows the table
//! stays under 130 MB however long the daemon runs, whatever the retention says.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use rusqlite::{params, params_from_iter, Connection};

use super::db::{Store, StoreError};
use crate::core::protocol::Protocol;

/// One ended (or refused) visitor connection, as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoggedConnection {
    /// Unique in the process that served it (ids carry on across restarts: the
    /// next process starts after the largest stored one).
    pub(crate) id: u64,
    pub(crate) port: u16,
    pub(crate) protocol: Protocol,
    /// The tunnel client that served it (tunneled mappings only).
    pub(crate) client: Option<String>,
    /// The visitor's `ip:port`.
    pub(crate) source: String,
    /// Unix seconds.
    pub(crate) started_at: f64,
    pub(crate) ended_at: f64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    /// `closed`, `visitor_reset`, `target_reset`, ... (see `server::connections`).
    pub(crate) end: String,
    /// For `refused`: why (`acl`, `quota`, ...); for others, what was said, if anything.
    pub(crate) reason: Option<String>,
}

/// A connection on its way into the log, as its task hands it over when it
/// ends: nothing formatted, nothing copied (the writer formats the address,
/// off the data path, into buffers it reuses).
#[derive(Debug, Clone)]
pub(crate) struct EndedConnection {
    pub(crate) id: u64,
    pub(crate) port: u16,
    pub(crate) protocol: Protocol,
    pub(crate) client: Option<Arc<str>>,
    pub(crate) source: SocketAddr,
    /// Unix seconds.
    pub(crate) started_at: f64,
    pub(crate) ended_at: f64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    /// As [`LoggedConnection::end`].
    pub(crate) end: &'static str,
    pub(crate) reason: Option<String>,
}

/// What a log query asks for; every field narrows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogQuery {
    pub(crate) port: Option<u16>,
    pub(crate) protocol: Option<Protocol>,
    pub(crate) client: Option<String>,
    /// An IP address (every port of it) or an exact `ip:port`.
    pub(crate) source: Option<String>,
    /// Ended at or after (Unix seconds).
    pub(crate) from: Option<f64>,
    /// Ended before.
    pub(crate) to: Option<f64>,
    pub(crate) limit: u32,
}

/// One source address's share of a range: what `/api/stats/sources` ranks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SourceTotals {
    /// The IP address, without the port: one visitor's connections come from
    /// many ephemeral ports.
    pub(crate) source: String,
    pub(crate) connections: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
}

/// `ip:port` (or `[v6]:port`) → the IP address as text.
pub(crate) fn source_ip(source: &str) -> &str {
    match source.parse::<std::net::SocketAddr>() {
        Ok(_) => {
            let host = source.rsplit_once(':').map_or(source, |(host, _)| host);
            host.trim_start_matches('[').trim_end_matches(']')
        }
        Err(_) => source,
    }
}

/// Rows to keep: older than `retention_secs` before `now` go, then the oldest
/// beyond `max_rows`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogBounds {
    pub(crate) retention_secs: i64,
    pub(crate) max_rows: u64,
}

impl Store {
    /// Writes `batch` in one transaction, then trims the log to `bounds`.
    /// `rows` is how many rows the log held before (`None`: count them, once):
    /// the answer is how many it holds now, for the next batch — counting a
    /// million rows on every batch would hold the database for tens of ms.
    pub(crate) async fn log_connections(
        &self,
        batch: Vec<EndedConnection>,
        bounds: LogBounds,
        now: f64,
        rows: Option<u64>,
    ) -> Result<u64, StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            insert_rows(&tx, &batch)?;
            let rows = match rows {
                Some(rows) => rows + batch.len() as u64,
                None => tx.query_row("SELECT COUNT(*) FROM connection_log", [], |r| r.get::<_, i64>(0))?.max(0) as u64,
            };
            let rows = trim(&tx, bounds, now, rows)?;
            tx.commit()?;
            Ok(rows)
        })
        .await
    }

    /// The largest id stored, so a new process's ids follow on.
    pub(crate) async fn last_connection_id(&self) -> Result<u64, StoreError> {
        self.with_conn(|conn| conn.query_row("SELECT COALESCE(MAX(id), 0) FROM connection_log", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|id| id.max(0) as u64)
    }

    /// Ended connections matching `query`, newest first.
    pub(crate) async fn connection_log(&self, query: LogQuery) -> Result<Vec<LoggedConnection>, StoreError> {
        self.with_conn(move |conn| {
            let (filter, args) = where_clause(&query);
            let sql = format!(
                "SELECT id, port, client, source, started_at, ended_at, bytes_sent, bytes_received, end_reason, reason, protocol
                 FROM connection_log {filter} ORDER BY ended_at DESC, id DESC LIMIT {}",
                query.limit
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(args), |r| {
                Ok(LoggedConnection {
                    id: r.get::<_, i64>(0)? as u64,
                    port: r.get::<_, i64>(1)? as u16,
                    client: r.get(2)?,
                    source: r.get(3)?,
                    started_at: r.get(4)?,
                    ended_at: r.get(5)?,
                    bytes_sent: r.get::<_, i64>(6)? as u64,
                    bytes_received: r.get::<_, i64>(7)? as u64,
                    end: r.get(8)?,
                    reason: r.get(9)?,
                    protocol: Protocol::parse(&r.get::<_, String>(10)?).unwrap_or_default(),
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The source addresses (IPs) of the connections matching `query` (its
    /// `source` and `client` ignored), most bytes first, at most `query.limit`.
    pub(crate) async fn top_sources(&self, query: LogQuery) -> Result<Vec<SourceTotals>, StoreError> {
        self.with_conn(move |conn| {
            let query = LogQuery { source: None, client: None, ..query };
            let (filter, args) = where_clause(&query);
            let sql = format!(
                "SELECT source_ip, COUNT(*), SUM(bytes_sent), SUM(bytes_received) FROM connection_log {filter}
                 GROUP BY source_ip ORDER BY SUM(bytes_sent) + SUM(bytes_received) DESC, COUNT(*) DESC, source_ip LIMIT {}",
                query.limit
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(args), |r| {
                Ok(SourceTotals {
                    source: r.get(0)?,
                    connections: r.get::<_, i64>(1)? as u64,
                    bytes_sent: r.get::<_, i64>(2)? as u64,
                    bytes_received: r.get::<_, i64>(3)? as u64,
                })
            })?;
            rows.collect()
        })
        .await
    }
}

/// Rows per INSERT statement, largest first: one statement (one set of
/// cursors on the table and its two indexes, one bind-and-step round) for many
/// rows halves SQLite's work per row against a statement per row. A batch is
/// cut into these sizes only, so the four statements are prepared once and
/// then come from the cache. 64 × 11 values stays far below SQLite's limit on
/// bound parameters (12 with the protocol).
const ROWS_PER_INSERT: [usize; 4] = [64, 16, 4, 1];

/// The columns an ended connection fills, in `VALUES` order.
const INSERT_COLUMNS: &str =
    "id, port, client, source, source_ip, started_at, ended_at, bytes_sent, bytes_received, end_reason, reason, protocol";

/// A plain INSERT: ids are unique by construction (see `last_connection_id`),
/// and `OR REPLACE` would make SQLite keep a statement journal for every row.
fn insert_rows(tx: &Connection, mut batch: &[EndedConnection]) -> rusqlite::Result<()> {
    use rusqlite::ToSql;
    /// What a row binds that is not one of its fields as it is.
    #[derive(Default)]
    struct Derived {
        source: String,
        ip: String,
        numbers: [i64; 3],
        protocol: &'static str,
    }
    let mut derived: Vec<Derived> = Vec::new();
    while !batch.is_empty() {
        let size = ROWS_PER_INSERT.into_iter().find(|&size| size <= batch.len()).unwrap_or(1);
        let (chunk, rest) = batch.split_at(size);
        batch = rest;
        derived.resize_with(size, Derived::default);
        for (c, d) in chunk.iter().zip(derived.iter_mut()) {
            write_address(c.source, &mut d.source, &mut d.ip);
            d.numbers = [c.id as i64, c.bytes_sent as i64, c.bytes_received as i64];
            d.protocol = c.protocol.as_str();
        }
        let mut values: Vec<&dyn ToSql> = Vec::with_capacity(size * 12);
        for (c, d) in chunk.iter().zip(&derived) {
            values.extend_from_slice(&[
                &d.numbers[0],
                &c.port,
                &c.client as &dyn ToSql,
                &d.source,
                &d.ip,
                &c.started_at,
                &c.ended_at,
                &d.numbers[1],
                &d.numbers[2],
                &c.end,
                &c.reason,
                &d.protocol,
            ]);
        }
        let placeholders = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; size].join(", ");
        let sql = format!("INSERT INTO connection_log ({INSERT_COLUMNS}) VALUES {placeholders}");
        tx.prepare_cached(&sql)?.execute(values.as_slice())?;
    }
    Ok(())
}

/// `source` as `ip:port` and its IP alone, into reused buffers. IPv4 (nearly
/// every visitor) is written digit by digit: `Display` through `fmt` costs more
/// than SQLite's insert of the whole row's index entry.
fn write_address(source: SocketAddr, text: &mut String, ip: &mut String) {
    text.clear();
    ip.clear();
    match source {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    ip.push('.');
                }
                push_decimal(ip, u32::from(octet));
            }
            text.push_str(ip);
            text.push(':');
            push_decimal(text, u32::from(v4.port()));
        }
        SocketAddr::V6(v6) => {
            // Writing to a String cannot fail.
            let _ = write!(ip, "{}", v6.ip());
            let _ = write!(text, "{source}");
        }
    }
}

fn push_decimal(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &digit in digits[..len].iter().rev() {
        out.push(char::from(digit));
    }
}

/// Deletes what `bounds` no longer keeps from a log of `rows` rows; how many are left.
fn trim(conn: &Connection, bounds: LogBounds, now: f64, rows: u64) -> rusqlite::Result<u64> {
    let expired = conn.execute("DELETE FROM connection_log WHERE ended_at < ?1", params![now - bounds.retention_secs as f64])?;
    let mut rows = rows.saturating_sub(expired as u64);
    if rows > bounds.max_rows {
        let over = i64::try_from(rows - bounds.max_rows).unwrap_or(i64::MAX);
        let deleted = conn.execute(
            "DELETE FROM connection_log WHERE id IN (SELECT id FROM connection_log ORDER BY ended_at, id LIMIT ?1)",
            params![over],
        )?;
        rows = rows.saturating_sub(deleted as u64);
    }
    Ok(rows)
}

fn where_clause(query: &LogQuery) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut terms = Vec::new();
    let mut args = Vec::new();
    if let Some(port) = query.port {
        terms.push("port = ?");
        args.push(Value::Integer(i64::from(port)));
    }
    if let Some(protocol) = query.protocol {
        terms.push("protocol = ?");
        args.push(Value::Text(protocol.as_str().into()));
    }
    if let Some(client) = &query.client {
        terms.push("client = ?");
        args.push(Value::Text(client.clone()));
    }
    if let Some(source) = &query.source {
        terms.push(if source_ip(source) == source.as_str() { "source_ip = ?" } else { "source = ?" });
        args.push(Value::Text(source.clone()));
    }
    if let Some(from) = query.from {
        terms.push("ended_at >= ?");
        args.push(Value::Real(from));
    }
    if let Some(to) = query.to {
        terms.push("ended_at < ?");
        args.push(Value::Real(to));
    }
    let filter = if terms.is_empty() { String::new() } else { format!("WHERE {}", terms.join(" AND ")) };
    (filter, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, source: &str, ended_at: f64, sent: u64) -> EndedConnection {
        EndedConnection {
            id,
            port: 4000,
            protocol: Protocol::Tcp,
            client: None,
            source: source.parse().unwrap(),
            started_at: ended_at - 1.0,
            ended_at,
            bytes_sent: sent,
            bytes_received: 1,
            end: "closed",
            reason: None,
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let (mut text, mut ip) = (String::new(), String::new());
        for source in ["127.0.0.2:5000", "0.0.0.0:0", "255.255.255.255:65535", "10.20.0.9:80", "[::1]:5000", "[fe80::1%2]:22"] {
            let source: SocketAddr = source.parse().unwrap();
            write_address(source, &mut text, &mut ip);
            assert_eq!((text.as_str(), ip.as_str()), (source.to_string().as_str(), source.ip().to_string().as_str()));
        }
    }

    #[tokio::test]
    async fn a_batch_cut_into_statements_of_every_size_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bounds = LogBounds { retention_secs: 1000, max_rows: 1000 };
        // 150 = 64 + 64 + 16 + 4 + 1 + 1: every statement size, twice the largest.
        let batch: Vec<_> = (1..=150).map(|id| row(id, &format!("10.0.{}.{}:{}", id / 200, id % 200, 1000 + id), 990.0, id)).collect();
        assert_eq!(store.log_connections(batch, bounds, 1000.0, None).await.unwrap(), 150);
        let all = store.connection_log(LogQuery { limit: 1000, ..LogQuery::default() }).await.unwrap();
        let mut ids: Vec<u64> = all.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=150).collect::<Vec<_>>());
        let row_77 = all.iter().find(|c| c.id == 77).unwrap();
        assert_eq!((row_77.source.as_str(), row_77.bytes_sent), ("10.0.0.77:1077", 77));
    }

    #[test]
    fn source_ip_drops_the_port() {
        assert_eq!(source_ip("127.0.0.2:5000"), "127.0.0.2");
        assert_eq!(source_ip("[::1]:5000"), "::1");
        assert_eq!(source_ip("127.0.0.2"), "127.0.0.2");
    }

    #[tokio::test]
    async fn the_log_keeps_its_bounds_and_ranks_sources() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bounds = LogBounds { retention_secs: 100, max_rows: 3 };
        let batch = vec![row(1, "10.0.0.1:1", 1.0, 5), row(2, "10.0.0.2:1", 950.0, 50), row(3, "10.0.0.2:2", 960.0, 50)];
        let rows = store.log_connections(batch, bounds, 1000.0, None).await.unwrap();
        assert_eq!(rows, 2);
        let all = store.connection_log(LogQuery { limit: 10, ..LogQuery::default() }).await.unwrap();
        assert_eq!(all.iter().map(|c| c.id).collect::<Vec<_>>(), vec![3, 2], "older than the retention: gone");
        let batch = vec![row(4, "10.0.0.3:1", 970.0, 1), row(5, "10.0.0.3:2", 980.0, 1)];
        assert_eq!(store.log_connections(batch, bounds, 1000.0, Some(rows)).await.unwrap(), 3);
        let all = store.connection_log(LogQuery { limit: 10, ..LogQuery::default() }).await.unwrap();
        assert_eq!(all.iter().map(|c| c.id).collect::<Vec<_>>(), vec![5, 4, 3], "the cap keeps the newest");
        let top = store.top_sources(LogQuery { limit: 10, ..LogQuery::default() }).await.unwrap();
        assert_eq!(top[0].source, "10.0.0.2");
        assert_eq!((top[0].connections, top[0].bytes_sent), (1, 50));
        assert_eq!((top[1].source.as_str(), top[1].connections), ("10.0.0.3", 2));
        let by_ip = store.connection_log(LogQuery { source: Some("10.0.0.3".into()), limit: 10, ..LogQuery::default() }).await.unwrap();
        assert_eq!(by_ip.len(), 2);
        assert_eq!(store.last_connection_id().await.unwrap(), 5);
    }
}
