//! The schema: every metric family this daemon exports, each defined once. The
//! same [`Family`] registers the family (name, HELP, label names) and names the
//! labels its series are read back by, so no name is spelled twice.

use prometheus::core::Collector;
use prometheus::{Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// `direction` label value: visitor to target on a mapping, from this side on a tunnel.
pub(crate) const SENT: &str = "sent";
/// `direction` label value: the other way.
pub(crate) const RECEIVED: &str = "received";

/// Outcomes counted in `tunneld_tunnel_sessions_total{result}`.
pub(crate) mod session_result {
    pub(crate) const OK: &str = "ok";
    pub(crate) const AUTH_FAILED: &str = "auth_failed";
    pub(crate) const PROTOCOL_ERROR: &str = "protocol_error";
    pub(crate) const VERSION_MISMATCH: &str = "version_mismatch";
    /// An authenticated client took over from the one connected before it.
    pub(crate) const REPLACED: &str = "replaced";
    /// Refused unheard: too many recent failures from the source, or too many
    /// unauthenticated connections open.
    pub(crate) const THROTTLED: &str = "throttled";
    /// A failed TLS handshake, or a TLS/plain mismatch between the two sides.
    pub(crate) const TLS_ERROR: &str = "tls_error";
    pub(crate) const ALL: [&str; 7] = [OK, AUTH_FAILED, PROTOCOL_ERROR, VERSION_MISMATCH, REPLACED, THROTTLED, TLS_ERROR];
}

/// Why a visitor was turned away, in `tunneld_mapping_refused_total{reason}`.
pub(crate) mod refused_reason {
    pub(crate) const CONNECTION_LIMIT: &str = "connection_limit";
    /// The process ran out of file descriptors: a local limit, not the target's
    /// fault, so it is not a connect error.
    pub(crate) const NO_DESCRIPTORS: &str = "no_descriptors";
    /// The visitor's address is denied, or not allowed, by the mapping's lists.
    pub(crate) const ACL: &str = "acl";
    /// The mapping's quota is used up and its action is `block`.
    pub(crate) const QUOTA: &str = "quota";
    /// Every visitor connection of the process together holds the share of
    /// its descriptor limit kept for them: a loop of any shape stops here,
    /// with the reserve left for the API, the tunnel and the store.
    pub(crate) const PROCESS_LIMIT: &str = "process_limit";
    /// A tunneled mapping whose client is on this host and whose target is one
    /// of this daemon's own listeners: every visitor would come back as a new one.
    pub(crate) const LOOP: &str = "loop";
    /// Every reason; the family's HELP lists these, so it names each one there is.
    pub(crate) const ALL: [&str; 6] = [CONNECTION_LIMIT, NO_DESCRIPTORS, ACL, QUOTA, PROCESS_LIMIT, LOOP];
}

/// Why a UDP mapping dropped a datagram, in
/// `tunneld_mapping_dropped_datagrams_total{reason}`.
pub(crate) mod dropped_reason {
    /// The session's queue toward its target or its visitor was full.
    pub(crate) const QUEUE_FULL: &str = "queue_full";
    /// Larger than the mapping forwards (never truncated).
    pub(crate) const TOO_LARGE: &str = "too_large";
    /// From a new visitor address while the mapping has its most sessions.
    pub(crate) const SESSION_LIMIT: &str = "session_limit";
    /// Tunneled, and no client to carry it.
    pub(crate) const NO_TUNNEL: &str = "no_tunnel";
    /// Every reason; the family's HELP lists these. (Datagrams from addresses
    /// the allow/deny lists or a blocking quota refuse are counted in
    /// `tunneld_mapping_refused_total`, one per datagram, as TCP visitors are.)
    pub(crate) const ALL: [&str; 4] = [QUEUE_FULL, TOO_LARGE, SESSION_LIMIT, NO_TUNNEL];
}

/// How a mapping's relay moves bytes, in
/// `tunneld_mapping_relayed_connections_total{path}`: a direct mapping's
/// between its two sockets, a tunneled one's chunk payloads between the
/// visitor and a plain data channel (the server's end; the client chooses
/// its own the same way).
pub(crate) mod relay_path {
    /// In the kernel, socket to pipe to socket (`splice(2)`).
    pub(crate) const SPLICE: &str = "splice";
    /// Through user space: where splice cannot serve (a TLS data channel,
    /// `TUNNELD_FORCE_COPY=1`, a kernel that refuses it).
    pub(crate) const COPY: &str = "copy";
    /// Every path; the family's HELP lists these.
    pub(crate) const ALL: [&str; 2] = [SPLICE, COPY];
}

/// A mapping's health, in `tunneld_mapping_health{health}` and the API's
/// `health` field: what the operator should look at, worst first.
pub(crate) mod health_state {
    /// Its port cannot be bound.
    pub(crate) const DOWN: &str = "down";
    /// Tunneled, and its client is not connected.
    pub(crate) const WAITING_FOR_TUNNEL: &str = "waiting_for_tunnel";
    /// Its quota is used up and its action is `block`.
    pub(crate) const BLOCKED: &str = "blocked";
    /// Recent visitors could not reach the target.
    pub(crate) const TARGET_FAILING: &str = "target_failing";
    /// Recent visitors were refused (allow/deny lists, limits).
    pub(crate) const REFUSING: &str = "refusing";
    /// Nothing to act on.
    pub(crate) const OK: &str = "ok";
    /// Every state; the family's HELP lists these.
    pub(crate) const ALL: [&str; 6] = [OK, TARGET_FAILING, BLOCKED, REFUSING, WAITING_FOR_TUNNEL, DOWN];
}

/// Why the client's attempt to connect to its server failed, in
/// `tunneld_client_connect_failures_total{reason}` and
/// `tunneld_client_last_connect_error{reason}`.
pub(crate) mod connect_failure {
    /// The server's address could not be reached (TCP connect failed or timed out).
    pub(crate) const UNREACHABLE: &str = "unreachable";
    /// The server presented another certificate than `client.server_fingerprint`.
    pub(crate) const PIN_MISMATCH: &str = "pin_mismatch";
    /// The certificate is not acceptable otherwise (CA, name, expiry).
    pub(crate) const CERTIFICATE: &str = "certificate";
    /// The server runs with `server.tls = false` and this client with TLS.
    pub(crate) const SERVER_TLS_OFF: &str = "server_tls_off";
    /// The server requires TLS and this client runs with `client.tls = false`.
    pub(crate) const SERVER_REQUIRES_TLS: &str = "server_requires_tls";
    /// Any other TLS failure (the connection closed, garbage).
    pub(crate) const TLS_ERROR: &str = "tls_error";
    /// The server refuses this address unheard for a while, after failed attempts.
    pub(crate) const THROTTLED: &str = "throttled";
    /// Wrong secret, or a client name the server does not know.
    pub(crate) const AUTH_REFUSED: &str = "auth_refused";
    /// The two sides speak different protocol versions.
    pub(crate) const VERSION_MISMATCH: &str = "version_mismatch";
    /// Refused before authentication for another reason (an invalid name).
    pub(crate) const REJECTED: &str = "rejected";
    /// The handshake broke off or timed out after TLS.
    pub(crate) const PROTOCOL_ERROR: &str = "protocol_error";
    /// Every reason; the families' HELP lists them.
    pub(crate) const ALL: [&str; 11] = [
        UNREACHABLE,
        PIN_MISMATCH,
        CERTIFICATE,
        SERVER_TLS_OFF,
        SERVER_REQUIRES_TLS,
        TLS_ERROR,
        THROTTLED,
        AUTH_REFUSED,
        VERSION_MISMATCH,
        REJECTED,
        PROTOCOL_ERROR,
    ];
}

/// Label: a mapping's listening port.
pub(crate) const PORT: &str = "port";
/// Label: a mapping's protocol, `tcp` or `udp`: with the port, what identifies it.
pub(crate) const PROTOCOL: &str = "protocol";
/// Label: why a visitor was refused, one of [`refused_reason::ALL`].
pub(crate) const REASON: &str = "reason";
/// Label: [`SENT`] or [`RECEIVED`].
pub(crate) const DIRECTION: &str = "direction";
/// Label: a tunnel client's name.
pub(crate) const CLIENT: &str = "client";
/// Label, client role only: the server (`host:port` as configured) a series is
/// about, since a client may hold a session to several at once.
pub(crate) const SERVER: &str = "server";
/// The labels of a client-role tunnel series: its own name and its server.
pub(crate) const CLIENT_SERVER: &[&str] = &[CLIENT, SERVER];
/// `tunneld_tunnel_bytes_total`'s labels on the client role.
pub(crate) const CLIENT_SERVER_DIRECTION: &[&str] = &[CLIENT, SERVER, DIRECTION];

/// One metric family: what `/metrics` shows for it and the labels its series have.
pub(crate) struct Family {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    /// Values the HELP lists after `help` (`help: a, b, c.`), taken from the
    /// constant the code counts with so the text cannot fall behind it.
    listed: &'static [&'static str],
    /// A histogram's bucket bounds (empty for the other types).
    buckets: &'static [f64],
}

