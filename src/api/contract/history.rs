//! `GET /api/stats/history` and `GET /api/stats/report` (JSON form): the traffic
//! history as series and as per-period totals.

use serde::{Deserialize, Serialize};

/// One bucket of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// The bucket's start (Unix seconds).
    pub t: i64,
    /// Visitor → target bytes in it.
    pub bytes_sent: u64,
    /// Target → visitor bytes in it.
    pub bytes_received: u64,
}

impl From<crate::store::history::Point> for HistoryPoint {
    fn from(p: crate::store::history::Point) -> HistoryPoint {
        HistoryPoint { t: p.t, bytes_sent: p.bytes_sent, bytes_received: p.bytes_received }
    }
}

/// `GET /api/stats/history`: one series over `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// `minute`, `hour`, `day` or `month`.
    pub step: String,
    /// The mapping, or `null`: all mappings summed.
    pub port: Option<u16>,
    /// Start of the range (Unix seconds, inclusive).
    pub from: i64,
    /// End of the range (Unix seconds, exclusive).
    pub to: i64,
    /// Where days and months begin, like `+02:00`.
    pub utc_offset: String,
    /// How often the recorder writes (the finest resolution there is).
    pub interval_secs: u64,
    /// When the live counters were read (Unix seconds): the bucket that contains
    /// this moment is in progress and holds the bytes up to it, flushed or not.
    pub as_of: i64,
    /// The spans of the range (Unix seconds, `[from, to)`) when no recorder ran:
    /// from a daemon's last write to the next one's start, so an outage shorter
    /// than a bucket is known too. Kept as long as minute buckets
    /// (`history.minute_retention`); empty when the daemon was always up.
    pub unrecorded: Vec<Span>,
    /// The range's buckets, empty ones included (for `minute`: only the minutes
    /// the recorder covered).
    pub points: Vec<HistoryPoint>,
}

/// A span of time (Unix seconds, `[from, to)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// Its start.
    pub from: i64,
    /// Its end (exclusive).
    pub to: i64,
}

/// One period's total for one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRow {
    /// The local calendar label: `2026-11-29T14:00` for hours, `2026-11-29` for
    /// days, `2026-11` for months.
    pub period: String,
    /// The period's start (Unix seconds).
    pub period_start: i64,
    /// The mapping's port.
    pub port: u16,
    /// Visitor → target bytes.
    pub bytes_sent: u64,
    /// Target → visitor bytes.
    pub bytes_received: u64,
    /// The mapping's protocol, `tcp` or `udp`: with the port, which mapping.
    #[serde(default)]
    pub protocol: crate::core::protocol::Protocol,
}

impl From<crate::store::history::ReportRow> for ReportRow {
    fn from(r: crate::store::history::ReportRow) -> ReportRow {
        ReportRow {
            period: r.period,
            period_start: r.period_start,
            port: r.port,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            protocol: r.protocol,
        }
    }
}

/// `GET /api/stats/report?format=json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `hour`, `day` or `month`.
    pub period: String,
    /// Start of the range (Unix seconds, inclusive).
    pub from: i64,
    /// End of the range (Unix seconds, exclusive).
    pub to: i64,
    /// Where days and months begin, like `+02:00`.
    pub utc_offset: String,
    /// When the live counters were read (Unix seconds): the period that contains
    /// this moment is in progress and holds the bytes up to it, flushed or not.
    pub as_of: i64,
    /// Per period and port, only those with traffic.
    pub rows: Vec<ReportRow>,
}
