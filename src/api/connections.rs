//! `/api/connections` (open connections, live), `/api/connection/close`,
//! `/api/connections/log` (ended ones, JSON or CSV) and `/api/stats/sources`
//! (who moved the most, from the log).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::body::JsonBody;
use super::contract::{
    CloseConnection, ConnectionClosed, ConnectionList, ConnectionLog, LoggedConnection, OpenConnection, SourceTotals, Sources,
};
use super::error::{success, ApiError};
use super::history::{params, time_param, Params};
use super::state::AppState;
use crate::core::protocol::Protocol;
use crate::server::connections::RATE_WINDOW;
use crate::store::connection_log::LogQuery;

/// Open connections listed when `?limit=` is not given, and at most.
const LIST_DEFAULT: usize = 100;
const LIST_MAX: usize = 10_000;
/// Logged connections answered when `?limit=` is not given, and at most (CSV:
/// a week of a busy port in one download).
const LOG_DEFAULT: u32 = 100;
const LOG_MAX_JSON: u32 = 10_000;
const LOG_MAX_CSV: u32 = 1_000_000;
/// Sources ranked when `?limit=` is not given, and at most.
const SOURCES_DEFAULT: u32 = 10;
const SOURCES_MAX: u32 = 1_000;
/// `/api/stats/sources` without `from`: the last 31 days (a month's quota).
const SOURCES_SPAN: i64 = 31 * 86_400;

fn port_param(map: &HashMap<String, String>) -> Result<Option<u16>, ApiError> {
    match map.get("port") {
        None => Ok(None),
        Some(text) => match text.parse::<u16>() {
            Ok(p) if p > 0 => Ok(Some(p)),
            _ => Err(ApiError::bad_request(format!("`port` must be an integer between 1 and 65535 (got {text:?})"))),
        },
    }
}

fn limit_param(map: &HashMap<String, String>, default: u32, max: u32) -> Result<u32, ApiError> {
    match map.get("limit") {
        None => Ok(default),
        Some(text) => match text.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!("`limit` must be an integer between 1 and {max} (got {text:?})"))),
        },
    }
}

/// `?protocol=`: `tcp`, `udp`, or absent (both).
fn protocol_param(map: &HashMap<String, String>) -> Result<Option<Protocol>, ApiError> {
    match map.get("protocol").map(String::as_str) {
        None => Ok(None),
        Some(name) => {
            Protocol::parse(name).map(Some).ok_or_else(|| ApiError::bad_request(format!("`protocol` must be tcp or udp (got {name:?})")))
        }
    }
}

fn client_param(map: &HashMap<String, String>) -> Option<String> {
    map.get("client").filter(|c| !c.is_empty()).cloned()
}

/// `GET /api/connections?port=&protocol=&client=&limit=`.
pub(super) async fn list(State(state): State<AppState>, raw: Params) -> Result<Response, ApiError> {
    let map = params(raw, &["port", "protocol", "client", "limit"])?;
    let port = port_param(&map)?;
    let client = client_param(&map);
    let limit = limit_param(&map, LIST_DEFAULT as u32, LIST_MAX as u32)? as usize;
    let protocol = protocol_param(&map)?;
    let (views, count) = state.mappings.connections().list(port, protocol, client.as_deref(), limit);
    let connections = views
        .into_iter()
        .map(|c| OpenConnection {
            id: c.id,
            port: c.port,
            protocol: c.protocol.as_str().into(),
            client: c.client,
            source: c.source.to_string(),
            started_at: c.started_at,
            bytes_sent: c.bytes_sent,
            bytes_received: c.bytes_received,
            sent_rate: c.sent_rate,
            received_rate: c.received_rate,
        })
        .collect();
    Ok(success("ok", ConnectionList { connections, count, rate_window_secs: RATE_WINDOW.as_secs_f64() }))
}

/// `POST /api/connection/close {id}`: the visitor gets a reset.
pub(super) async fn close(
    State(state): State<AppState>,
    JsonBody(CloseConnection { id }): JsonBody<CloseConnection>,
) -> Result<Response, ApiError> {
    if !state.mappings.connections().close(id) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no open connection has id {id}")));
    }
    Ok(success("connection reset", ConnectionClosed { id }))
}