pub(crate) const MAPPING_BYTES: Family = Family::new(
    "tunneld_mapping_bytes_total",
    "Bytes forwarded for a mapping (sent: visitor to target, received: target to visitor).",
    &[PORT, PROTOCOL, DIRECTION],
);
pub(crate) const MAPPING_CONNECTIONS: Family = Family::new(
    "tunneld_mapping_connections_total",
    "Visitor connections admitted past the mapping's allow/deny lists, quota and limits (the others are in tunneld_mapping_refused_total).",
    &[PORT, PROTOCOL],
);
pub(crate) const MAPPING_ACTIVE: Family =
    Family::new("tunneld_mapping_active_connections", "Visitor connections open now.", &[PORT, PROTOCOL]);
pub(crate) const MAPPING_LAST_ACTIVITY: Family = Family::new(
    "tunneld_mapping_last_activity_timestamp_seconds",
    "Unix time bytes last moved on the mapping (0: never).",
    &[PORT, PROTOCOL],
);
pub(crate) const MAPPING_CONNECT_ERRORS: Family = Family::new(
    "tunneld_mapping_connect_errors_total",
    "Visitor connections that could not reach the target (connect failed, target unreachable from the client, or no tunnel client).",
    &[PORT, PROTOCOL],
);
pub(crate) const MAPPING_REFUSED: Family = Family::new(
    "tunneld_mapping_refused_total",
    "Visitors turned away before their target was dialed (not in connections_total, except no_descriptors after accept), by reason",
    &[PORT, PROTOCOL, REASON],
)
.listing(&refused_reason::ALL);
pub(crate) const MAPPING_RELAYED: Family = Family::new(
    "tunneld_mapping_relayed_connections_total",
    "Visitor connections by how their relay moves bytes, direct or through a tunnel (a series appears with its first connection)",
    &[PORT, PROTOCOL, "path"],
)
.listing(&relay_path::ALL);
pub(crate) const MAPPING_UP: Family =
    Family::new("tunneld_mapping_up", "1 while the mapping listens on its port; 0 while the port cannot be bound.", &[PORT, PROTOCOL]);
