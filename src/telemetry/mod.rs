//! The Prometheus registry: the one source of truth for traffic numbers.
//!
//! Copy loops hold pre-resolved counter handles ([`Meter`]) so counting a chunk is
//! an atomic add, never a label lookup. The JSON API, the SSE stream and the monitor
//! page all read back from [`Metrics`] via [`Metrics::traffic`]; nothing keeps a
//! second set of numbers.
//!
//! `families` is the schema (each family's name, HELP and labels, defined once),
//! `series` a mapping's series (atomics in one block per mapping, written into
//! the exposition beside the `prometheus` registry's families), `snapshot` the
//! read-back, `meter` the data path's side.
//!
//! May import `core` only, so every layer above can count.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{Encoder, IntCounter, TextEncoder};

use crate::core::protocol::MappingKey;
use crate::core::sync::{read, write};

mod families;
mod latency;
mod meter;
mod registry;
mod reservoir;
mod series;
mod snapshot;

pub(crate) use families::{connect_failure, health_state, refused_reason, relay_path, session_result, RECEIVED, SENT};
pub use latency::{RoundTrips, Visit};
pub use meter::{Held, Meter};
pub use registry::Metrics;
pub use series::{Counter, Gauge, IntGauge, MappingMetrics, MappingSeries, UdpMetrics};

/// The values of `tunneld_tunnel_udp_transport`'s `transport` label.
pub(crate) const UDP_TRANSPORTS: [&str; 2] = ["quic", "framed"];

/// Whose tunnel a series is about: on the server role, a client's (by name);
/// on the client role, its own session with one server.
#[derive(Debug, Clone, Copy)]
pub struct Tunnel<'a> {
    client: &'a str,
    server: Option<&'a str>,
}

impl<'a> Tunnel<'a> {
    /// A client's session with `server` (`host:port` as configured).
    pub fn to_server(client: &'a str, server: &'a str) -> Tunnel<'a> {
        Tunnel { client, server: Some(server) }
    }
}

impl<'a> From<&'a str> for Tunnel<'a> {
    fn from(client: &'a str) -> Tunnel<'a> {
        Tunnel { client, server: None }
    }
}

impl<'a> From<&'a String> for Tunnel<'a> {
    fn from(client: &'a String) -> Tunnel<'a> {
        Tunnel { client, server: None }
    }
}
pub(crate) use snapshot::{ByteTotals, ClientTraffic, TrafficSnapshot};

impl Metrics {
    /// When this process's counters began: `bytes_*` count from here.
    pub(crate) fn started_at(&self) -> f64 {
        self.started_at
    }

    pub(crate) fn webhook_failed(&self) {
        self.webhook_failures.inc();
    }

    /// An ended connection did not fit in the connection log's queue.
    pub(crate) fn connection_log_dropped(&self) {
        self.connection_log_dropped.inc();
    }

    pub(crate) fn history_flushed(&self, at: f64) {
        self.history_last_flush.set(at);
    }

    /// Creates a mapping's series at 0 so dashboards see it from the start (its
    /// health `ok`). `info` is `(target, mode, client, description)` for
    /// `tunneld_mapping_info`. A mapping that has series already keeps them,
    /// with `info` as its labels now.
    pub fn add_mapping(&self, key: MappingKey, info: [&str; 4]) -> MappingMetrics {
        let mut mappings = write(&self.mappings);
        match mappings.get(&key) {
            Some(existing) => {
                existing.set_info(info);
                existing.clone()
            }
            None => {
                let series = MappingMetrics(Arc::new(MappingSeries::new(key, info)));
                mappings.insert(key, series.clone());
                series
            }
        }
    }

    /// `tunneld_mapping_client_connections_total{port, protocol, client}`:
    /// created at 0 for each client of a mapping's group.
    pub(crate) fn mapping_client(&self, key: MappingKey, client: &str) -> IntCounter {
        self.mapping_client_connections.with_label_values(&[&key.port.to_string(), key.protocol.as_str(), client])
    }

    /// Drops that series: the client left the group, or the mapping went.
    pub(crate) fn remove_mapping_client(&self, key: MappingKey, client: &str) {
        let _ = self.mapping_client_connections.remove_label_values(&[&key.port.to_string(), key.protocol.as_str(), client]);
    }

