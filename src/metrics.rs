//! The Prometheus registry: the one source of truth for traffic numbers.
//!
//! Copy loops hold pre-resolved counter handles ([`Meter`]) so counting a chunk is
//! an atomic add, never a label lookup. The JSON API, the SSE stream and the monitor
//! page all read back from [`Metrics::registry`] via [`Metrics::traffic`]; nothing
//! keeps a second set of numbers.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use serde::Serialize;

pub const SENT: &str = "sent";
pub const RECEIVED: &str = "received";

/// Outcomes counted in `tunneld_tunnel_sessions_total{result}`.
pub mod session_result {
    pub const OK: &str = "ok";
    pub const AUTH_FAILED: &str = "auth_failed";
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    pub const VERSION_MISMATCH: &str = "version_mismatch";
    /// A failed TLS handshake, or a TLS/plain mismatch between the two sides.
    pub const TLS_ERROR: &str = "tls_error";
    pub const ALL: [&str; 5] = [OK, AUTH_FAILED, PROTOCOL_ERROR, VERSION_MISMATCH, TLS_ERROR];
}

pub struct Metrics {
    registry: Registry,
    mapping_bytes: IntCounterVec,
    mapping_connections: IntCounterVec,
    mapping_active: IntGaugeVec,
    mapping_last_activity: GaugeVec,
    mapping_connect_errors: IntCounterVec,
    tunnel_bytes: IntCounterVec,
    tunnel_last_activity: Gauge,
    tunnel_connected: IntGauge,
    tunnel_connected_since: Gauge,
    tunnel_sessions: IntCounterVec,
}

/// Seconds since the Unix epoch, as Prometheus timestamps are.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
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
        let tunnel_bytes = IntCounterVec::new(
            Opts::new(
                "tunneld_tunnel_bytes_total",
                "Bytes on the tunnel wire, control and data channels, framing included (sent: from this side).",
            ),
            &["direction"],
        )
        .expect("static metric definition");
        let tunnel_last_activity =
            Gauge::new("tunneld_tunnel_last_activity_timestamp_seconds", "Unix time bytes last crossed the tunnel (0: never).")
                .expect("static metric definition");
        let tunnel_connected =
            IntGauge::new("tunneld_tunnel_connected", "1 while a client is authenticated.").expect("static metric definition");
        let tunnel_connected_since = Gauge::new(
            "tunneld_tunnel_connected_since_timestamp_seconds",
            "Unix time the current tunnel session was authenticated (0: no session).",
        )
        .expect("static metric definition");
        let tunnel_sessions = IntCounterVec::new(Opts::new("tunneld_tunnel_sessions_total", "Tunnel handshakes by outcome."), &["result"])
            .expect("static metric definition");
        let build_info =
            IntGaugeVec::new(Opts::new("tunneld_build_info", "Always 1; the version label says which build runs."), &["version"])
                .expect("static metric definition");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        for dir in [SENT, RECEIVED] {
            tunnel_bytes.with_label_values(&[dir]);
        }
        for result in session_result::ALL {
            tunnel_sessions.with_label_values(&[result]);
        }

        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(mapping_bytes.clone()),
            Box::new(mapping_connections.clone()),
            Box::new(mapping_active.clone()),
            Box::new(mapping_last_activity.clone()),
            Box::new(mapping_connect_errors.clone()),
            Box::new(tunnel_bytes.clone()),
            Box::new(tunnel_last_activity.clone()),
            Box::new(tunnel_connected.clone()),
            Box::new(tunnel_connected_since.clone()),
            Box::new(tunnel_sessions.clone()),
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
            tunnel_bytes,
            tunnel_last_activity,
            tunnel_connected,
            tunnel_connected_since,
            tunnel_sessions,
        }
    }

    /// Creates a mapping's series at 0 so dashboards see it from the start.
    pub fn add_mapping(&self, port: u16) -> MappingMetrics {
        let p = port.to_string();
        MappingMetrics {
            sent: self.mapping_bytes.with_label_values(&[&p, SENT]),
            received: self.mapping_bytes.with_label_values(&[&p, RECEIVED]),
            connections: self.mapping_connections.with_label_values(&[&p]),
            active: self.mapping_active.with_label_values(&[&p]),
            last_activity: self.mapping_last_activity.with_label_values(&[&p]),
            connect_errors: self.mapping_connect_errors.with_label_values(&[&p]),
        }
    }

    /// Drops every series of a removed mapping.
    pub fn remove_mapping(&self, port: u16) {
        let p = port.to_string();
        for dir in [SENT, RECEIVED] {
            let _ = self.mapping_bytes.remove_label_values(&[&p, dir]);
        }
        let _ = self.mapping_connections.remove_label_values(&[&p]);
        let _ = self.mapping_active.remove_label_values(&[&p]);
        let _ = self.mapping_last_activity.remove_label_values(&[&p]);
        let _ = self.mapping_connect_errors.remove_label_values(&[&p]);
    }

    /// Meters for bytes leaving this side on the tunnel and arriving from it.
    pub fn tunnel_meters(&self) -> (Meter, Meter) {
        let meter = |dir| Meter::new(vec![self.tunnel_bytes.with_label_values(&[dir])], vec![self.tunnel_last_activity.clone()]);
        (meter(SENT), meter(RECEIVED))
    }

    pub fn session_started(&self) {
        self.tunnel_connected.set(1);
        self.tunnel_connected_since.set(unix_now());
    }

    pub fn session_ended(&self) {
        self.tunnel_connected.set(0);
        self.tunnel_connected_since.set(0.0);
    }

    pub fn count_session(&self, result: &str) {
        self.tunnel_sessions.with_label_values(&[result]).inc();
    }

    pub fn tunnel_connected(&self) -> bool {
        self.tunnel_connected.get() == 1
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
                    ("tunneld_tunnel_bytes_total", None) => match label("direction").as_deref() {
                        Some(SENT) => snap.tunnel_sent = counter as u64,
                        Some(RECEIVED) => snap.tunnel_received = counter as u64,
                        _ => {}
                    },
                    ("tunneld_tunnel_last_activity_timestamp_seconds", None) => snap.tunnel_last_update = timestamp(gauge),
                    ("tunneld_tunnel_connected_since_timestamp_seconds", None) => snap.tunnel_connected_since = timestamp(gauge),
                    ("tunneld_tunnel_connected", None) => snap.tunnel_connected = gauge == 1.0,
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
    pub tunnel_sent: u64,
    pub tunnel_received: u64,
    pub tunnel_last_update: Option<f64>,
    pub tunnel_connected: bool,
    pub tunnel_connected_since: Option<f64>,
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

/// What one direction of a copy loop adds each chunk to: byte counters and
/// "last activity" gauges, all resolved before the first byte moves.
#[derive(Clone, Default)]
pub struct Meter {
    counters: Vec<IntCounter>,
    activity: Vec<Gauge>,
}

impl Meter {
    pub fn new(counters: Vec<IntCounter>, activity: Vec<Gauge>) -> Meter {
        Meter { counters, activity }
    }

    /// Adds `n` bytes, live.
    #[inline]
    pub fn record(&self, n: u64) {
        if cfg!(feature = "bench-uncounted") {
            return;
        }
        for c in &self.counters {
            c.inc_by(n);
        }
        if !self.activity.is_empty() {
            let now = unix_now();
            for g in &self.activity {
                g.set(now);
            }
        }
    }
}

/// Text exposition content type, per the Prometheus spec.
pub fn content_type() -> String {
    TextEncoder::new().format_type().to_string()
}
