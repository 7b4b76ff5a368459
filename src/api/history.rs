//! `/api/stats/history` and `/api/stats/report`: the recorder's buckets as series
//! (for charts) and as per-period, per-port totals (for budgets and billing), in
//! JSON or as a CSV attachment.
//!
//! Times are Unix seconds, ranges are `[from, to)`, and days and months begin at
//! `history.utc_offset`. Both answers are as of `as_of`: the bucket in progress
//! holds the bytes the recorder has not flushed yet, so they agree with the live
//! counters at every moment, not only after a flush.

use std::collections::HashMap;

use super::contract::{History, Report, ReportRow, Span};
use super::error::{success, ApiError};
use super::state::AppState;
use crate::core::calendar::{utc_offset_text, Step};
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Most points one series may have: a day of minutes, five years of days.
pub(super) const MAX_POINTS: i64 = 2_000;
/// Most periods one report may cover.
pub(super) const MAX_PERIODS: i64 = 2_000;
/// No range may reach outside 1970..10000 (also keeps the arithmetic far from overflow).
const LATEST: i64 = 253_402_300_799;

/// The query as its pairs, in order, repeats kept: a map would keep only one
/// of `port=1&port=2` and answer for a port the caller may not have meant.
pub(super) type Params = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

pub(super) fn params(raw: Params, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let Query(pairs) = raw.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut map = HashMap::with_capacity(pairs.len());
    for (key, value) in pairs {
        if !allowed.contains(&key.as_str()) && key != "token" {
            return Err(ApiError::bad_request(format!("unknown parameter `{key}` (expected one of: {})", allowed.join(", "))));
        }
        if map.contains_key(&key) {
            return Err(ApiError::bad_request(format!("parameter `{key}` is given more than once; give it once")));
        }
        map.insert(key, value);
    }
    Ok(map)
}

pub(super) fn time_param(map: &HashMap<String, String>, key: &str, default: i64) -> Result<i64, ApiError> {
    match map.get(key) {
        None => Ok(default),
        Some(text) => match text.parse::<i64>() {
            Ok(t) if (0..=LATEST).contains(&t) => Ok(t),
            _ => Err(ApiError::bad_request(format!("`{key}` must be Unix seconds between 0 and {LATEST} (got {text:?})"))),
        },
    }
}

fn step_param(map: &HashMap<String, String>, key: &str, default: Step, allowed: &[Step]) -> Result<Step, ApiError> {
    let Some(text) = map.get(key) else { return Ok(default) };
    match Step::parse(text) {
        Some(step) if allowed.contains(&step) => Ok(step),
        _ => {
            let names: Vec<&str> = allowed.iter().map(|s| s.name()).collect();
            Err(ApiError::bad_request(format!("`{key}` must be one of {} (got {text:?})", names.join(", "))))
        }
    }
}

/// `from` and `to` with their defaults, checked: ordered and not too many
/// buckets of `step` (the value of parameter `step_key`, which the advice names).
fn range(
    map: &HashMap<String, String>,
    step_key: &str,
    step: Step,
    default_span: i64,
    now: i64,
    limit: i64,
    utc_offset: i64,
) -> Result<(i64, i64), ApiError> {
    let to = time_param(map, "to", now)?;
    let from = time_param(map, "from", (to - default_span).max(0))?;
    if from >= to {
        return Err(ApiError::bad_request(format!("`from` ({from}) must be before `to` ({to})")));
    }
    let count = step.count(from, to, utc_offset);
    if count > limit {
        let hint = match step.coarser() {
            Some(coarser) => format!("; use {step_key}={} or a shorter range", coarser.name()),
            None => "; use a shorter range".to_string(),
        };
        return Err(ApiError::bad_request(format!("the range spans {count} {}s, more than {limit}{hint}", step.name())));
    }
    Ok((from, to))
}

pub(super) async fn history(State(state): State<AppState>, raw: Params) -> Result<Response, ApiError> {
    let map = params(raw, &["port", "protocol", "step", "from", "to"])?;
    let port = match map.get("port") {
        None => None,
        Some(text) => match text.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => return Err(ApiError::bad_request(format!("`port` must be an integer between 1 and 65535 (got {text:?})"))),
        },
    };
    let protocol = match map.get("protocol").map(String::as_str) {
        None => crate::core::protocol::Protocol::Tcp,
        Some(name) => crate::core::protocol::Protocol::parse(name)
            .ok_or_else(|| ApiError::bad_request(format!("`protocol` must be tcp or udp (got {name:?})")))?,
    };
    let key = port.map(|port| crate::core::protocol::MappingKey { port, protocol });
    let step = step_param(&map, "step", Step::Hour, &[Step::Minute, Step::Hour, Step::Day, Step::Month])?;
    let settings = state.recorder.settings();
    let offset = settings.utc_offset_secs;
    let (from, to) = range(&map, "step", step, 86_400, state.recorder.now(), MAX_POINTS, offset)?;
    let series = state.recorder.points(step, key, from, to).await.map_err(internal)?;
    Ok(success(
        "ok",
        History {
            step: step.name().to_string(),
            port,
            from,
            to,
            utc_offset: utc_offset_text(offset),
            interval_secs: settings.interval_secs,
            as_of: series.as_of,
            unrecorded: series.unrecorded.into_iter().map(|(from, to)| Span { from, to }).collect(),
            points: series.points.into_iter().map(Into::into).collect(),
        },
    ))
}

pub(super) async fn report(State(state): State<AppState>, raw: Params) -> Result<Response, ApiError> {
    let map = params(raw, &["period", "from", "to", "format"])?;
    let period = step_param(&map, "period", Step::Day, &[Step::Hour, Step::Day, Step::Month])?;
    let csv = match map.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => return Err(ApiError::bad_request(format!("`format` must be json or csv (got {other:?})"))),
    };
    let offset = state.recorder.settings().utc_offset_secs;
    let default_span = match period {
        Step::Month => 365 * 86_400,
        Step::Day => 31 * 86_400,
        _ => 86_400,
    };
    let (from, to) = range(&map, "period", period, default_span, state.recorder.now(), MAX_PERIODS, offset)?;
    let (rows, as_of) = state.recorder.report(period, from, to).await.map_err(internal)?;
    let rows: Vec<ReportRow> = rows.into_iter().map(Into::into).collect();
    if csv {
        let filename = format!("tunneld-report-{}-{from}-{to}.csv", period.name());
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8; header=present".to_string()),
                (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{filename}\"")),
            ],
            to_csv(&rows),
        )
            .into_response());
    }
    Ok(success("ok", Report { period: period.name().to_string(), from, to, utc_offset: utc_offset_text(offset), as_of, rows }))
}

/// RFC 4180: a header line, CRLF line ends. No field needs quoting (labels are
/// dates or date-times, the rest numbers and `tcp`/`udp`), so none is quoted.
/// `protocol` comes last, so the columns scripts read by position stay where they were.
fn to_csv(rows: &[ReportRow]) -> String {
    let mut out = String::from("period,period_start,port,bytes_sent,bytes_received,protocol\r\n");
    for r in rows {
        out.push_str(&format!("{},{},{},{},{},{}\r\n", r.period, r.period_start, r.port, r.bytes_sent, r.bytes_received, r.protocol));
    }
    out
}

fn internal(e: crate::store::StoreError) -> ApiError {
    ApiError::internal(format!("cannot read the traffic history: {e}"))
}