pub(crate) const MAPPING_INFO: Family = Family::new(
    "tunneld_mapping_info",
    "Always 1; labels describe the mapping (target, mode, client, the operator's description) for dashboards.",
    &[PORT, PROTOCOL, "target", "mode", CLIENT, "description"],
);
pub(crate) const MAPPING_HEALTH: Family = Family::new(
    "tunneld_mapping_health",
    "1 for the mapping's health now, 0 for the others (as the API's health field, judged over the last 5 minutes)",
    &[PORT, PROTOCOL, "health"],
)
.listing(&health_state::ALL);
pub(crate) const MAPPING_QUOTA_BYTES: Family = Family::new(
    "tunneld_mapping_quota_bytes",
    "The mapping's quota per period, both directions together (0: no quota).",
    &[PORT, PROTOCOL],
);
pub(crate) const MAPPING_QUOTA_USED: Family = Family::new(
    "tunneld_mapping_quota_used_ratio",
    "Share of the current period's quota used (1 = all of it; 0 without a quota).",
    &[PORT, PROTOCOL],
);
pub(crate) const MAPPING_DATAGRAMS: Family = Family::new(
    "tunneld_mapping_datagrams_total",
    "UDP datagrams forwarded for a mapping (sent: visitor to target, received: target to visitor).",
    &[PORT, PROTOCOL, DIRECTION],
);
pub(crate) const MAPPING_UDP_SESSIONS: Family = Family::new(
    "tunneld_mapping_udp_sessions",
    "UDP sessions (visitor addresses with their own socket toward the target) open now.",
    &[PORT, PROTOCOL],
);
pub(crate) const MAPPING_DROPPED_DATAGRAMS: Family = Family::new(
    "tunneld_mapping_dropped_datagrams_total",
    "UDP datagrams a mapping dropped instead of forwarding, by reason",
    &[PORT, PROTOCOL, REASON],
)
.listing(&dropped_reason::ALL);
pub(crate) const TUNNEL_BYTES: Family = Family::new(
    "tunneld_tunnel_bytes_total",
    "Bytes on the tunnel wire, control and data channels, framing included (sent: from this side).",
    &[CLIENT, DIRECTION],
);
pub(crate) const TUNNEL_LAST_ACTIVITY: Family = Family::new(
    "tunneld_tunnel_last_activity_timestamp_seconds",
    "Unix time bytes last crossed the client's tunnel (0: never).",
    &[CLIENT],
);
pub(crate) const TUNNEL_CONNECTED: Family = Family::new("tunneld_tunnel_connected", "1 while the client is authenticated.", &[CLIENT]);
pub(crate) const TUNNEL_CONNECTED_SINCE: Family = Family::new(
    "tunneld_tunnel_connected_since_timestamp_seconds",
    "Unix time the client's current tunnel session was authenticated (0: no session).",
    &[CLIENT],
);
pub(crate) const TUNNEL_SESSIONS: Family = Family::new("tunneld_tunnel_sessions_total", "Tunnel handshakes by outcome.", &["result"]);
pub(crate) const HISTORY_LAST_FLUSH: Family = Family::new(
    "tunneld_history_last_flush_timestamp_seconds",
    "Unix time the history recorder last wrote to the database (0: not yet).",
    &[],
);
pub(crate) const WEBHOOK_FAILURES: Family = Family::new(
    "tunneld_alert_webhook_failures_total",
    "Failed attempts to POST an event to alerts.webhook_url (each retry counts; a full queue counts too).",
    &[],
);
pub(crate) const CONNECTION_LOG_DROPPED: Family = Family::new(
    "tunneld_connection_log_dropped_total",
    "Ended connections not written to the connection log because its queue was full (forwarding never waits for the log).",
    &[],
);
pub(crate) const CLIENT_CONNECT_FAILURES: Family = Family::new(
    "tunneld_client_connect_failures_total",
    "Client only: failed attempts to connect to each server, by what each attempt ran into",
    &[SERVER, "reason"],
)
.listing(&connect_failure::ALL);
pub(crate) const CLIENT_LAST_CONNECT_ERROR: Family = Family::new(
    "tunneld_client_last_connect_error",
    "Client only: per server, 1 for why the latest attempt to connect to it failed, all 0 once connected; while the \
     server refuses this address unheard (throttled), the cause its last answered attempt failed for, if any",
    &[SERVER, "reason"],
)
.listing(&connect_failure::ALL);
/// Bucket bounds (seconds) for connect times and tunnel round trips: from a
/// loopback target (tens of microseconds) through a LAN (about a millisecond)
/// and a continent (10–50 ms) to another continent (150–300 ms), then the
/// seconds where only retransmitted SYNs and `connect_timeout` live. Steps of
/// 2–2.5× keep `histogram_quantile` within a factor of about two, with 16
/// buckets per series.
pub(crate) const LATENCY_BUCKETS: &[f64; 16] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Bucket bounds (seconds) for how long visitor connections last: a request
/// answered in milliseconds, a page load in seconds, an SSH session or a
/// database client for hours (the default idle timeout is 2 h), a tunnel kept
/// open for a day.
pub(crate) const CONNECTION_DURATION_BUCKETS: &[f64; 16] =
    &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0];