    /// Drops every series of a removed mapping.
    pub(crate) fn remove_mapping(&self, key: MappingKey) {
        write(&self.mappings).remove(&key);
    }

    /// Every mapping's series now, by port and protocol: taken under the lock, read after it.
    pub(crate) fn mapping_series(&self) -> Vec<MappingMetrics> {
        read(&self.mappings).values().cloned().collect()
    }

    /// Creates a tunnel's series at 0, so dashboards and alerts see a known
    /// client (or, on the client role, a configured server) from the start,
    /// connected or not.
    pub(crate) fn add_client<'a>(&self, tunnel: impl Into<Tunnel<'a>>) {
        let labels = self.tunnel_labels(tunnel.into());
        for dir in [SENT, RECEIVED] {
            self.tunnel_bytes.with_label_values(&[&labels[..], &[dir]].concat());
        }
        self.tunnel_last_activity.with_label_values(&labels);
        self.tunnel_connected.with_label_values(&labels);
        self.tunnel_connected_since.with_label_values(&labels);
        self.tunnel_rtt.with_label_values(&labels);
        self.tunnel_rtt_last.with_label_values(&labels);
    }

    /// Drops a removed client's series.
    pub(crate) fn remove_client<'a>(&self, tunnel: impl Into<Tunnel<'a>>) {
        let labels = self.tunnel_labels(tunnel.into());
        for dir in [SENT, RECEIVED] {
            let _ = self.tunnel_bytes.remove_label_values(&[&labels[..], &[dir]].concat());
        }
        let _ = self.tunnel_last_activity.remove_label_values(&labels);
        let _ = self.tunnel_connected.remove_label_values(&labels);
        let _ = self.tunnel_connected_since.remove_label_values(&labels);
        let _ = self.tunnel_rtt.remove_label_values(&labels);
        let _ = self.tunnel_rtt_last.remove_label_values(&labels);
        if labels.len() == 1 {
            self.set_udp_transport(labels[0], None);
        }
    }

    /// How the client `name`'s tunnel carries datagrams now (`quic`,
    /// `framed`), or, with `None`, that it carries none (no session).
    pub(crate) fn set_udp_transport(&self, name: &str, transport: Option<&str>) {
        for t in UDP_TRANSPORTS {
            if Some(t) == transport {
                self.tunnel_udp_transport.with_label_values(&[name, t]).set(1);
            } else {
                let _ = self.tunnel_udp_transport.remove_label_values(&[name, t]);
            }
        }
    }

    /// Where a tunnel records its heartbeat round trips on this side.
    pub fn round_trips<'a>(&self, tunnel: impl Into<Tunnel<'a>>) -> RoundTrips {
        let labels = self.tunnel_labels(tunnel.into());
        RoundTrips { histogram: self.tunnel_rtt.with_label_values(&labels), last: self.tunnel_rtt_last.with_label_values(&labels) }
    }

    /// Meters for bytes leaving this side on a tunnel and arriving from it.
    pub fn tunnel_meters<'a>(&self, tunnel: impl Into<Tunnel<'a>>) -> (Meter, Meter) {
        let labels = self.tunnel_labels(tunnel.into());
        let activity = self.tunnel_last_activity.with_label_values(&labels);
        let meter = |dir| Meter::tunnel(self.tunnel_bytes.with_label_values(&[&labels[..], &[dir]].concat()), activity.clone());
        (meter(SENT), meter(RECEIVED))
    }

    /// `since`: when the session authenticated (Unix seconds).
    pub(crate) fn session_started<'a>(&self, tunnel: impl Into<Tunnel<'a>>, since: f64) {
        let labels = self.tunnel_labels(tunnel.into());
        self.tunnel_connected.with_label_values(&labels).set(1);
        self.tunnel_connected_since.with_label_values(&labels).set(since);
        // A new session's round trip is yet to be measured.
        self.tunnel_rtt_last.with_label_values(&labels).set(0.0);
    }

    /// Only for a client still known: a removed client's series stay removed.
    pub(crate) fn session_ended<'a>(&self, tunnel: impl Into<Tunnel<'a>>) {
        let labels = self.tunnel_labels(tunnel.into());
        if let Ok(connected) = self.tunnel_connected.get_metric_with_label_values(&labels) {
            connected.set(0);
        }
        if let Ok(since) = self.tunnel_connected_since.get_metric_with_label_values(&labels) {
            since.set(0.0);
        }
        if let Ok(rtt) = self.tunnel_rtt_last.get_metric_with_label_values(&labels) {
            rtt.set(0.0);
        }
    }

    /// The label values of `tunnel`'s series in this registry: the server
    /// role's are per client, the client role's per client and server.
    fn tunnel_labels<'a>(&self, tunnel: Tunnel<'a>) -> Vec<&'a str> {
        match self.per_server {
            true => vec![tunnel.client, tunnel.server.unwrap_or_default()],
            false => vec![tunnel.client],
        }
    }

    /// The client role's diagnosis series for `server`, every reason at 0, so
    /// a dashboard or an alert sees them before the first failure.
    pub(crate) fn add_connect_diagnosis(&self, server: &str) {
        for reason in connect_failure::ALL {
            self.client_connect_failures.with_label_values(&[server, reason]);
            self.client_last_connect_error.with_label_values(&[server, reason]).set(0);
        }
    }

    /// An attempt to connect to `server` ran into `attempt`; what is wrong is
    /// `cause` (the same, or, while the server throttles this address, what
    /// its last answered attempt failed for).
    pub(crate) fn connect_failed(&self, server: &str, attempt: &str, cause: &str) {
        self.client_connect_failures.with_label_values(&[server, attempt]).inc();
        for reason in connect_failure::ALL {
            self.client_last_connect_error.with_label_values(&[server, reason]).set(i64::from(reason == cause));
        }
    }

    /// Connected to `server`: nothing is wrong with it any more.
    pub(crate) fn connect_succeeded(&self, server: &str) {
        for reason in connect_failure::ALL {
            self.client_last_connect_error.with_label_values(&[server, reason]).set(0);
        }
    }

    pub(crate) fn count_session(&self, result: &str) {
        self.tunnel_sessions.with_label_values(&[result]).inc();
    }

    /// Prometheus text exposition of everything registered: the registry's
    /// families and the mappings' (see `series`), merged in name order.
    pub(crate) fn render(&self) -> String {
        let registered = self.registry.gather();
        let mappings = self.mapping_series();
        let mut out = String::with_capacity(4096 + mappings.len() * 6 * 1024);
        let mut ours = series::family_names().enumerate().peekable();
        for family in &registered {
            while let Some((index, _)) = ours.next_if(|(_, name)| *name < family.name()) {
                series::write_family(&mut out, index, &mappings);
            }
            // Encoding into a String cannot fail for well-formed families.
            let _ = TextEncoder::new().encode_utf8(std::slice::from_ref(family), &mut out);
        }
        for (index, _) in ours {
            series::write_family(&mut out, index, &mappings);
        }
        out
    }
}

