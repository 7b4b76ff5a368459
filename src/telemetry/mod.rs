//! The Prometheus registry: the one source of truth for traffic numbers.
//!
//! Copy loops hold pre-resolved counter handles ([`Meter`]) so counting a chunk is
//! an atomic add, never a label lookup. The JSON API, the SSE stream and the monitor
//! page all read back from [`Metrics::registry`] via [`Metrics::traffic`]; nothing
//! keeps a second set of numbers.
//!
//! `families` is the schema (each family's name, HELP and labels, defined once),
//! `snapshot` the read-back, `meter` the data path's side.
//!
//! May import `core` only, so every layer above can count.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{Encoder, Gauge, Histogram, IntCounter, IntGauge, TextEncoder};

use crate::core::protocol::{MappingKey, Protocol};
use crate::core::sync::lock;

mod families;
mod latency;
mod meter;
mod registry;
mod snapshot;

pub(crate) use families::{connect_failure, dropped_reason, health_state, refused_reason, session_result, RECEIVED, SENT};
pub use latency::{RoundTrips, Visit};
pub use meter::{Held, Meter};
pub use registry::Metrics;

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
    /// `tunneld_mapping_info`.
    pub fn add_mapping(&self, key: MappingKey, info: [&str; 4]) -> MappingMetrics {
        let p = key.port.to_string();
        let k = [p.as_str(), key.protocol.as_str()];
        self.mapping_info.with_label_values(&[k[0], k[1], info[0], info[1], info[2], info[3]]).set(1);
        for reason in refused_reason::ALL {
            self.mapping_refused.with_label_values(&with(k, reason));
        }
        let udp = (key.protocol == Protocol::Udp).then(|| {
            for reason in dropped_reason::ALL {
                self.mapping_dropped_datagrams.with_label_values(&with(k, reason));
            }
            Arc::new(UdpMetrics {
                datagrams_sent: self.mapping_datagrams.with_label_values(&with(k, SENT)),
                datagrams_received: self.mapping_datagrams.with_label_values(&with(k, RECEIVED)),
                sessions: self.mapping_udp_sessions.with_label_values(&k),
                dropped_queue_full: self.mapping_dropped_datagrams.with_label_values(&with(k, dropped_reason::QUEUE_FULL)),
                dropped_too_large: self.mapping_dropped_datagrams.with_label_values(&with(k, dropped_reason::TOO_LARGE)),
                dropped_session_limit: self.mapping_dropped_datagrams.with_label_values(&with(k, dropped_reason::SESSION_LIMIT)),
                dropped_no_tunnel: self.mapping_dropped_datagrams.with_label_values(&with(k, dropped_reason::NO_TUNNEL)),
            })
        });
        self.set_mapping_health(key, health_state::OK);
        let connect_samples = Arc::new(latency::Reservoir::default());
        lock(&self.connect_samples).insert(key, connect_samples.clone());
        MappingMetrics {
            connect_duration: self.mapping_connect_duration.with_label_values(&k),
            connection_duration: self.mapping_connection_duration.with_label_values(&k),
            connect_samples,
            quota_bytes: self.mapping_quota_bytes.with_label_values(&k),
            refused_connection_limit: self.mapping_refused.with_label_values(&with(k, refused_reason::CONNECTION_LIMIT)),
            refused_no_descriptors: self.mapping_refused.with_label_values(&with(k, refused_reason::NO_DESCRIPTORS)),
            refused_acl: self.mapping_refused.with_label_values(&with(k, refused_reason::ACL)),
            refused_quota: self.mapping_refused.with_label_values(&with(k, refused_reason::QUOTA)),
            refused_process_limit: self.mapping_refused.with_label_values(&with(k, refused_reason::PROCESS_LIMIT)),
            refused_loop: self.mapping_refused.with_label_values(&with(k, refused_reason::LOOP)),
            quota_used: self.mapping_quota_used.with_label_values(&k),
            up: self.mapping_up.with_label_values(&k),
            sent: self.mapping_bytes.with_label_values(&with(k, SENT)),
            received: self.mapping_bytes.with_label_values(&with(k, RECEIVED)),
            connections: self.mapping_connections.with_label_values(&k),
            active: self.mapping_active.with_label_values(&k),
            last_activity: self.mapping_last_activity.with_label_values(&k),
            connect_errors: self.mapping_connect_errors.with_label_values(&k),
            udp,
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

    /// Replaces a mapping's `tunneld_mapping_info` series (its description changed).
    pub(crate) fn relabel_mapping(&self, key: MappingKey, old: [&str; 4], new: [&str; 4]) {
        let p = key.port.to_string();
        let proto = key.protocol.as_str();
        let _ = self.mapping_info.remove_label_values(&[&p, proto, old[0], old[1], old[2], old[3]]);
        self.mapping_info.with_label_values(&[&p, proto, new[0], new[1], new[2], new[3]]).set(1);
    }

    /// `tunneld_mapping_health{port,protocol}`: 1 for `state` (one of [`health_state::ALL`]), 0 for the others.
    pub(crate) fn set_mapping_health(&self, key: MappingKey, state: &str) {
        let p = key.port.to_string();
        for each in health_state::ALL {
            self.mapping_health.with_label_values(&[&p, key.protocol.as_str(), each]).set(i64::from(each == state));
        }
    }

    /// Drops every series of a removed mapping (`info` as given to [`Metrics::add_mapping`]).
    pub(crate) fn remove_mapping(&self, key: MappingKey, info: [&str; 4]) {
        let p = key.port.to_string();
        let k = [p.as_str(), key.protocol.as_str()];
        let _ = self.mapping_info.remove_label_values(&[k[0], k[1], info[0], info[1], info[2], info[3]]);
        let _ = self.mapping_quota_bytes.remove_label_values(&k);
        for state in health_state::ALL {
            let _ = self.mapping_health.remove_label_values(&with(k, state));
        }
        for dir in [SENT, RECEIVED] {
            let _ = self.mapping_bytes.remove_label_values(&with(k, dir));
            let _ = self.mapping_datagrams.remove_label_values(&with(k, dir));
        }
        let _ = self.mapping_udp_sessions.remove_label_values(&k);
        for reason in dropped_reason::ALL {
            let _ = self.mapping_dropped_datagrams.remove_label_values(&with(k, reason));
        }
        let _ = self.mapping_connections.remove_label_values(&k);
        let _ = self.mapping_active.remove_label_values(&k);
        let _ = self.mapping_last_activity.remove_label_values(&k);
        let _ = self.mapping_connect_errors.remove_label_values(&k);
        let _ = self.mapping_up.remove_label_values(&k);
        let _ = self.mapping_quota_used.remove_label_values(&k);
        let _ = self.mapping_connect_duration.remove_label_values(&k);
        let _ = self.mapping_connection_duration.remove_label_values(&k);
        lock(&self.connect_samples).remove(&key);
        for reason in refused_reason::ALL {
            let _ = self.mapping_refused.remove_label_values(&with(k, reason));
        }
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
        let meter = |dir| Meter::new(vec![self.tunnel_bytes.with_label_values(&[&labels[..], &[dir]].concat())], vec![activity.clone()]);
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

    /// Prometheus text exposition of everything registered.
    pub(crate) fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// A mapping's pre-resolved handles, created once when the mapping is.
#[derive(Clone)]
pub struct MappingMetrics {
    /// `tunneld_mapping_bytes_total{direction="sent"}`: visitor to target.
    pub sent: IntCounter,
    /// `tunneld_mapping_bytes_total{direction="received"}`: target to visitor.
    pub received: IntCounter,
    pub(crate) connections: IntCounter,
    pub(crate) active: IntGauge,
    pub(crate) last_activity: Gauge,
    pub(crate) connect_errors: IntCounter,
    pub(crate) refused_connection_limit: IntCounter,
    pub(crate) refused_no_descriptors: IntCounter,
    pub(crate) refused_acl: IntCounter,
    pub(crate) refused_quota: IntCounter,
    pub(crate) refused_process_limit: IntCounter,
    pub(crate) refused_loop: IntCounter,
    /// `tunneld_mapping_quota_used_ratio`.
    pub(crate) quota_used: Gauge,
    /// `tunneld_mapping_quota_bytes`: the allowance, 0 without a quota.
    pub(crate) quota_bytes: IntGauge,
    /// `tunneld_mapping_up`: 1 while listening.
    pub(crate) up: IntGauge,
    /// `tunneld_mapping_connect_duration_seconds`.
    connect_duration: Histogram,
    /// `tunneld_mapping_connection_duration_seconds`.
    connection_duration: Histogram,
    /// Recent connect times, for the API's quantiles.
    connect_samples: Arc<latency::Reservoir>,
    /// A UDP mapping's datagram, session and drop counters; `None` for TCP.
    pub(crate) udp: Option<Arc<UdpMetrics>>,
}

/// A UDP mapping's own series, pre-resolved.
pub struct UdpMetrics {
    /// `tunneld_mapping_datagrams_total{direction="sent"}`: visitor to target.
    pub(crate) datagrams_sent: IntCounter,
    /// `tunneld_mapping_datagrams_total{direction="received"}`: target to visitor.
    pub(crate) datagrams_received: IntCounter,
    /// `tunneld_mapping_udp_sessions`.
    pub(crate) sessions: IntGauge,
    pub(crate) dropped_queue_full: IntCounter,
    pub(crate) dropped_too_large: IntCounter,
    pub(crate) dropped_session_limit: IntCounter,
    /// Tunneled: the mapping's client was not connected (or its session ended).
    pub(crate) dropped_no_tunnel: IntCounter,
}

impl MappingMetrics {
    /// Counts an accepted visitor and keeps it in `active_connections` until the
    /// returned guard drops — however the connection ends —, timing its connect
    /// and its whole connection from now.
    pub(crate) fn visitor_accepted(&self) -> Visit {
        self.connections.inc();
        self.active.inc();
        Visit {
            active: self.active.clone(),
            started: Instant::now(),
            connect: self.connect_duration.clone(),
            samples: self.connect_samples.clone(),
            duration: self.connection_duration.clone(),
        }
    }

    /// Visitors refused so far, per reason of [`refused_reason::ALL`], in that order.
    pub(crate) fn refused_counts(&self) -> [u64; 6] {
        [
            &self.refused_connection_limit,
            &self.refused_no_descriptors,
            &self.refused_acl,
            &self.refused_quota,
            &self.refused_process_limit,
            &self.refused_loop,
        ]
        .map(|c| c.get())
    }

    /// Meters for visitor→target (`sent`) and target→visitor (`received`): user
    /// bytes only, tunneled or not (the tunnel's wire is metered on its own).
    pub(crate) fn meters(&self) -> (Meter, Meter) {
        let activity = vec![self.last_activity.clone()];
        (Meter::new(vec![self.sent.clone()], activity.clone()), Meter::new(vec![self.received.clone()], activity))
    }
}

/// A mapping's `(port, protocol)` label values and one more.
fn with<'a>(k: [&'a str; 2], extra: &'a str) -> [&'a str; 3] {
    [k[0], k[1], extra]
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
        metrics.add_mapping(crate::core::protocol::MappingKey::tcp(4000), ["127.0.0.1:9", "direct", "", ""]);
        metrics.add_mapping(MappingKey { port: 53, protocol: Protocol::Udp }, ["127.0.0.1:53", "direct", "", ""]);
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
        let mapping = metrics.add_mapping(crate::core::protocol::MappingKey::tcp(4000), ["127.0.0.1:9", "direct", "", ""]);
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
        let port = &snap.mappings[&crate::core::protocol::MappingKey::tcp(4000)];
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
        assert_eq!(totals.mappings[&crate::core::protocol::MappingKey::tcp(4000)], Traffic { sent: 5, received: 7 });
        assert_eq!(totals.tunnel["b"], Traffic { sent: 3, received: 4 });

        drop(open);
        metrics.session_ended("b");
        assert_eq!(metrics.traffic().mappings[&crate::core::protocol::MappingKey::tcp(4000)].active_connections, 0);
        assert!(!metrics.traffic().clients["b"].connected);
        metrics.remove_mapping(crate::core::protocol::MappingKey::tcp(4000), ["127.0.0.1:9", "direct", "", ""]);
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