pub(crate) const MAPPING_CONNECT_DURATION: Family = Family::new(
    "tunneld_mapping_connect_duration_seconds",
    "From a visitor's accept to its target answering (through the tunnel: the request's way to the client, the client's dial and its answer).",
    &[PORT, PROTOCOL],
)
.with_buckets(LATENCY_BUCKETS);
pub(crate) const MAPPING_CONNECTION_DURATION: Family = Family::new(
    "tunneld_mapping_connection_duration_seconds",
    "How long admitted visitor connections lasted, from accept to close (those whose target failed too).",
    &[PORT, PROTOCOL],
)
.with_buckets(CONNECTION_DURATION_BUCKETS);
pub(crate) const MAPPING_CLIENT_CONNECTIONS: Family = Family::new(
    "tunneld_mapping_client_connections_total",
    "Visitor connections of a tunneled mapping by the client of its group that served them (the target was asked through it).",
    &[PORT, PROTOCOL, CLIENT],
);
pub(crate) const TUNNEL_RTT: Family = Family::new(
    "tunneld_tunnel_rtt_seconds",
    "Round trip of the tunnel's control channel, measured by each heartbeat and its echo (on both roles; none with a peer too old to echo).",
    &[CLIENT],
)
.with_buckets(LATENCY_BUCKETS);
pub(crate) const TUNNEL_RTT_LAST: Family = Family::new(
    "tunneld_tunnel_rtt_last_seconds",
    "The latest heartbeat round trip of the client's tunnel (0: none measured in this session).",
    &[CLIENT],
);
pub(crate) const TUNNEL_UDP_TRANSPORT: Family = Family::new(
    "tunneld_tunnel_udp_transport",
    "1 for how the client's tunnel carries UDP mappings' datagrams now: quic (QUIC datagrams on the tunnel port over UDP) or framed (framed on a data channel, where UDP to the server is blocked or the tunnel is plain); no series before the first UDP session or without a session.",
    &[CLIENT, "transport"],
);
pub(crate) const CLIENT_UDP_SESSIONS: Family = Family::new(
    "tunneld_client_udp_sessions",
    "Client only: tunneled UDP sessions open now, each with its own socket toward its target.",
    &[],
);
pub(crate) const BUILD_INFO: Family = Family::new("tunneld_build_info", "Always 1; the version label says which build runs.", &["version"]);

