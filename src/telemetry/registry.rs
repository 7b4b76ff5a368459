//! The registry and the handle of every family, registered from the family
//! table (`families`) so no name or label list is written twice.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::{Gauge, GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Registry};

use super::families::{
    session_result, Family, BUILD_INFO, CLIENT_CONNECT_FAILURES, CLIENT_LAST_CONNECT_ERROR, CLIENT_SERVER, CLIENT_SERVER_DIRECTION,
    CLIENT_UDP_SESSIONS, CONNECTION_LOG_DROPPED, HISTORY_LAST_FLUSH, MAPPING_ACTIVE, MAPPING_BYTES, MAPPING_CLIENT_CONNECTIONS,
    MAPPING_CONNECTIONS, MAPPING_CONNECTION_DURATION, MAPPING_CONNECT_DURATION, MAPPING_CONNECT_ERRORS, MAPPING_DATAGRAMS,
    MAPPING_DROPPED_DATAGRAMS, MAPPING_HEALTH, MAPPING_INFO, MAPPING_LAST_ACTIVITY, MAPPING_QUOTA_BYTES, MAPPING_QUOTA_USED,
    MAPPING_REFUSED, MAPPING_UDP_SESSIONS, MAPPING_UP, TUNNEL_BYTES, TUNNEL_CONNECTED, TUNNEL_CONNECTED_SINCE, TUNNEL_LAST_ACTIVITY,
    TUNNEL_RTT, TUNNEL_RTT_LAST, TUNNEL_SESSIONS, TUNNEL_UDP_TRANSPORT, WEBHOOK_FAILURES,
};
use super::latency::Reservoir;
use crate::core::protocol::MappingKey;
use crate::core::time::unix_now;

/// Every metric family of this process, registered once, with the handles the
/// rest of the crate counts through.
pub struct Metrics {
    pub(super) registry: Registry,
    pub(super) mapping_bytes: IntCounterVec,
    pub(super) mapping_connections: IntCounterVec,
    pub(super) mapping_active: IntGaugeVec,
    pub(super) mapping_last_activity: GaugeVec,
    pub(super) mapping_connect_errors: IntCounterVec,
    pub(super) mapping_refused: IntCounterVec,
    pub(super) mapping_up: IntGaugeVec,
    pub(super) mapping_info: IntGaugeVec,
    pub(super) mapping_quota_used: GaugeVec,
    pub(super) mapping_quota_bytes: IntGaugeVec,
    pub(super) mapping_health: IntGaugeVec,
    pub(super) mapping_connect_duration: HistogramVec,
    pub(super) mapping_datagrams: IntCounterVec,
    pub(super) mapping_udp_sessions: IntGaugeVec,
    pub(super) mapping_dropped_datagrams: IntCounterVec,
    pub(super) mapping_connection_duration: HistogramVec,
    pub(super) mapping_client_connections: IntCounterVec,
    /// Each mapping's recent connect times, for the API's quantiles.
    pub(super) connect_samples: Mutex<BTreeMap<MappingKey, Arc<Reservoir>>>,
    pub(super) tunnel_rtt: HistogramVec,
    pub(super) tunnel_rtt_last: GaugeVec,
    pub(super) tunnel_bytes: IntCounterVec,
    pub(super) tunnel_last_activity: GaugeVec,
    pub(super) tunnel_connected: IntGaugeVec,
    pub(super) tunnel_connected_since: GaugeVec,
    pub(super) tunnel_sessions: IntCounterVec,
    pub(super) tunnel_udp_transport: IntGaugeVec,
    /// Client role: tunneled UDP sessions open now.
    pub(crate) client_udp_sessions: prometheus::IntGauge,
    pub(super) history_last_flush: Gauge,
    pub(super) webhook_failures: IntCounter,
    pub(super) connection_log_dropped: IntCounter,
    pub(super) client_connect_failures: IntCounterVec,
    pub(super) client_last_connect_error: IntGaugeVec,
    /// The client role's: tunnel series carry the `server` label too.
    pub(super) per_server: bool,
    /// When this process's counters began (Unix seconds).
    pub(super) started_at: f64,
}

