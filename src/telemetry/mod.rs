//! The Prometheus registry: the one source of truth for traffic numbers.
//!
//! Copy loops hold pre-resolved counter handles ([`Meter`]) so counting a chunk is
//! an atomic add, never a label lookup. The JSON API, the SSE stream and the monitor
//! page all read back from [`Metrics::registry`] via [`Metrics::traffic`]; nothing
//! keeps a second set of numbers.

use std::collections::BTreeMap;

use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use serde::Serialize;

use crate::core::names::DEFAULT_CLIENT;
use crate::core::time::unix_now;
use crate::core::traffic::Traffic;

mod meter;
pub use meter::{Held, Meter};

pub const SENT: &str = "sent";
pub const RECEIVED: &str = "received";

/// Outcomes counted in `tunneld_tunnel_sessions_total{result}`.
pub mod session_result {
    pub const OK: &str = "ok";
    pub const AUTH_FAILED: &str = "auth_failed";
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    pub const VERSION_MISMATCH: &str = "version_mismatch";
    /// An authenticated client took over from the one connected before it.
    pub const REPLACED: &str = "replaced";
    /// Refused unheard: too many recent failures from the source, or too many
    /// unauthenticated connections open.
    pub const THROTTLED: &str = "throttled";
    /// A failed TLS handshake, or a TLS/plain mismatch between the two sides.
    pub const TLS_ERROR: &str = "tls_error";
    pub const ALL: [&str; 7] = [OK, AUTH_FAILED, PROTOCOL_ERROR, VERSION_MISMATCH, REPLACED, THROTTLED, TLS_ERROR];
}

/// Why a visitor was turned away, in `tunneld_mapping_refused_total{reason}`.
pub mod refused_reason {
    pub const CONNECTION_LIMIT: &str = "connection_limit";
    /// The process ran out of file descriptors: a local limit, not the target's
    /// fault, so it is not a connect error.
    pub const NO_DESCRIPTORS: &str = "no_descriptors";
    /// The visitor's address is denied, or not allowed, by the mapping's lists.
    pub const ACL: &str = "acl";
    /// The mapping's quota is used up and its action is `block`.
    pub const QUOTA: &str = "quota";
    pub const ALL: [&str; 4] = [CONNECTION_LIMIT, NO_DESCRIPTORS, ACL, QUOTA];
}

