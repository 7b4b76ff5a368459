//! `GET /health`: for load balancers and service monitors, outside the envelope.

use serde::{Deserialize, Serialize};

/// Whether the daemon needs an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Nothing to act on.
    Ok,
    /// Running, with at least one problem listed in `reasons`.
    Degraded,
}

/// The `/health` answer (always 200 while the daemon runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: HealthStatus,
    /// One sentence per problem; `[]` when ok.
    pub reasons: Vec<String>,
    /// Always `true` on a server (it accepts tunnel clients).
    pub tunnel_enabled: bool,
    /// Whether any tunnel client is connected.
    pub tunnel_connected: bool,
}
