//! `/api/mapping/*`: create, update, remove and list mappings.

use serde::{Deserialize, Serialize};

use super::fields;
use crate::core::protocol::{MappingKey, Protocol};
use crate::net::proxy_header::ProxyVersion;
use crate::policy::{update, Balance, Cidr, HealthCheck, Policy, PolicyUpdate, Quota};
use crate::server::mappings::{GroupUpdate, MappingView, MemberView, NewMapping};
pub use crate::store::Source;

/// `POST /api/mapping/create`. Besides where to forward, it may carry the
/// policy fields of [`UpdateMapping`] (here `null` and absent both mean "none").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMapping {
    /// The port visitors connect to on the server.
    #[serde(deserialize_with = "fields::port")]
    pub source_port: u16,
    /// `tcp` (absent: the default) or `udp`; with the port, what identifies the mapping.
    // Left out for TCP: a request to a server from before UDP stays valid.
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
    /// Where they are forwarded: a host name or an address literal.
    pub target_host: String,
    /// The target's port.
    #[serde(deserialize_with = "fields::port")]
    pub target_port: u16,
    /// Through a tunnel client rather than directly (absent or `null`: `false`).
    #[serde(default, deserialize_with = "fields::null_as_default")]
    pub use_tunnel: bool,
    /// The tunnel client that reaches the target (tunneled only; default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// A group of tunnel clients that reach the target, instead of `client`
    /// (tunneled only; not empty, no name twice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<String>>,
    /// How the group's visitors are shared: `failover` (default, in list
    /// order), `round_robin`, `least_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// `{interval_secs, timeout_secs}`: the target is dialed through each
    /// client of the group that often; one that fails gets no visitors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// See [`UpdateMapping::description`].
    #[serde(default, deserialize_with = "update::description", skip_serializing_if = "Option::is_none")]
    pub description: Option<Option<String>>,
    /// See [`UpdateMapping::bandwidth_limit`].
    #[serde(default, deserialize_with = "update::bandwidth_limit", skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<Option<u64>>,
    /// See [`UpdateMapping::quota`].
    #[serde(default, deserialize_with = "update::quota", skip_serializing_if = "Option::is_none")]
    pub quota: Option<Option<Quota>>,
    /// See [`UpdateMapping::allow`].
    #[serde(default, deserialize_with = "update::cidrs", skip_serializing_if = "Option::is_none")]
    pub allow: Option<Option<Vec<Cidr>>>,
    /// See [`UpdateMapping::deny`].
    #[serde(default, deserialize_with = "update::cidrs", skip_serializing_if = "Option::is_none")]
    pub deny: Option<Option<Vec<Cidr>>>,
    /// See [`UpdateMapping::proxy_protocol`].
    #[serde(default, deserialize_with = "update::proxy_protocol", skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<Option<ProxyVersion>>,
}

impl CreateMapping {
    /// What the server is asked to set up.
    pub(crate) fn into_new_mapping(self) -> NewMapping {
        let CreateMapping {
            source_port,
            protocol,
            target_host,
            target_port,
            use_tunnel,
            client,
            clients,
            balance,
            health_check,
            description,
            bandwidth_limit,
            quota,
            allow,
            deny,
            proxy_protocol,
        } = self;
        let mut policy = Policy::default();
        policy.apply(PolicyUpdate { description, bandwidth_limit, quota, allow, deny, proxy_protocol });
        NewMapping { source_port, protocol, target_host, target_port, use_tunnel, client, clients, balance, health_check, policy }
    }
}

