//! Read-back: the numbers the API, the SSE stream, the history recorder and the
//! quota check show, read from the registry's own series. Each family is read
//! through its typed handle, so nothing here names a family a second time, and
//! nothing gathers families the reader does not need.

use std::collections::BTreeMap;
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::proto::Metric;
use serde::Serialize;

use super::families::{CLIENT, DIRECTION, PORT, PROTOCOL, REASON, RECEIVED, SENT};
use super::latency::ConnectQuantiles;
use super::registry::Metrics;
use crate::core::names::DEFAULT_CLIENT;
use crate::core::protocol::{MappingKey, Protocol};
use crate::core::sync::lock;
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

/// The mapping a series is about; series without a `protocol` label are TCP's.
fn port(m: &Metric) -> Option<MappingKey> {
    let port = label(m, PORT)?.parse().ok()?;
    let protocol = label(m, PROTOCOL).map_or(Some(Protocol::Tcp), Protocol::parse)?;
    Some(MappingKey { port, protocol })
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
        let mut totals = ByteTotals::default();
        each_series(&self.mapping_bytes, |m| {
            if let Some(port) = port(m) {
                set_direction(totals.mappings.entry(port).or_default(), m);
            }
        });
        each_series(&self.tunnel_bytes, |m| set_direction(totals.tunnel.entry(client(m)).or_default(), m));
        totals
    }

    /// Traffic numbers read back from the registry.
    pub(crate) fn traffic(&self) -> TrafficSnapshot {
        let ByteTotals { mappings: mapping_bytes, tunnel: tunnel_bytes } = self.byte_totals();
        let mut ports: BTreeMap<MappingKey, PortTraffic> = mapping_bytes
            .into_iter()
            .map(|(port, t)| (port, PortTraffic { bytes_sent: t.sent, bytes_received: t.received, ..PortTraffic::default() }))
            .collect();
        let mut per_port = |handle: &dyn Collector, set: fn(&mut PortTraffic, &Metric)| {
            each_series(handle, |m| {
                if let Some(port) = port(m) {
                    set(ports.entry(port).or_default(), m);
                }
            })
        };
        per_port(&self.mapping_connections, |p, m| p.connections_total = m.get_counter().value() as u64);
        per_port(&self.mapping_active, |p, m| p.active_connections = m.get_gauge().value().max(0.0) as u64);
        per_port(&self.mapping_connect_errors, |p, m| p.connect_errors = m.get_counter().value() as u64);
        per_port(&self.mapping_last_activity, |p, m| p.last_update = timestamp(m.get_gauge().value()));
        per_port(&self.mapping_refused, |p, m| {
            if let Some(reason) = label(m, REASON) {
                p.refused.insert(reason.to_string(), m.get_counter().value() as u64);
            }
        });
        per_port(&self.mapping_datagrams, |p, m| match label(m, DIRECTION) {
            Some(SENT) => p.datagrams_sent = m.get_counter().value() as u64,
            Some(RECEIVED) => p.datagrams_received = m.get_counter().value() as u64,
            _ => {}
        });
        per_port(&self.mapping_udp_sessions, |p, m| p.udp_sessions = m.get_gauge().value().max(0.0) as u64);
        per_port(&self.mapping_dropped_datagrams, |p, m| {
            if let Some(reason) = label(m, REASON) {
                p.dropped.insert(reason.to_string(), m.get_counter().value() as u64);
            }
        });
        let now = Instant::now();
        for (port, samples) in lock(&self.connect_samples).iter() {
            if let Some(p) = ports.get_mut(port) {
                p.connect = samples.quantiles(now);
            }
        }

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
