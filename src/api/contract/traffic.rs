//! `GET /api/stats/traffic` and each event of `/api/stats/stream`: every number
//! read from the Prometheus registry at one moment.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::{Client, MappingHealth, MappingStatus};
use crate::policy::{Cidr, Quota};

/// The tunnel as one: wire bytes summed over clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunnelTraffic {
    /// Wire bytes server → clients since the daemon started (framing and TLS included).
    pub bytes_sent: u64,
    /// Wire bytes clients → server since the daemon started.
    pub bytes_received: u64,
    /// When tunnel bytes last moved (Unix seconds), or `null`.
    pub last_update: Option<f64>,
    /// Whether any client is connected.
    pub connected: bool,
    /// Since when the longest-connected client is (Unix seconds), or `null`.
    pub connected_since: Option<f64>,
}

impl From<crate::telemetry::ClientTraffic> for TunnelTraffic {
    fn from(t: crate::telemetry::ClientTraffic) -> TunnelTraffic {
        TunnelTraffic {
            bytes_sent: t.bytes_sent,
            bytes_received: t.bytes_received,
            last_update: t.last_update,
            connected: t.connected,
            connected_since: t.connected_since,
        }
    }
}

/// A UDP mapping's own numbers, besides the bytes every mapping has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UdpTraffic {
    /// Datagrams forwarded visitor → target since the daemon started.
    pub datagrams_sent: u64,
    /// Datagrams forwarded target → visitor.
    pub datagrams_received: u64,
    /// Sessions (visitor addresses) open now.
    pub sessions: u64,
    /// Datagrams dropped, by reason (`queue_full`, `too_large`, `session_limit`, `no_tunnel`).
    pub dropped: std::collections::BTreeMap<String, u64>,
}

/// One mapping's traffic, with its settings so a page needs no second call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MappingTraffic {
    /// The mapping's `source_port`.
    pub port: u16,
    /// `tcp` or `udp`: with the port, which mapping this is.
    #[serde(default)]
    pub protocol: crate::core::protocol::Protocol,
    /// A UDP mapping's datagram and session numbers; absent for TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpTraffic>,
    /// Visitor → target bytes since the daemon started.
    pub bytes_sent: u64,
    /// Target → visitor bytes since the daemon started.
    pub bytes_received: u64,
    /// Visitor → target bytes since the mapping was first created, across restarts.
    pub lifetime_sent: u64,
    /// Target → visitor bytes since the mapping was first created.
    pub lifetime_received: u64,
    /// When bytes last moved (Unix seconds), or `null`.
    pub last_update: Option<f64>,
    /// Visitor connections open now.
    pub active_connections: u64,
    /// Visitor connections accepted since the daemon started.
    pub connections_total: u64,
    /// Visitors whose target could not be reached, since the daemon started.
    pub connect_errors: u64,
    /// Visitors refused since the daemon started, by reason (`acl`, `quota`,
    /// `connection_limit`, `no_descriptors`, `process_limit`, `loop`; every
    /// reason present, 0 when none), as `tunneld_mapping_refused_total`.
    #[serde(default)]
    pub refused: BTreeMap<String, u64>,
    /// Median time from accept to the target answering (through the tunnel:
    /// including the client's dial), in seconds, over the last 1,024 connects
    /// of the last 15 minutes (exact over those, nearest rank); `null` without
    /// any. Read as `None` from a server older than it.
    #[serde(default)]
    pub connect_p50_seconds: Option<f64>,
    /// The 99th percentile of the same connect times.
    #[serde(default)]
    pub connect_p99_seconds: Option<f64>,
    /// Where visitors are forwarded.
    pub target_host: String,
    /// The target's port.
    pub target_port: u16,
    /// Through a tunnel client rather than directly.
    pub use_tunnel: bool,
    /// The client that reaches the target; `null` for a direct mapping.
    pub client: Option<String>,
    /// Every client of its group, in order, as in `/api/mapping/list`.
    #[serde(default)]
    pub clients: Vec<String>,
    /// How the group's visitors are shared; `null` for a direct mapping.
    #[serde(default)]
    pub balance: Option<crate::policy::Balance>,
    /// Each client of the group now, as in `/api/mapping/list`.
    #[serde(default)]
    pub members: Vec<super::MappingClient>,
    /// Whether it is serving.
    pub status: MappingStatus,
    /// Whether it is doing its job, judged over the last 5 minutes (always
    /// written; read as `None` from a server older than health).
    #[serde(default)]
    pub health: Option<MappingHealth>,
    /// Why, in words.
    #[serde(default)]
    pub health_reason: String,
    /// The operator's label, or `null`.
    pub description: Option<String>,
    /// Bytes per second per direction, or `null`.
    pub bandwidth_limit: Option<u64>,
    /// The traffic quota, or `null`.
    pub quota: Option<Quota>,
    /// Bytes used in the quota's current period; `null` (here always written)
    /// without a quota.
    pub quota_used: Option<u64>,
    /// Whether the quota refuses new visitors now; `null` without a quota.
    pub quota_blocked: Option<bool>,
    /// Visitor blocks let in.
    pub allow: Vec<Cidr>,
    /// Visitor blocks refused.
    pub deny: Vec<Cidr>,
    /// The PROXY protocol header targets receive (`"v1"`, `"v2"`), or `null`
    /// (read as `null` from a server older than it).
    #[serde(default)]
    pub proxy_protocol: Option<crate::net::proxy_header::ProxyVersion>,
    /// `"config"` (declared in the config file) or `"api"`, as in `/api/mapping/list`.
    #[serde(default)]
    pub source: super::Source,
}

/// The whole traffic report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrafficReport {
    /// The tunnel's wire bytes, all clients together.
    pub tunnel: TunnelTraffic,
    /// Each client, as in `/api/client/list`.
    pub clients: Vec<Client>,
    /// Each mapping, by port.
    pub mappings: Vec<MappingTraffic>,
    /// `bytes_sent` summed over mappings: every user byte forwarded.
    pub total_sent: u64,
    /// `bytes_received` summed over mappings.
    pub total_received: u64,
    /// `lifetime_sent` summed over the current mappings.
    pub lifetime_sent: u64,
    /// `lifetime_received` summed over the current mappings.
    pub lifetime_received: u64,
    /// When the daemon started (Unix seconds).
    pub started_at: f64,
    /// When these numbers were read (Unix seconds).
    pub timestamp: f64,
    /// `mappings.len()`.
    pub mapping_count: usize,
    /// Visitor connections open now, over all mappings.
    pub active_connections: u64,
}
