//! A mapping as the server shows it: where it forwards, its policy, its quota
//! use, and whether it is serving. The API turns it into its wire types.

use super::group::MemberView;
use super::health::MappingHealth;
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
    /// Whether it is doing its job, judged over the recent window, and why.
    pub health: MappingHealth,
    /// Tunneled: each client of its group, connected or not, and whether it
    /// takes new visitors now. Empty for a direct mapping.
    pub members: Vec<MemberView>,
}

/// Whether a mapping is serving (the API's wire form is
/// `api::contract::MappingStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingStatus {
    /// Listening, and (tunneled) its client is connected.
    Active,
    /// Listening, but no client that reaches the target is connected.
    WaitingForTunnel,
    /// The port cannot be bound (retried in the background); why.
    Error(String),
}