/// Every family, for the checks that the exposition and the docs show each one.
#[cfg(test)]
pub(crate) const ALL: [&Family; 33] = [
    &TUNNEL_UDP_TRANSPORT,
    &CLIENT_UDP_SESSIONS,
    &MAPPING_DATAGRAMS,
    &MAPPING_UDP_SESSIONS,
    &MAPPING_DROPPED_DATAGRAMS,
    &MAPPING_CONNECT_DURATION,
    &MAPPING_RELAYED,
    &MAPPING_CLIENT_CONNECTIONS,
    &MAPPING_CONNECTION_DURATION,
    &TUNNEL_RTT,
    &TUNNEL_RTT_LAST,
    &MAPPING_BYTES,
    &MAPPING_CONNECTIONS,
    &MAPPING_ACTIVE,
    &MAPPING_LAST_ACTIVITY,
    &MAPPING_CONNECT_ERRORS,
    &MAPPING_REFUSED,
    &MAPPING_UP,
    &MAPPING_INFO,
    &MAPPING_QUOTA_USED,
    &MAPPING_QUOTA_BYTES,
    &MAPPING_HEALTH,
    &TUNNEL_BYTES,
    &TUNNEL_LAST_ACTIVITY,
    &TUNNEL_CONNECTED,
    &TUNNEL_CONNECTED_SINCE,
    &TUNNEL_SESSIONS,
    &HISTORY_LAST_FLUSH,
    &WEBHOOK_FAILURES,
    &CONNECTION_LOG_DROPPED,
    &CLIENT_CONNECT_FAILURES,
    &CLIENT_LAST_CONNECT_ERROR,
    &BUILD_INFO,
];