/// `GET /api/connections/log?port=&protocol=&client=&source=&from=&to=&limit=&format=json|csv`.
pub(super) async fn log(State(state): State<AppState>, raw: Params) -> Result<Response, ApiError> {
    let map = params(raw, &["port", "protocol", "client", "source", "from", "to", "limit", "format"])?;
    let csv = match map.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => return Err(ApiError::bad_request(format!("`format` must be json or csv (got {other:?})"))),
    };
    let limit = limit_param(&map, LOG_DEFAULT, if csv { LOG_MAX_CSV } else { LOG_MAX_JSON })?;
    let query = LogQuery {
        port: port_param(&map)?,
        protocol: protocol_param(&map)?,
        client: client_param(&map),
        source: map.get("source").filter(|s| !s.is_empty()).cloned(),
        from: map.get("from").map(|_| time_param(&map, "from", 0)).transpose()?.map(|t| t as f64),
        to: map.get("to").map(|_| time_param(&map, "to", 0)).transpose()?.map(|t| t as f64),
        limit,
    };
    let rows = state.recorder_store().connection_log(query).await.map_err(internal)?;
    let connections: Vec<LoggedConnection> = rows
        .into_iter()
        .map(|c| LoggedConnection {
            id: c.id,
            port: c.port,
            protocol: c.protocol.as_str().into(),
            client: c.client,
            source: c.source,
            started_at: c.started_at,
            ended_at: c.ended_at,
            bytes_sent: c.bytes_sent,
            bytes_received: c.bytes_received,
            end: c.end,
            reason: c.reason,
        })
        .collect();
    if csv {
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8; header=present".to_string()),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"tunneld-connections.csv\"".to_string()),
            ],
            to_csv(&connections),
        )
            .into_response());
    }
    let count = connections.len();
    Ok(success("ok", ConnectionLog { connections, count, enabled: state.recorder.settings().connection_log }))
}

/// `GET /api/stats/sources?port=&protocol=&from=&to=&limit=`: most bytes first.
pub(super) async fn sources(State(state): State<AppState>, raw: Params) -> Result<Response, ApiError> {
    let map = params(raw, &["port", "protocol", "from", "to", "limit"])?;
    let port = port_param(&map)?;
    let limit = limit_param(&map, SOURCES_DEFAULT, SOURCES_MAX)?;
    let to = time_param(&map, "to", state.recorder.now() + 1)?;
    let from = time_param(&map, "from", (to - SOURCES_SPAN).max(0))?;
    if from >= to {
        return Err(ApiError::bad_request(format!("`from` ({from}) must be before `to` ({to})")));
    }
    let protocol = protocol_param(&map)?;
    let query = LogQuery { port, protocol, from: Some(from as f64), to: Some(to as f64), limit, ..LogQuery::default() };
    let rows = state.recorder_store().top_sources(query).await.map_err(internal)?;
    let sources = rows
        .into_iter()
        .map(|s| SourceTotals { source: s.source, connections: s.connections, bytes_sent: s.bytes_sent, bytes_received: s.bytes_received })
        .collect();
    Ok(success("ok", Sources { sources, port, from, to }))
}

/// RFC 4180: a header line, CRLF line ends, a field quoted when it holds a
/// comma, a quote or a line break (a reason is free text).
fn to_csv(rows: &[LoggedConnection]) -> String {
    let mut out = String::from("id,port,protocol,client,source,started_at,ended_at,bytes_sent,bytes_received,end,reason\r\n");
    for r in rows {
        let fields = [
            r.id.to_string(),
            r.port.to_string(),
            r.protocol.clone(),
            r.client.clone().unwrap_or_default(),
            r.source.clone(),
            format!("{:.3}", r.started_at),
            format!("{:.3}", r.ended_at),
            r.bytes_sent.to_string(),
            r.bytes_received.to_string(),
            r.end.clone(),
            r.reason.clone().unwrap_or_default(),
        ];
        let quoted: Vec<String> = fields.iter().map(|f| quote(f)).collect();
        out.push_str(&quoted.join(","));
        out.push_str("\r\n");
    }
    out
}

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

fn internal(e: crate::store::StoreError) -> ApiError {
    ApiError::internal(format!("cannot read the connection log: {e}"))
}