pub struct Metrics {
    registry: Registry,
    mapping_bytes: IntCounterVec,
    mapping_connections: IntCounterVec,
    mapping_active: IntGaugeVec,
    mapping_last_activity: GaugeVec,
    mapping_connect_errors: IntCounterVec,
    mapping_refused: IntCounterVec,
    mapping_up: IntGaugeVec,
    mapping_info: IntGaugeVec,
    mapping_quota_used: GaugeVec,
    tunnel_bytes: IntCounterVec,
    tunnel_last_activity: GaugeVec,
    tunnel_connected: IntGaugeVec,
    tunnel_connected_since: GaugeVec,
    tunnel_sessions: IntCounterVec,
    history_last_flush: Gauge,
    webhook_failures: IntCounter,
    /// When this process's counters began (Unix seconds).
    started_at: f64,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let mapping_bytes = IntCounterVec::new(
            Opts::new(
                "tunneld_mapping_bytes_total",
                "Bytes forwarded for a mapping (sent: visitor to target, received: target to visitor).",
            ),
            &["port", "direction"],
        )
        .expect("static metric definition");
        let mapping_connections =
            IntCounterVec::new(Opts::new("tunneld_mapping_connections_total", "Visitor connections accepted."), &["port"])
                .expect("static metric definition");
        let mapping_active = IntGaugeVec::new(Opts::new("tunneld_mapping_active_connections", "Visitor connections open now."), &["port"])
            .expect("static metric definition");
        let mapping_last_activity = GaugeVec::new(
            Opts::new("tunneld_mapping_last_activity_timestamp_seconds", "Unix time bytes last moved on the mapping (0: never)."),
            &["port"],
        )
        .expect("static metric definition");
        let mapping_connect_errors = IntCounterVec::new(
            Opts::new(
                "tunneld_mapping_connect_errors_total",
                "Visitor connections that could not reach the target (connect failed, target unreachable from the client, or no tunnel client).",
            ),
            &["port"],
        )
        .expect("static metric definition");
        let mapping_refused = IntCounterVec::new(
            Opts::new("tunneld_mapping_refused_total", "Visitors refused by a limit (connection_limit, no_descriptors)."),
            &["port", "reason"],
        )
        .expect("static metric definition");
        let mapping_up = IntGaugeVec::new(
            Opts::new("tunneld_mapping_up", "1 while the mapping listens on its port; 0 while the port cannot be bound."),
            &["port"],
        )
        .expect("static metric definition");
        let mapping_info = IntGaugeVec::new(
            Opts::new("tunneld_mapping_info", "Always 1; labels describe the mapping (target, mode, client) for dashboards."),
            &["port", "target", "mode", "client"],
        )
        .expect("static metric definition");
        let tunnel_bytes = IntCounterVec::new(
            Opts::new(
                "tunneld_tunnel_bytes_total",
                "Bytes on the tunnel wire, control and data channels, framing included (sent: from this side).",
            ),
            &["client", "direction"],
        )
        .expect("static metric definition");
        let tunnel_last_activity = GaugeVec::new(
            Opts::new("tunneld_tunnel_last_activity_timestamp_seconds", "Unix time bytes last crossed the client's tunnel (0: never)."),
            &["client"],
        )
        .expect("static metric definition");
        let tunnel_connected = IntGaugeVec::new(Opts::new("tunneld_tunnel_connected", "1 while the client is authenticated."), &["client"])
            .expect("static metric definition");
        let tunnel_connected_since = GaugeVec::new(
            Opts::new(
                "tunneld_tunnel_connected_since_timestamp_seconds",
                "Unix time the client's current tunnel session was authenticated (0: no session).",
            ),
            &["client"],
        )
        .expect("static metric definition");
        let tunnel_sessions = IntCounterVec::new(Opts::new("tunneld_tunnel_sessions_total", "Tunnel handshakes by outcome."), &["result"])
            .expect("static metric definition");
        let history_last_flush = Gauge::new(
            "tunneld_history_last_flush_timestamp_seconds",
            "Unix time the history recorder last wrote to the database (0: not yet).",
        )
        .expect("static metric definition");
        let mapping_quota_used = GaugeVec::new(
            Opts::new("tunneld_mapping_quota_used_ratio", "Share of the current period's quota used (1 = all of it; 0 without a quota)."),
            &["port"],
        )
        .expect("static metric definition");
        let webhook_failures = IntCounter::new(
            "tunneld_alert_webhook_failures_total",
            "Failed attempts to POST an event to alerts.webhook_url (each retry counts; a full queue counts too).",
        )
        .expect("static metric definition");
        let build_info =
            IntGaugeVec::new(Opts::new("tunneld_build_info", "Always 1; the version label says which build runs."), &["version"])
                .expect("static metric definition");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        for result in session_result::ALL {
            tunnel_sessions.with_label_values(&[result]);
        }

        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(mapping_bytes.clone()),
            Box::new(mapping_connections.clone()),
            Box::new(mapping_active.clone()),
            Box::new(mapping_last_activity.clone()),
            Box::new(mapping_connect_errors.clone()),
            Box::new(mapping_refused.clone()),
            Box::new(mapping_up.clone()),
            Box::new(mapping_info.clone()),
            Box::new(mapping_quota_used.clone()),
            Box::new(tunnel_bytes.clone()),
            Box::new(tunnel_last_activity.clone()),
            Box::new(tunnel_connected.clone()),
            Box::new(tunnel_connected_since.clone()),
            Box::new(tunnel_sessions.clone()),
            Box::new(history_last_flush.clone()),
            Box::new(webhook_failures.clone()),
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            mapping_bytes,
            mapping_connections,
            mapping_active,
            mapping_last_activity,
            mapping_connect_errors,
            mapping_refused,
            mapping_up,
            mapping_info,
            mapping_quota_used,
            tunnel_bytes,
            tunnel_last_activity,
            tunnel_connected,
            tunnel_connected_since,
            tunnel_sessions,
            history_last_flush,
            webhook_failures,
            started_at: unix_now(),
        }
    }

    /// When this process's counters began: `bytes_*` count from here.
    pub fn started_at(&self) -> f64 {
        self.started_at
    }

    pub fn webhook_failed(&self) {
        self.webhook_failures.inc();
    }

    pub fn history_flushed(&self, at: f64) {
        self.history_last_flush.set(at);
    }

    /// Every mapping's byte counters (sent, received) and the tunnel's per client,
    /// read from the registry without gathering the other families. Tunnel series
    /// without a `client` label belong to the one client, `default`.
    pub fn byte_totals(&self) -> ByteTotals {
        use prometheus::core::Collector;
        fn label<'a>(m: &'a prometheus::proto::Metric, name: &str) -> Option<&'a str> {
            m.get_label().iter().find(|l| l.name() == name).map(|l| l.value())
        }
        fn add(entry: &mut Traffic, m: &prometheus::proto::Metric) {
            let value = m.get_counter().value() as u64;
            match label(m, "direction") {
                Some(SENT) => entry.sent = value,
                Some(RECEIVED) => entry.received = value,
                _ => {}
            }
        }
        let mut totals = ByteTotals::default();
        for m in self.mapping_bytes.collect().iter().flat_map(|f| f.get_metric()) {
            if let Some(port) = label(m, "port").and_then(|p| p.parse::<u16>().ok()) {
                add(totals.mappings.entry(port).or_default(), m);
            }
        }
        for m in self.tunnel_bytes.collect().iter().flat_map(|f| f.get_metric()) {
            let client = label(m, "client").unwrap_or(DEFAULT_CLIENT).to_string();
            add(totals.tunnel.entry(client).or_default(), m);
        }
        totals
    }

    /// Creates a mapping's series at 0 so dashboards see it from the start.
    /// `info` is `(target, mode, client)` for `tunneld_mapping_info`.
    pub fn add_mapping(&self, port: u16, info: [&str; 3]) -> MappingMetrics {
        let p = port.to_string();
        let [target, mode, client] = info;
        self.mapping_info.with_label_values(&[&p, target, mode, client]).set(1);
        for reason in refused_reason::ALL {
            self.mapping_refused.with_label_values(&[&p, reason]);
        }
        MappingMetrics {
            refused_connection_limit: self.mapping_refused.with_label_values(&[&p, refused_reason::CONNECTION_LIMIT]),
            refused_no_descriptors: self.mapping_refused.with_label_values(&[&p, refused_reason::NO_DESCRIPTORS]),
            refused_acl: self.mapping_refused.with_label_values(&[&p, refused_reason::ACL]),
            refused_quota: self.mapping_refused.with_label_values(&[&p, refused_reason::QUOTA]),
            quota_used: self.mapping_quota_used.with_label_values(&[&p]),
            up: self.mapping_up.with_label_values(&[&p]),
            sent: self.mapping_bytes.with_label_values(&[&p, SENT]),
            received: self.mapping_bytes.with_label_values(&[&p, RECEIVED]),
            connections: self.mapping_connections.with_label_values(&[&p]),
            active: self.mapping_active.with_label_values(&[&p]),
            last_activity: self.mapping_last_activity.with_label_values(&[&p]),
            connect_errors: self.mapping_connect_errors.with_label_values(&[&p]),
        }
    }

    /// Drops every series of a removed mapping (`info` as given to [`Metrics::add_mapping`]).
    pub fn remove_mapping(&self, port: u16, info: [&str; 3]) {
        let p = port.to_string();
        let [target, mode, client] = info;
        let _ = self.mapping_info.remove_label_values(&[&p, target, mode, client]);
        for dir in [SENT, RECEIVED] {
            let _ = self.mapping_bytes.remove_label_values(&[&p, dir]);
        }
        let _ = self.mapping_connections.remove_label_values(&[&p]);
        let _ = self.mapping_active.remove_label_values(&[&p]);
        let _ = self.mapping_last_activity.remove_label_values(&[&p]);
        let _ = self.mapping_connect_errors.remove_label_values(&[&p]);
        let _ = self.mapping_up.remove_label_values(&[&p]);
        let _ = self.mapping_quota_used.remove_label_values(&[&p]);
        for reason in refused_reason::ALL {
            let _ = self.mapping_refused.remove_label_values(&[&p, reason]);
        }
    }

    /// Creates a tunnel client's series at 0, so dashboards and alerts see a known
    /// client from the start, connected or not.
    pub fn add_client(&self, client: &str) {
        for dir in [SENT, RECEIVED] {
            self.tunnel_bytes.with_label_values(&[client, dir]);
        }
        self.tunnel_last_activity.with_label_values(&[client]);
        self.tunnel_connected.with_label_values(&[client]);
        self.tunnel_connected_since.with_label_values(&[client]);
    }

    /// Drops a removed client's series.
    pub fn remove_client(&self, client: &str) {
        for dir in [SENT, RECEIVED] {
            let _ = self.tunnel_bytes.remove_label_values(&[client, dir]);
        }
        let _ = self.tunnel_last_activity.remove_label_values(&[client]);
        let _ = self.tunnel_connected.remove_label_values(&[client]);
        let _ = self.tunnel_connected_since.remove_label_values(&[client]);
    }

    /// Meters for bytes leaving this side on `client`'s tunnel and arriving from it.
    pub fn tunnel_meters(&self, client: &str) -> (Meter, Meter) {
        let activity = self.tunnel_last_activity.with_label_values(&[client]);
        let meter = |dir| Meter::new(vec![self.tunnel_bytes.with_label_values(&[client, dir])], vec![activity.clone()]);
        (meter(SENT), meter(RECEIVED))
    }

    /// `since`: when the session authenticated (Unix seconds).
    pub fn session_started(&self, client: &str, since: f64) {
        self.tunnel_connected.with_label_values(&[client]).set(1);
        self.tunnel_connected_since.with_label_values(&[client]).set(since);
    }

    /// Only for a client still known: a removed client's series stay removed.
    pub fn session_ended(&self, client: &str) {
        if let Ok(connected) = self.tunnel_connected.get_metric_with_label_values(&[client]) {
            connected.set(0);
        }
        if let Ok(since) = self.tunnel_connected_since.get_metric_with_label_values(&[client]) {
            since.set(0.0);
        }
    }

    pub fn count_session(&self, result: &str) {
        self.tunnel_sessions.with_label_values(&[result]).inc();
    }

    /// Whether any client is authenticated (on a client: whether it is).
    pub fn tunnel_connected(&self) -> bool {
        use prometheus::core::Collector;
        self.tunnel_connected.collect().iter().flat_map(|f| f.get_metric()).any(|m| m.get_gauge().value() == 1.0)
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Traffic numbers read back from the registry.
    pub fn traffic(&self) -> TrafficSnapshot {
        let mut snap = TrafficSnapshot::default();
        let mut ports: BTreeMap<u16, PortTraffic> = BTreeMap::new();
        for family in self.registry.gather() {
            for metric in family.get_metric() {
                let label = |name: &str| metric.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_string());
                let port = label("port").and_then(|p| p.parse::<u16>().ok());
                let counter = metric.get_counter().value();
                let gauge = metric.get_gauge().value();
                match (family.name(), port) {
                    ("tunneld_mapping_bytes_total", Some(p)) => {
                        let entry = ports.entry(p).or_default();
                        match label("direction").as_deref() {
                            Some(SENT) => entry.bytes_sent = counter as u64,
                            Some(RECEIVED) => entry.bytes_received = counter as u64,
                            _ => {}
                        }
                    }
                    ("tunneld_mapping_connections_total", Some(p)) => ports.entry(p).or_default().connections_total = counter as u64,
                    ("tunneld_mapping_active_connections", Some(p)) => {
                        ports.entry(p).or_default().active_connections = gauge.max(0.0) as u64
                    }
                    ("tunneld_mapping_connect_errors_total", Some(p)) => ports.entry(p).or_default().connect_errors = counter as u64,
                    ("tunneld_mapping_last_activity_timestamp_seconds", Some(p)) => {
                        ports.entry(p).or_default().last_update = timestamp(gauge)
                    }
                    ("tunneld_tunnel_bytes_total", None) => {
                        let entry = snap.clients.entry(label("client").unwrap_or_default()).or_default();
                        match label("direction").as_deref() {
                            Some(SENT) => entry.bytes_sent = counter as u64,
                            Some(RECEIVED) => entry.bytes_received = counter as u64,
                            _ => {}
                        }
                    }
                    ("tunneld_tunnel_last_activity_timestamp_seconds", None) => {
                        snap.clients.entry(label("client").unwrap_or_default()).or_default().last_update = timestamp(gauge)
                    }
                    ("tunneld_tunnel_connected_since_timestamp_seconds", None) => {
                        snap.clients.entry(label("client").unwrap_or_default()).or_default().connected_since = timestamp(gauge)
                    }
                    ("tunneld_tunnel_connected", None) => {
                        snap.clients.entry(label("client").unwrap_or_default()).or_default().connected = gauge == 1.0
                    }
                    _ => {}
                }
            }
        }
        snap.mappings = ports;
        snap
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Gauges use 0 for "never"; JSON uses null.
fn timestamp(v: f64) -> Option<f64> {
    (v > 0.0).then_some(v)
}

/// Byte counters per mapping port and per tunnel client.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ByteTotals {
    pub mappings: BTreeMap<u16, Traffic>,
    pub tunnel: BTreeMap<String, Traffic>,
}

