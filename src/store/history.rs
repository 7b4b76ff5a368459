//! Traffic history in SQLite: minute, hour and day buckets per port (and per
//! tunnel client), lifetime totals per port, which minutes the recorder was
//! running at all (so an idle minute and a minute the daemon was down differ),
//! and each recorder run's start and last write (so an outage shorter than a
//! minute is known too).
//!
//! Writes come only from the recorder (`crate::history`), one transaction per
//! flush. Every statement a flush runs is an upsert on a primary key or a delete
//! bounded by a `LIMIT`, so its cost depends on the number of mappings that moved
//! bytes, never on how much history is stored.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, Transaction};

use super::db::{Store, StoreError};
use super::schema::{MAPPING_TABLES, TUNNEL_TABLES};
use crate::core::calendar::{period_label, Step};
use crate::core::protocol::{MappingKey, Protocol};
use crate::core::traffic::Traffic;

/// A stored mapping key (the `port` column: see [`MappingKey::history_id`])
/// that is none: a damaged row, reported as SQLite reports any value that does
/// not fit its column's type.
fn stored_port(column: usize, port: i64) -> rusqlite::Result<MappingKey> {
    MappingKey::from_history_id(port).ok_or(rusqlite::Error::IntegralValueOutOfRange(column, port))
}

/// Rows each retention step may delete per table and flush: enough to keep up
/// with 1,000 busy mappings at one flush every 10 s, small enough that a flush
/// after a long downtime stays short.
pub(crate) const RETENTION_BATCH: i64 = 5_000;

/// Where a step's buckets are stored (months are summed from days).
fn mapping_table(step: Step) -> &'static str {
    match step {
        Step::Minute => MAPPING_TABLES[0],
        Step::Hour => MAPPING_TABLES[1],
        Step::Day | Step::Month => MAPPING_TABLES[2],
    }
}

/// Bytes one port (or client) moved since the previous flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delta<K> {
    pub key: K,
    /// What the counters gained since the previous flush.
    pub traffic: Traffic,
}

/// Everything one flush writes.
#[derive(Debug, Clone)]
pub(crate) struct Flush {
    /// When the readings were taken (Unix seconds).
    pub at: i64,
    /// When this recorder run (process) started: its row in `history_runs`.
    pub run_started: i64,
    pub utc_offset: i64,
    pub mappings: Vec<Delta<MappingKey>>,
    pub tunnel: Vec<Delta<String>>,
    /// Buckets older than these (Unix seconds) are deleted, a bounded batch per flush.
    pub keep_minutes_from: i64,
    pub keep_hours_from: i64,
    pub keep_days_from: i64,
    pub retention_batch: i64,
}

/// How many expired rows a flush deleted (minute, hour, day; coverage included in minute).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub minute: usize,
    pub hour: usize,
    pub day: usize,
}

/// One point of a history series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Point {
    pub t: i64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// One row of a report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReportRow {
    /// Local calendar label (`2026-11-29T14:00`, `2026-11-29`, `2026-11`).
    pub period: String,
    pub period_start: i64,
    pub port: u16,
    pub protocol: Protocol,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// The stored `sent` and `received` columns (signed in SQLite) as traffic.
fn stored_traffic(sent: i64, received: i64) -> Traffic {
    Traffic { sent: to_u64(sent), received: to_u64(received) }
}

/// Adds each delta to its bucket (one per table, starting at `starts`) of
/// `tables`, whose key column is `key`.
fn add_to_buckets<K: rusqlite::ToSql>(
    tx: &Transaction<'_>,
    tables: [&str; 3],
    key: &str,
    starts: [i64; 3],
    deltas: &[Delta<K>],
) -> rusqlite::Result<()> {
    for (table, t) in tables.iter().zip(starts) {
        let mut stmt = tx.prepare_cached(&format!(
            "INSERT INTO {table} (t, {key}, sent, received) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (t, {key}) DO UPDATE SET sent = sent + excluded.sent, received = received + excluded.received"
        ))?;
        for d in deltas {
            stmt.execute(params![t, d.key, to_i64(d.traffic.sent), to_i64(d.traffic.received)])?;
        }
    }
    Ok(())
}