impl MappingMetrics {
    /// Counts an accepted visitor and keeps it in `active_connections` until the
    /// returned guard drops — however the connection ends —, timing its connect
    /// and its whole connection from now.
    pub(crate) fn visitor_accepted(&self) -> Visit {
        self.connections.inc();
        self.active.inc();
        Visit { mapping: self.clone(), started: Instant::now() }
    }

    /// Meters for visitor→target (`sent`) and target→visitor (`received`): user
    /// bytes only, tunneled or not (the tunnel's wire is metered on its own).
    pub(crate) fn meters(&self) -> (Meter, Meter) {
        (Meter::mapping(self.clone(), SENT), Meter::mapping(self.clone(), RECEIVED))
    }
}

/// Text exposition content type, per the Prometheus spec.
pub(crate) fn content_type() -> String {
    TextEncoder::new().format_type().to_string()
}

#[cfg(test)]
mod tests {
    use super::families::MAPPING_REFUSED;
    use super::*;
    use crate::core::traffic::Traffic;

    #[test]
    fn every_family_is_exported_with_its_help_and_documented() {
        let metrics = Metrics::new();
        metrics.add_mapping(MappingKey::tcp(4000), ["127.0.0.1:9", "direct", "", ""]).relaying(relay_path::SPLICE);
        metrics.add_mapping(MappingKey { port: 53, protocol: crate::core::protocol::Protocol::Udp }, ["127.0.0.1:53", "direct", "", ""]);
        metrics.mapping_client(MappingKey::tcp(4000), "default");
        metrics.add_client("default");
        metrics.set_udp_transport("default", Some("quic"));
        metrics.add_connect_diagnosis("a:9000");
        let text = metrics.render();
        // The metrics tables: the README's, and the operations guide's for the
        // client's own families.
        let docs = [include_str!("../../README.md"), include_str!("../../docs/operations.md")].concat();
        for family in families::ALL {
            let help = format!("# HELP {} {}\n", family.name(), family.help());
            assert!(text.contains(&help), "{help:?} missing from\n{text}");
            assert!(docs.contains(&format!("| `{}` |", family.name())), "{} missing from the metrics tables", family.name());
        }
        let help = MAPPING_REFUSED.help();
        assert!(refused_reason::ALL.iter().all(|reason| help.contains(reason)), "{help}");
    }