/// `POST /api/mapping/update`: a mapping's policy, changed live. Per policy
/// field: absent keeps it, `null` removes it, a value sets it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateMapping {
    /// The mapping's `source_port`.
    #[serde(deserialize_with = "fields::port")]
    pub port: u16,
    /// The mapping's protocol (absent: `tcp`).
    // Left out for TCP: a request to a server from before UDP stays valid.
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
    /// A label: at most 500 characters, no control, bidi or line-separator
    /// characters; blank removes it.
    #[serde(default, deserialize_with = "update::description", skip_serializing_if = "Option::is_none")]
    pub description: Option<Option<String>>,
    /// Bytes per second per direction, shared by the mapping's connections.
    #[serde(default, deserialize_with = "update::bandwidth_limit", skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<Option<u64>>,
    /// `{bytes, period: "day"|"month", action: "alert"|"block"}`.
    #[serde(default, deserialize_with = "update::quota", skip_serializing_if = "Option::is_none")]
    pub quota: Option<Option<Quota>>,
    /// Visitor address blocks let in (at most 256; empty: everyone).
    #[serde(default, deserialize_with = "update::cidrs", skip_serializing_if = "Option::is_none")]
    pub allow: Option<Option<Vec<Cidr>>>,
    /// Visitor address blocks refused; wins over `allow` (at most 256).
    #[serde(default, deserialize_with = "update::cidrs", skip_serializing_if = "Option::is_none")]
    pub deny: Option<Option<Vec<Cidr>>>,
    /// `"v1"` or `"v2"`: each target receives a PROXY protocol header with the
    /// visitor's address before its bytes (new visitors from now on).
    #[serde(default, deserialize_with = "update::proxy_protocol", skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<Option<ProxyVersion>>,
    /// Tunneled: the clients of its group, replaced (`client` becomes the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<String>>,
    /// Tunneled: how the group's visitors are shared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    /// Tunneled: the group's health check; `null` removes it.
    #[serde(default, deserialize_with = "fields::nullable", skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Option<HealthCheck>>,
}

impl UpdateMapping {
    /// The mapping's key, the change to its policy and the change to its group.
    pub(crate) fn into_parts(self) -> (MappingKey, PolicyUpdate, GroupUpdate) {
        let UpdateMapping {
            port,
            protocol,
            description,
            bandwidth_limit,
            quota,
            allow,
            deny,
            proxy_protocol,
            clients,
            balance,
            health_check,
        } = self;
        (
            MappingKey { port, protocol },
            PolicyUpdate { description, bandwidth_limit, quota, allow, deny, proxy_protocol },
            GroupUpdate { clients, balance, health_check },
        )
    }
}

/// `POST /api/mapping/remove`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveMapping {
    /// The mapping's `source_port`.
    #[serde(deserialize_with = "fields::port")]
    pub port: u16,
    /// The mapping's protocol (absent: `tcp`, so calls made before UDP keep working).
    // Left out for TCP: a request to a server from before UDP stays valid.
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

/// A mapping, wherever one is shown: `create`'s and `update`'s `data`, each
/// element of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// The port visitors connect to.
    pub source_port: u16,
    /// `tcp` or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Where visitors are forwarded.
    pub target_host: String,
    /// The target's port.
    pub target_port: u16,
    /// Through a tunnel client rather than directly.
    pub use_tunnel: bool,
    /// The client that reaches the target; `null` for a direct mapping. With
    /// a group, its first client.
    pub client: Option<String>,
    /// Every client of its group, in order (`[client]` for one); `[]` for a
    /// direct mapping.
    #[serde(default)]
    pub clients: Vec<String>,
    /// How the group's visitors are shared; `null` for a direct mapping.
    #[serde(default)]
    pub balance: Option<Balance>,
    /// The group's health check, or `null`.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Each client of the group now: connected, taking new visitors, serving
    /// how many connections, failing its health check. `[]` for a direct mapping.
    #[serde(default)]
    pub members: Vec<MappingClient>,
    /// When it was created (Unix seconds).
    pub created_at: i64,
    /// The operator's label, or `null`.
    pub description: Option<String>,
    /// Bytes per second per direction, or `null` (no cap).
    pub bandwidth_limit: Option<u64>,
    /// The traffic quota, or `null`.
    pub quota: Option<Quota>,
    /// Visitor blocks let in (`[]`: everyone not denied).
    pub allow: Vec<Cidr>,
    /// Visitor blocks refused.
    pub deny: Vec<Cidr>,
    /// The PROXY protocol header targets receive (`"v1"`, `"v2"`), or `null`
    /// (read as `null` from a server older than it).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyVersion>,
    /// With a quota only: bytes used in the current period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_used: Option<u64>,
    /// With a quota only: whether new visitors are refused until the period ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_blocked: Option<bool>,
    /// Whether it is serving.
    pub status: MappingStatus,
    /// Whether it is doing its job, judged over the last 5 minutes (always
    /// written; read as `None` from a server older than health).
    #[serde(default)]
    pub health: Option<MappingHealth>,
    /// Why, in words.
    #[serde(default)]
    pub health_reason: String,
    /// `"config"`: declared in the server's config file (`[[mappings]]`), which
    /// the API may not change or remove; `"api"`: made through the API. Read
    /// as `"api"` from a server older than declarations.
    #[serde(default)]
    pub source: Source,
}