fn write_flush(tx: &Transaction<'_>, f: &Flush) -> rusqlite::Result<Pruned> {
    let starts = [Step::Minute, Step::Hour, Step::Day].map(|s| s.bucket_start(f.at, f.utc_offset));
    // The `port` column holds the mapping's key as one integer (a TCP mapping's port, as ever).
    let mappings: Vec<Delta<i64>> = f.mappings.iter().map(|d| Delta { key: d.key.history_id(), traffic: d.traffic }).collect();
    add_to_buckets(tx, MAPPING_TABLES, "port", starts, &mappings)?;
    add_to_buckets(tx, TUNNEL_TABLES, "client", starts, &f.tunnel)?;
    let mut lifetime = tx.prepare_cached(
        "INSERT INTO history_lifetime (port, sent, received) VALUES (?1, ?2, ?3)
         ON CONFLICT (port) DO UPDATE SET sent = sent + excluded.sent, received = received + excluded.received",
    )?;
    for d in &f.mappings {
        lifetime.execute(params![d.key.history_id(), to_i64(d.traffic.sent), to_i64(d.traffic.received)])?;
    }
    tx.prepare_cached("INSERT OR IGNORE INTO history_coverage (t) VALUES (?1)")?.execute(params![starts[0]])?;
    tx.prepare_cached(
        "INSERT INTO history_runs (started, last) VALUES (?1, ?2)
         ON CONFLICT (started) DO UPDATE SET last = MAX(last, excluded.last)",
    )?
    .execute(params![f.run_started, f.at])?;

    let mut pruned = Pruned::default();
    let cutoffs = [f.keep_minutes_from, f.keep_hours_from, f.keep_days_from];
    for ((mapping_table, tunnel_table), (cutoff, count)) in
        MAPPING_TABLES.iter().zip(TUNNEL_TABLES).zip(cutoffs.into_iter().zip([&mut pruned.minute, &mut pruned.hour, &mut pruned.day]))
    {
        // Oldest first, through the primary key: a range scan that stops at the limit.
        *count += tx
            .prepare_cached(&format!(
                "DELETE FROM {mapping_table} WHERE (t, port) IN
               (SELECT t, port FROM {mapping_table} WHERE t < ?1 ORDER BY t LIMIT ?2)"
            ))?
            .execute(params![cutoff, f.retention_batch])?;
        *count += tx
            .prepare_cached(&format!(
                "DELETE FROM {tunnel_table} WHERE (t, client) IN
               (SELECT t, client FROM {tunnel_table} WHERE t < ?1 ORDER BY t LIMIT ?2)"
            ))?
            .execute(params![cutoff, f.retention_batch])?;
    }
    pruned.minute += tx
        .prepare_cached("DELETE FROM history_coverage WHERE t IN (SELECT t FROM history_coverage WHERE t < ?1 ORDER BY t LIMIT ?2)")?
        .execute(params![f.keep_minutes_from, f.retention_batch])?;
    // Runs are kept as long as minutes: what they tell is finer than a minute.
    tx.prepare_cached(
        "DELETE FROM history_runs WHERE started IN (SELECT started FROM history_runs WHERE last < ?1 ORDER BY started LIMIT ?2)",
    )?
    .execute(params![f.keep_minutes_from, f.retention_batch])?;
    Ok(pruned)
}

/// Sums per bucket start of `step` over `[from, to)`, one port or all.
fn sums(
    conn: &Connection,
    step: Step,
    port: Option<MappingKey>,
    from: i64,
    to: i64,
    utc_offset: i64,
) -> rusqlite::Result<BTreeMap<i64, Traffic>> {
    let table = mapping_table(step);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT t, SUM(sent), SUM(received) FROM {table}
         WHERE t >= ?1 AND t < ?2 AND (?3 IS NULL OR port = ?3) GROUP BY t"
    ))?;
    let port = port.map(MappingKey::history_id);
    let rows = stmt.query_map(params![from, to, port], |r| Ok((r.get::<_, i64>(0)?, stored_traffic(r.get(1)?, r.get(2)?))))?;
    let mut out: BTreeMap<i64, Traffic> = BTreeMap::new();
    for row in rows {
        let (t, traffic) = row?;
        // Rows written under another utc_offset still land in exactly one bucket.
        *out.entry(step.bucket_start(t, utc_offset)).or_default() += traffic;
    }
    Ok(out)
}

fn covered_minutes(conn: &Connection, from: i64, to: i64) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached("SELECT t FROM history_coverage WHERE t >= ?1 AND t < ?2 ORDER BY t")?;
    let rows = stmt.query_map(params![from, to], |r| r.get::<_, i64>(0))?;
    rows.collect()
}

/// A history series over `[from, to)` (bucket-aligned by the caller's step).
/// Minute points exist only for minutes the recorder ran (idle ones at 0), so a
/// gap in the series is a time the daemon was not recording; coarser steps have a
/// point for every bucket.
pub(crate) fn points(
    conn: &Connection,
    step: Step,
    port: Option<MappingKey>,
    from: i64,
    to: i64,
    utc_offset: i64,
) -> rusqlite::Result<Vec<Point>> {
    let first = step.bucket_start(from, utc_offset);
    let sums = sums(conn, step, port, first, to, utc_offset)?;
    let point = |t: i64| {
        let Traffic { sent, received } = sums.get(&t).copied().unwrap_or_default();
        Point { t, bytes_sent: sent, bytes_received: received }
    };
    if step == Step::Minute {
        return Ok(covered_minutes(conn, first, to)?.into_iter().map(point).collect());
    }
    let mut out = Vec::new();
    let mut t = first;
    while t < to {
        out.push(point(t));
        t = step.next(t, utc_offset);
    }
    Ok(out)
}