impl Family {
    const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        Family { name, help, labels, listed: &[], buckets: &[] }
    }

    /// The same family with `values` listed in its HELP.
    const fn listing(self, values: &'static [&'static str]) -> Family {
        Family { listed: values, ..self }
    }

    /// The same family with other labels: a tunnel family as the client role
    /// exports it, with [`SERVER`] beside [`CLIENT`].
    pub(crate) const fn labelled(self, labels: &'static [&'static str]) -> Family {
        Family { labels, ..self }
    }

    /// The same family as a histogram with these bucket bounds.
    const fn with_buckets(self, buckets: &'static [f64]) -> Family {
        Family { buckets, ..self }
    }

    /// The family's name, as Prometheus shows it.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The HELP line's text.
    pub(crate) fn help(&self) -> String {
        match self.listed {
            [] => self.help.to_string(),
            values => format!("{}: {}.", self.help, values.join(", ")),
        }
    }

    fn opts(&self) -> Opts {
        Opts::new(self.name, self.help())
    }

    /// Registers `metric` as this family. Definitions are static, so a failure
    /// here is a bug caught by every test that builds [`super::Metrics`].
    fn register<M: Collector + Clone + 'static>(&self, registry: &Registry, metric: prometheus::Result<M>) -> M {
        let metric = metric.unwrap_or_else(|e| panic!("static metric definition {}: {e}", self.name));
        if let Err(e) = registry.register(Box::new(metric.clone())) {
            panic!("metric names are unique, but {} is not: {e}", self.name);
        }
        metric
    }

    pub(crate) fn int_counter_vec(&self, registry: &Registry) -> IntCounterVec {
        self.register(registry, IntCounterVec::new(self.opts(), self.labels))
    }

    pub(crate) fn int_gauge_vec(&self, registry: &Registry) -> IntGaugeVec {
        self.register(registry, IntGaugeVec::new(self.opts(), self.labels))
    }

    pub(crate) fn gauge_vec(&self, registry: &Registry) -> GaugeVec {
        self.register(registry, GaugeVec::new(self.opts(), self.labels))
    }

    pub(crate) fn histogram_vec(&self, registry: &Registry) -> HistogramVec {
        debug_assert!(!self.buckets.is_empty(), "{} has no buckets", self.name);
        let opts = HistogramOpts::new(self.name, self.help()).buckets(self.buckets.to_vec());
        self.register(registry, HistogramVec::new(opts, self.labels))
    }

    /// A family without labels: one gauge.
    pub(crate) fn gauge(&self, registry: &Registry) -> Gauge {
        debug_assert!(self.labels.is_empty(), "{} has labels", self.name);
        self.register(registry, Gauge::with_opts(self.opts()))
    }

    /// A family without labels: one integer gauge.
    pub(crate) fn int_gauge(&self, registry: &Registry) -> prometheus::IntGauge {
        debug_assert!(self.labels.is_empty(), "{} has labels", self.name);
        self.register(registry, prometheus::IntGauge::with_opts(self.opts()))
    }

    /// A family without labels: one counter.
    pub(crate) fn int_counter(&self, registry: &Registry) -> IntCounter {
        debug_assert!(self.labels.is_empty(), "{} has labels", self.name);
        self.register(registry, IntCounter::with_opts(self.opts()))
    }
}