/// One client of a mapping's group, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingClient {
    /// The client's name.
    pub client: String,
    /// Its session is up.
    pub connected: bool,
    /// New visitors may go to it now (connected, passing its health check;
    /// with `failover`, the first such client only).
    pub serving: bool,
    /// The mapping's connections open through it now.
    pub active_connections: usize,
    /// While its health check fails: why; else `null`.
    pub check_error: Option<String>,
}

impl From<MemberView> for MappingClient {
    fn from(m: MemberView) -> MappingClient {
        MappingClient {
            client: m.client,
            connected: m.connected,
            serving: m.serving,
            active_connections: m.active_connections,
            check_error: m.check_error,
        }
    }
}

impl From<MappingView> for Mapping {
    fn from(view: MappingView) -> Mapping {
        let MappingView { spec, policy, quota_used, quota_blocked, status, health, members } = view;
        Mapping {
            source_port: spec.source_port,
            protocol: spec.protocol,
            target_host: spec.target_host,
            target_port: spec.target_port,
            use_tunnel: spec.use_tunnel,
            client: spec.client,
            balance: spec.use_tunnel.then_some(spec.balance),
            clients: spec.clients,
            health_check: spec.health_check,
            members: members.into_iter().map(MappingClient::from).collect(),
            created_at: spec.created_at,
            description: policy.description,
            bandwidth_limit: policy.bandwidth_limit,
            quota: policy.quota,
            allow: policy.allow,
            deny: policy.deny,
            proxy_protocol: policy.proxy_protocol,
            quota_used,
            quota_blocked,
            status: status.into(),
            health: Some(health.health.into()),
            health_reason: health.reason,
            source: spec.source,
        }
    }
}

/// A mapping's health on the wire: what an operator should look at, besides
/// whether it listens (`status`). Judged over the last 5 minutes of its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MappingHealth {
    /// Nothing to act on.
    Ok,
    /// At least half of the recent visitors could not reach the target.
    TargetFailing,
    /// Its quota is used up and blocks new visitors.
    Blocked,
    /// At least half of the recent visitors were refused (allow/deny lists,
    /// limits), or it refuses every visitor (a loop).
    Refusing,
    /// Tunneled, and its client is not connected.
    WaitingForTunnel,
    /// Its port cannot be bound.
    Down,
}

impl MappingHealth {
    /// The wire form, as `ctl` prints it.
    pub fn as_str(self) -> &'static str {
        crate::server::mappings::Health::from(self).as_str()
    }
}

impl From<crate::server::mappings::Health> for MappingHealth {
    fn from(health: crate::server::mappings::Health) -> MappingHealth {
        use crate::server::mappings::Health as Server;
        match health {
            Server::Ok => MappingHealth::Ok,
            Server::TargetFailing => MappingHealth::TargetFailing,
            Server::Blocked => MappingHealth::Blocked,
            Server::Refusing => MappingHealth::Refusing,
            Server::WaitingForTunnel => MappingHealth::WaitingForTunnel,
            Server::Down => MappingHealth::Down,
        }
    }
}