impl Metrics {
    /// A registry with every family, the process collector and the build info.
    pub fn new() -> Metrics {
        Metrics::build(false)
    }

    /// The client role's registry: its tunnel series are per server
    /// (`client`, `server`), since it may hold a session to several at once.
    pub fn for_client() -> Metrics {
        Metrics::build(true)
    }

    fn build(per_server: bool) -> Metrics {
        let tunnel = |family: Family, per_server_labels: &'static [&'static str]| match per_server {
            true => family.labelled(per_server_labels),
            false => family,
        };
        let registry = Registry::new();
        let r = &registry;
        BUILD_INFO.int_gauge_vec(r).with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        if let Err(e) = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())) {
            panic!("metric names are unique, but process_* are not: {e}");
        }
        let tunnel_sessions = TUNNEL_SESSIONS.int_counter_vec(r);
        for result in session_result::ALL {
            tunnel_sessions.with_label_values(&[result]);
        }
        Metrics {
            mapping_bytes: MAPPING_BYTES.int_counter_vec(r),
            mapping_connections: MAPPING_CONNECTIONS.int_counter_vec(r),
            mapping_active: MAPPING_ACTIVE.int_gauge_vec(r),
            mapping_last_activity: MAPPING_LAST_ACTIVITY.gauge_vec(r),
            mapping_connect_errors: MAPPING_CONNECT_ERRORS.int_counter_vec(r),
            mapping_refused: MAPPING_REFUSED.int_counter_vec(r),
            mapping_up: MAPPING_UP.int_gauge_vec(r),
            mapping_info: MAPPING_INFO.int_gauge_vec(r),
            mapping_quota_used: MAPPING_QUOTA_USED.gauge_vec(r),
            mapping_quota_bytes: MAPPING_QUOTA_BYTES.int_gauge_vec(r),
            mapping_health: MAPPING_HEALTH.int_gauge_vec(r),
            mapping_connect_duration: MAPPING_CONNECT_DURATION.histogram_vec(r),
            mapping_datagrams: MAPPING_DATAGRAMS.int_counter_vec(r),
            mapping_udp_sessions: MAPPING_UDP_SESSIONS.int_gauge_vec(r),
            mapping_dropped_datagrams: MAPPING_DROPPED_DATAGRAMS.int_counter_vec(r),
            mapping_connection_duration: MAPPING_CONNECTION_DURATION.histogram_vec(r),
            mapping_client_connections: MAPPING_CLIENT_CONNECTIONS.int_counter_vec(r),
            connect_samples: Mutex::default(),
            tunnel_rtt: tunnel(TUNNEL_RTT, CLIENT_SERVER).histogram_vec(r),
            tunnel_rtt_last: tunnel(TUNNEL_RTT_LAST, CLIENT_SERVER).gauge_vec(r),
            tunnel_bytes: tunnel(TUNNEL_BYTES, CLIENT_SERVER_DIRECTION).int_counter_vec(r),
            tunnel_last_activity: tunnel(TUNNEL_LAST_ACTIVITY, CLIENT_SERVER).gauge_vec(r),
            tunnel_connected: tunnel(TUNNEL_CONNECTED, CLIENT_SERVER).int_gauge_vec(r),
            tunnel_connected_since: tunnel(TUNNEL_CONNECTED_SINCE, CLIENT_SERVER).gauge_vec(r),
            tunnel_sessions,
            tunnel_udp_transport: TUNNEL_UDP_TRANSPORT.int_gauge_vec(r),
            client_udp_sessions: CLIENT_UDP_SESSIONS.int_gauge(r),
            history_last_flush: HISTORY_LAST_FLUSH.gauge(r),
            webhook_failures: WEBHOOK_FAILURES.int_counter(r),
            connection_log_dropped: CONNECTION_LOG_DROPPED.int_counter(r),
            client_connect_failures: CLIENT_CONNECT_FAILURES.int_counter_vec(r),
            client_last_connect_error: CLIENT_LAST_CONNECT_ERROR.int_gauge_vec(r),
            per_server,
            registry,
            started_at: unix_now(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