/// One mapping's numbers as read from the registry.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PortTraffic {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub last_update: Option<f64>,
    pub active_connections: u64,
    pub connections_total: u64,
    pub connect_errors: u64,
}

#[derive(Debug, Default, Clone)]
pub struct TrafficSnapshot {
    pub mappings: BTreeMap<u16, PortTraffic>,
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
}

impl TrafficSnapshot {
    /// The tunnel as one: bytes summed over clients, the latest activity, connected
    /// while any client is, since the earliest session began.
    pub fn tunnel(&self) -> ClientTraffic {
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

/// A mapping's pre-resolved handles, created once when the mapping is.
#[derive(Clone)]
pub struct MappingMetrics {
    pub sent: IntCounter,
    pub received: IntCounter,
    pub connections: IntCounter,
    pub active: IntGauge,
    pub last_activity: Gauge,
    pub connect_errors: IntCounter,
    pub refused_connection_limit: IntCounter,
    pub refused_no_descriptors: IntCounter,
    pub refused_acl: IntCounter,
    pub refused_quota: IntCounter,
    /// `tunneld_mapping_quota_used_ratio`.
    pub quota_used: Gauge,
    /// `tunneld_mapping_up`: 1 while listening.
    pub up: IntGauge,
}

impl MappingMetrics {
    /// Counts an accepted visitor and keeps it in `active_connections` until the
    /// returned guard drops — however the connection ends.
    pub fn visitor_accepted(&self) -> ActiveGuard {
        self.connections.inc();
        self.active.inc();
        ActiveGuard(self.active.clone())
    }

    /// Meters for visitor→target (`sent`) and target→visitor (`received`): user
    /// bytes only, tunneled or not (the tunnel's wire is metered on its own).
    pub fn meters(&self) -> (Meter, Meter) {
        let activity = vec![self.last_activity.clone()];
        (Meter::new(vec![self.sent.clone()], activity.clone()), Meter::new(vec![self.received.clone()], activity))
    }
}

pub struct ActiveGuard(IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Text exposition content type, per the Prometheus spec.
pub fn content_type() -> String {
    TextEncoder::new().format_type().to_string()
}