    #[test]
    fn traffic_reads_back_what_was_counted() {
        let metrics = Metrics::new();
        let mapping = metrics.add_mapping(MappingKey::tcp(4000), ["127.0.0.1:9", "direct", "", ""]);
        mapping.sent.inc_by(5);
        mapping.received.inc_by(7);
        mapping.connect_errors.inc();
        let open = mapping.visitor_accepted();
        mapping.last_activity.set(12.0);
        metrics.add_client("default");
        metrics.add_client("b");
        let (out, back) = metrics.tunnel_meters("b");
        out.record(3);
        back.record(4);
        metrics.session_started("b", 99.0);

        let snap = metrics.traffic();
        let port = &snap.mappings[&MappingKey::tcp(4000)];
        assert_eq!(
            (port.bytes_sent, port.bytes_received, port.connections_total, port.active_connections, port.connect_errors),
            (5, 7, 1, 1, 1)
        );
        assert_eq!(port.last_update, Some(12.0));
        let b = &snap.clients["b"];
        assert_eq!((b.bytes_sent, b.bytes_received, b.connected, b.connected_since), (3, 4, true, Some(99.0)));
        assert!(b.last_update.is_some());
        assert_eq!(snap.clients["default"], ClientTraffic::default(), "a known client has series at 0");
        let totals = metrics.byte_totals();
        assert_eq!(totals.mappings[&MappingKey::tcp(4000)], Traffic { sent: 5, received: 7 });
        assert_eq!(totals.tunnel["b"], Traffic { sent: 3, received: 4 });

        drop(open);
        metrics.session_ended("b");
        assert_eq!(metrics.traffic().mappings[&MappingKey::tcp(4000)].active_connections, 0);
        assert!(!metrics.traffic().clients["b"].connected);
        metrics.remove_mapping(MappingKey::tcp(4000));
        metrics.remove_client("b");
        let snap = metrics.traffic();
        assert!(snap.mappings.is_empty(), "{:?}", snap.mappings);
        assert_eq!(snap.clients.keys().collect::<Vec<_>>(), ["default"]);
    }

    #[test]
    fn a_client_role_registry_keeps_each_server_apart() {
        let metrics = Metrics::for_client();
        for server in ["a:9000", "b:9000"] {
            metrics.add_client(Tunnel::to_server("office", server));
            metrics.add_connect_diagnosis(server);
        }
        metrics.session_started(Tunnel::to_server("office", "a:9000"), 99.0);
        let (out, _) = metrics.tunnel_meters(Tunnel::to_server("office", "b:9000"));
        out.record(3);
        metrics.connect_failed("b:9000", connect_failure::PIN_MISMATCH, connect_failure::PIN_MISMATCH);
        let text = metrics.render();
        for line in [
            r#"tunneld_tunnel_connected{client="office",server="a:9000"} 1"#,
            r#"tunneld_tunnel_connected{client="office",server="b:9000"} 0"#,
            r#"tunneld_tunnel_bytes_total{client="office",direction="sent",server="b:9000"} 3"#,
            r#"tunneld_client_last_connect_error{reason="pin_mismatch",server="b:9000"} 1"#,
            r#"tunneld_client_last_connect_error{reason="pin_mismatch",server="a:9000"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        metrics.session_ended(Tunnel::to_server("office", "a:9000"));
        assert!(metrics.render().contains(r#"tunneld_tunnel_connected{client="office",server="a:9000"} 0"#));
    }
}