/// Per-period, per-port totals over `[from, to)`; ports without traffic in a
/// period have no row.
pub(crate) fn report(conn: &Connection, period: Step, from: i64, to: i64, utc_offset: i64) -> rusqlite::Result<Vec<ReportRow>> {
    let first = period.bucket_start(from, utc_offset);
    let table = mapping_table(period);
    let mut stmt = conn.prepare_cached(&format!("SELECT t, port, sent, received FROM {table} WHERE t >= ?1 AND t < ?2"))?;
    let rows =
        stmt.query_map(params![first, to], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, stored_traffic(r.get(2)?, r.get(3)?))))?;
    let mut totals: BTreeMap<(i64, MappingKey), Traffic> = BTreeMap::new();
    for row in rows {
        let (t, port, traffic) = row?;
        let port = stored_port(1, port)?;
        *totals.entry((period.bucket_start(t, utc_offset), port)).or_default() += traffic;
    }
    Ok(totals
        .into_iter()
        .filter(|(_, traffic)| !traffic.is_zero())
        .map(|((start, port), traffic)| ReportRow {
            period: period_label(start, period, utc_offset),
            period_start: start,
            port: port.port,
            protocol: port.protocol,
            bytes_sent: traffic.sent,
            bytes_received: traffic.received,
        })
        .collect())
}

/// Recorder runs that may matter for a range, see [`runs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Runs {
    /// The last write of the latest run that ended before the range (`None`:
    /// none is stored).
    pub before: Option<i64>,
    /// (started, last write) of each run that wrote in or after the range's
    /// start and started before its end, oldest first.
    pub runs: Vec<(i64, i64)>,
}

/// The recorder runs that tell what of `[from, to)` was recorded.
fn runs(conn: &Connection, from: i64, to: i64) -> rusqlite::Result<Runs> {
    let before: Option<i64> =
        conn.prepare_cached("SELECT MAX(last) FROM history_runs WHERE last < ?1")?.query_row(params![from], |r| r.get(0))?;
    let mut stmt = conn.prepare_cached("SELECT started, last FROM history_runs WHERE last >= ?1 AND started < ?2 ORDER BY started")?;
    let rows = stmt.query_map(params![from, to], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
    Ok(Runs { before, runs: rows.collect::<rusqlite::Result<_>>()? })
}

/// Stored lifetime totals per port.
pub(crate) fn lifetime(conn: &Connection) -> rusqlite::Result<BTreeMap<MappingKey, Traffic>> {
    let mut stmt = conn.prepare_cached("SELECT port, sent, received FROM history_lifetime")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, stored_traffic(r.get(1)?, r.get(2)?))))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (port, traffic) = row?;
        out.insert(stored_port(0, port)?, traffic);
    }
    Ok(out)
}

/// Tunnel wire bytes per client and bucket of `step` (no months) over `[from, to)`.
#[cfg(test)]
pub(crate) fn tunnel_points(conn: &Connection, step: Step, from: i64, to: i64) -> rusqlite::Result<Vec<(i64, String, Traffic)>> {
    let table = match step {
        Step::Minute => TUNNEL_TABLES[0],
        Step::Hour => TUNNEL_TABLES[1],
        Step::Day | Step::Month => TUNNEL_TABLES[2],
    };
    let mut stmt =
        conn.prepare_cached(&format!("SELECT t, client, sent, received FROM {table} WHERE t >= ?1 AND t < ?2 ORDER BY t, client"))?;
    let rows =
        stmt.query_map(params![from, to], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, stored_traffic(r.get(2)?, r.get(3)?))))?;
    rows.collect()
}

impl Store {
    /// Writes one flush in one transaction; returns what retention deleted.
    pub(crate) async fn flush_history(&self, flush: Flush) -> Result<Pruned, StoreError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            let pruned = write_flush(&tx, &flush)?;
            tx.commit()?;
            Ok(pruned)
        })
        .await
    }

    pub(crate) async fn history_points(
        &self,
        step: Step,
        port: Option<MappingKey>,
        from: i64,
        to: i64,
        utc_offset: i64,
    ) -> Result<Vec<Point>, StoreError> {
        self.with_conn(move |conn| points(conn, step, port, from, to, utc_offset)).await
    }

    pub(crate) async fn history_report(&self, period: Step, from: i64, to: i64, utc_offset: i64) -> Result<Vec<ReportRow>, StoreError> {
        self.with_conn(move |conn| report(conn, period, from, to, utc_offset)).await
    }

    /// See [`runs`].
    pub(crate) async fn history_runs(&self, from: i64, to: i64) -> Result<Runs, StoreError> {
        self.with_conn(move |conn| runs(conn, from, to)).await
    }

    pub(crate) async fn lifetime_totals(&self) -> Result<BTreeMap<MappingKey, Traffic>, StoreError> {
        self.with_conn(|conn| lifetime(conn)).await
    }

    #[cfg(test)]
    pub(crate) async fn tunnel_history(&self, step: Step, from: i64, to: i64) -> Result<Vec<(i64, String, Traffic)>, StoreError> {
        self.with_conn(move |conn| tunnel_points(conn, step, from, to)).await
    }
}
