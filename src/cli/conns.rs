//! `tunneld ctl conns`, `close`, `log` and `sources`: who is connected now,
//! reset one of them, who was connected and how it ended, who moved the most.

use crate::api::contract::{CloseConnection, ConnectionClosed, ConnectionList, ConnectionLog, Sources};
use crate::core::time::{format_utc, unix_now};

use super::ctl::{human_bytes, human_duration, table, Api};

/// `ctl conns [PORT] [--client NAME]`: the open connections, oldest first.
pub(super) fn conns(api: &Api, port: Option<u16>, client: Option<&str>, limit: u32) -> anyhow::Result<String> {
    let mut query = format!("?limit={limit}");
    if let Some(port) = port {
        query.push_str(&format!("&port={port}"));
    }
    if let Some(client) = client {
        query.push_str(&format!("&client={}", encode(client)));
    }
    let ConnectionList { connections, count, .. } = api.get(&format!("/api/connections{query}"))?;
    let now = unix_now();
    let mut rows = vec![["ID", "PORT", "CLIENT", "SOURCE", "AGE", "SENT", "RECEIVED", "RATE ↑", "RATE ↓"].map(String::from).to_vec()];
    for c in &connections {
        rows.push(vec![
            c.id.to_string(),
            port_of(c.port, &c.protocol),
            c.client.clone().unwrap_or_else(|| "-".into()),
            c.source.clone(),
            human_duration(now - c.started_at),
            human_bytes(c.bytes_sent),
            human_bytes(c.bytes_received),
            format!("{}/s", human_bytes(c.sent_rate as u64)),
            format!("{}/s", human_bytes(c.received_rate as u64)),
        ]);
    }
    let shown = if connections.len() < count { format!(" ({} shown; --limit for more)", connections.len()) } else { String::new() };
    Ok(format!("{}{count} open connection(s){shown}\n", table(&rows)))
}

/// `ctl close ID`: resets one open connection.
pub(super) fn close(api: &Api, id: u64) -> anyhow::Result<String> {
    let ConnectionClosed { id } = api.post("/api/connection/close", &CloseConnection { id })?;
    Ok(format!("connection {id} reset\n"))
}

/// What `ctl log` filters on.
pub(super) struct LogFilter {
    pub(super) port: Option<u16>,
    pub(super) client: Option<String>,
    pub(super) source: Option<String>,
    pub(super) limit: u32,
}

/// `ctl log`: ended connections, newest first.
pub(super) fn log(api: &Api, filter: LogFilter) -> anyhow::Result<String> {
    let mut query = format!("?limit={}", filter.limit);
    if let Some(port) = filter.port {
        query.push_str(&format!("&port={port}"));
    }
    if let Some(client) = &filter.client {
        query.push_str(&format!("&client={}", encode(client)));
    }
    if let Some(source) = &filter.source {
        query.push_str(&format!("&source={}", encode(source)));
    }
    let ConnectionLog { connections, enabled, .. } = api.get(&format!("/api/connections/log{query}"))?;
    if !enabled && connections.is_empty() {
        return Ok("the connection log is off on this server (history.connection_log = false)\n".into());
    }
    let mut rows = vec![["ID", "PORT", "CLIENT", "SOURCE", "ENDED", "LASTED", "SENT", "RECEIVED", "END"].map(String::from).to_vec()];
    for c in &connections {
        let end = match &c.reason {
            Some(reason) if c.end == "refused" => format!("refused ({reason})"),
            _ => c.end.clone(),
        };
        rows.push(vec![
            c.id.to_string(),
            port_of(c.port, &c.protocol),
            c.client.clone().unwrap_or_else(|| "-".into()),
            c.source.clone(),
            format_utc(c.ended_at as i64),
            human_duration(c.ended_at - c.started_at),
            human_bytes(c.bytes_sent),
            human_bytes(c.bytes_received),
            end,
        ]);
    }
    Ok(format!("{}{} connection(s)\n", table(&rows), connections.len()))
}

/// `ctl sources [PORT] [--days N]`: the source addresses that moved the most.
pub(super) fn sources(api: &Api, port: Option<u16>, days: u32, limit: u32) -> anyhow::Result<String> {
    let to = unix_now() as i64 + 1;
    let from = (to - i64::from(days) * 86_400).max(0);
    let mut query = format!("?from={from}&to={to}&limit={limit}");
    if let Some(port) = port {
        query.push_str(&format!("&port={port}"));
    }
    let Sources { sources, .. } = api.get(&format!("/api/stats/sources{query}"))?;
    let mut rows = vec![["SOURCE", "CONNECTIONS", "SENT", "RECEIVED", "TOTAL"].map(String::from).to_vec()];
    for s in &sources {
        rows.push(vec![
            s.source.clone(),
            s.connections.to_string(),
            human_bytes(s.bytes_sent),
            human_bytes(s.bytes_received),
            human_bytes(s.bytes_sent + s.bytes_received),
        ]);
    }
    let of = port.map(|p| format!(" of port {p}")).unwrap_or_default();
    Ok(format!("{}{} source(s){of} in the last {days} day(s), from the connection log\n", table(&rows), sources.len()))
}

/// Percent-encodes a query value (client names and addresses are plain, but
/// an IPv6 source has colons and a typo may have anything).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A connection's port as `ctl` shows it: `53` for TCP, `53/udp` for a UDP session.
fn port_of(port: u16, protocol: &str) -> String {
    match protocol {
        "udp" => format!("{port}/udp"),
        _ => port.to_string(),
    }
}