impl From<MappingHealth> for crate::server::mappings::Health {
    fn from(health: MappingHealth) -> crate::server::mappings::Health {
        use crate::server::mappings::Health as Server;
        match health {
            MappingHealth::Ok => Server::Ok,
            MappingHealth::TargetFailing => Server::TargetFailing,
            MappingHealth::Blocked => Server::Blocked,
            MappingHealth::Refusing => Server::Refusing,
            MappingHealth::WaitingForTunnel => Server::WaitingForTunnel,
            MappingHealth::Down => Server::Down,
        }
    }
}

/// `GET /api/mapping/list`: every mapping, by port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingList {
    /// Always an array, empty when there are none.
    pub mappings: Vec<Mapping>,
    /// `mappings.len()`.
    pub count: usize,
}

/// `POST /api/mapping/remove`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingRemoved {
    /// The port that is free again.
    pub port: u16,
    /// The removed mapping's protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Whether a mapping is serving, on the wire: `"active"`,
/// `"waiting_for_tunnel"`, or `"error: <why>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingStatus {
    /// Listening, and (tunneled) its client is connected.
    Active,
    /// Listening, but the client that reaches the target is not connected.
    WaitingForTunnel,
    /// The port cannot be bound (retried in the background); why.
    Error(String),
}

impl From<crate::server::mappings::MappingStatus> for MappingStatus {
    fn from(status: crate::server::mappings::MappingStatus) -> MappingStatus {
        use crate::server::mappings::MappingStatus as Server;
        match status {
            Server::Active => MappingStatus::Active,
            Server::WaitingForTunnel => MappingStatus::WaitingForTunnel,
            Server::Error(why) => MappingStatus::Error(why),
        }
    }
}

impl std::fmt::Display for MappingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            MappingStatus::Active => f.write_str("active"),
            MappingStatus::WaitingForTunnel => f.write_str("waiting_for_tunnel"),
            MappingStatus::Error(why) => write!(f, "error: {why}"),
        }
    }
}

impl std::str::FromStr for MappingStatus {
    type Err = String;

    fn from_str(text: &str) -> Result<MappingStatus, String> {
        match text {
            "active" => Ok(MappingStatus::Active),
            "waiting_for_tunnel" => Ok(MappingStatus::WaitingForTunnel),
            _ => match text.strip_prefix("error: ") {
                Some(why) => Ok(MappingStatus::Error(why.to_string())),
                None => Err(format!("unknown mapping status {text:?}")),
            },
        }
    }
}

impl Serialize for MappingStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MappingStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MappingStatus, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_written_and_read_as_the_strings_the_api_has_always_shown() {
        for (status, text) in [
            (MappingStatus::Active, "active"),
            (MappingStatus::WaitingForTunnel, "waiting_for_tunnel"),
            (MappingStatus::Error("port in use by another process".into()), "error: port in use by another process"),
        ] {
            assert_eq!(serde_json::to_value(&status).unwrap(), serde_json::json!(text));
            assert_eq!(serde_json::from_value::<MappingStatus>(serde_json::json!(text)).unwrap(), status);
        }
        assert!(serde_json::from_value::<MappingStatus>(serde_json::json!("sleeping")).is_err());
    }

    #[test]
    fn healths_are_written_as_their_label_values() {
        use crate::server::mappings::Health;
        for health in [Health::Ok, Health::TargetFailing, Health::Blocked, Health::Refusing, Health::WaitingForTunnel, Health::Down] {
            let wire = MappingHealth::from(health);
            assert_eq!(serde_json::to_value(wire).unwrap(), serde_json::json!(health.as_str()));
            assert_eq!(wire.as_str(), health.as_str());
        }
    }
}
