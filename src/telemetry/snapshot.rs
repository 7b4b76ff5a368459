//! Read-back: the numbers the API, the SSE stream, the history recorder and the
//! quota check show, read from the series themselves: a mapping's from its block
//! of atomics (one pass over the mappings, nothing built per series), a tunnel's
//! through its family's typed handle, so nothing here names a family a second
//! time, and nothing gathers families the reader does not need.

use std::collections::BTreeMap;
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::proto::Metric;
use serde::Serialize;

use super::families::{dropped_reason, refused_reason, CLIENT, DIRECTION, RECEIVED, SENT};
use super::registry::Metrics;
use super::reservoir::ConnectQuantiles;
use crate::core::names::DEFAULT_CLIENT;
use crate::core::protocol::{MappingKey, Protocol};
use crate::core::sync::read;
use crate::core::traffic::Traffic;

/// Byte counters per mapping port and per tunnel client.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ByteTotals {
    pub mappings: BTreeMap<MappingKey, Traffic>,
    pub tunnel: BTreeMap<String, Traffic>,
}

/// One mapping's numbers as read from the registry.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct PortTraffic {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub last_update: Option<f64>,
    pub active_connections: u64,
    pub connections_total: u64,
    pub connect_errors: u64,
    /// Visitors refused, by `reason` label.
    pub refused: BTreeMap<String, u64>,
    /// Recent connect times' quantiles (see `latency`), `None` without any.
    pub connect: Option<ConnectQuantiles>,
    /// UDP mappings: datagrams forwarded visitor to target.
    pub datagrams_sent: u64,
    /// UDP mappings: datagrams forwarded target to visitor.
    pub datagrams_received: u64,
    /// UDP mappings: sessions open now.
    pub udp_sessions: u64,
    /// UDP mappings: datagrams dropped, by `reason` label.
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct TrafficSnapshot {
    pub mappings: BTreeMap<MappingKey, PortTraffic>,
    /// Per tunnel client, by name.
    pub clients: BTreeMap<String, ClientTraffic>,
}

/// One tunnel client's wire numbers as read from the registry.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ClientTraffic {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub last_update: Option<f64>,
    pub connected: bool,
    pub connected_since: Option<f64>,
    /// The latest heartbeat round trip of the current session, in seconds.
    pub rtt: Option<f64>,
}

impl TrafficSnapshot {
    /// The tunnel as one: bytes summed over clients, the latest activity, connected
    /// while any client is, since the earliest session began.
    pub(crate) fn tunnel(&self) -> ClientTraffic {
        let mut sum = ClientTraffic::default();
        for c in self.clients.values() {
            sum.bytes_sent += c.bytes_sent;
            sum.bytes_received += c.bytes_received;
            sum.last_update = match (sum.last_update, c.last_update) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            sum.connected |= c.connected;
            if c.connected {
                sum.connected_since = match (sum.connected_since, c.connected_since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        sum
    }
}

/// Calls `f` with every series the family behind `handle` has now.
fn each_series(handle: &dyn Collector, mut f: impl FnMut(&Metric)) {
    for family in handle.collect() {
        family.get_metric().iter().for_each(&mut f);
    }
}

fn label<'a>(m: &'a Metric, name: &str) -> Option<&'a str> {
    m.get_label().iter().find(|l| l.name() == name).map(|l| l.value())
}

fn client(m: &Metric) -> String {
    label(m, CLIENT).unwrap_or(DEFAULT_CLIENT).to_string()
}

/// Puts a `direction`-labelled byte counter into its side of `traffic`.
fn set_direction(traffic: &mut Traffic, m: &Metric) {
    let value = m.get_counter().value() as u64;
    match label(m, DIRECTION) {
        Some(SENT) => traffic.sent = value,
        Some(RECEIVED) => traffic.received = value,
        _ => {}
    }
}

/// Gauges use 0 for "never"; JSON uses null.
fn timestamp(v: f64) -> Option<f64> {
    (v > 0.0).then_some(v)
}

impl Metrics {
    /// Every mapping's byte counters and the tunnel's per client, read from the
    /// registry without gathering the other families.
    pub(crate) fn byte_totals(&self) -> ByteTotals {
        let mappings =
            read(&self.mappings).iter().map(|(key, m)| (*key, Traffic { sent: m.sent.get(), received: m.received.get() })).collect();
        let mut totals = ByteTotals { mappings, tunnel: BTreeMap::new() };
        each_series(&self.tunnel_bytes, |m| set_direction(totals.tunnel.entry(client(m)).or_default(), m));
        totals
    }

    /// Traffic numbers read back from the registry.
    pub(crate) fn traffic(&self) -> TrafficSnapshot {
        let now = Instant::now();
        let ports: BTreeMap<MappingKey, PortTraffic> = self
            .mapping_series()
            .iter()
            .map(|m| {
                let refused = refused_reason::ALL.iter().zip(m.refused_counts()).map(|(reason, n)| (reason.to_string(), n)).collect();
                let traffic = PortTraffic {
                    bytes_sent: m.sent.get(),
                    bytes_received: m.received.get(),
                    last_update: timestamp(m.last_activity.get()),
                    active_connections: m.active.get().max(0) as u64,
                    connections_total: m.connections.get(),
                    connect_errors: m.connect_errors.get(),
                    refused,
                    connect: m.connect_samples.quantiles(now),
                    ..PortTraffic::default()
                };
                let traffic = match m.key().protocol {
                    Protocol::Tcp => traffic,
                    Protocol::Udp => PortTraffic {
                        datagrams_sent: m.udp.datagrams_sent.get(),
                        datagrams_received: m.udp.datagrams_received.get(),
                        udp_sessions: m.udp.sessions.get().max(0) as u64,
                        dropped: dropped_reason::ALL.iter().zip(m.udp.dropped_counts()).map(|(r, n)| (r.to_string(), n)).collect(),
                        ..traffic
                    },
                };
                (m.key(), traffic)
            })
            .collect();

        let mut tunnel_bytes: BTreeMap<String, Traffic> = BTreeMap::new();
        each_series(&self.tunnel_bytes, |m| set_direction(tunnel_bytes.entry(client(m)).or_default(), m));
        let mut clients: BTreeMap<String, ClientTraffic> = tunnel_bytes
            .into_iter()
            .map(|(name, t)| (name, ClientTraffic { bytes_sent: t.sent, bytes_received: t.received, ..ClientTraffic::default() }))
            .collect();
        let mut per_client = |handle: &dyn Collector, set: fn(&mut ClientTraffic, &Metric)| {
            each_series(handle, |m| set(clients.entry(client(m)).or_default(), m))
        };
        per_client(&self.tunnel_last_activity, |c, m| c.last_update = timestamp(m.get_gauge().value()));
        per_client(&self.tunnel_connected_since, |c, m| c.connected_since = timestamp(m.get_gauge().value()));
        per_client(&self.tunnel_connected, |c, m| c.connected = m.get_gauge().value() == 1.0);
        per_client(&self.tunnel_rtt_last, |c, m| c.rtt = Some(m.get_gauge().value()).filter(|rtt| *rtt > 0.0));
        TrafficSnapshot { mappings: ports, clients }
    }
}
