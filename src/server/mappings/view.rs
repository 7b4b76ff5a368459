//! A mapping as the server shows it: where it forwards, its policy, its quota
//! use, and whether it is serving. The API turns it into its wire type.

use serde::{Deserialize, Serialize};

use crate::policy::Policy;
use crate::store::MappingSpec;

/// A mapping as `create` and `list` show it.
#[derive(Debug, Clone)]
pub struct MappingView {
    /// Where it forwards, as stored.
    pub spec: MappingSpec,
    /// Its policy now.
    pub policy: Policy,
    /// With a quota: bytes used in the current period.
    pub quota_used: Option<u64>,
    /// With a quota: whether new visitors are refused for it.
    pub quota_blocked: Option<bool>,
    /// Whether it is serving.
    pub status: MappingStatus,
}

/// Whether a mapping is serving, as the API shows it: `"active"`,
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
