//! What the tunnel port remembers about misbehaving sources and clients.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::core::failure_log::FailureLog;
use crate::server::throttle::{AuthThrottle, EndedSessions, FlapDetector, KnownSources};

/// Failures beyond a source's first are logged as one summary per this interval.
pub(super) const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What the tunnel port remembers about misbehaving sources and clients.
pub(super) struct Defences {
    pub(super) throttle: AuthThrottle,
    /// Addresses clients authenticated from lately: slots are kept for them.
    pub(super) known: KnownSources,
    /// Tokens of sessions that just ended: their late data channels are no guess.
    pub(super) ended: EndedSessions,
    pub(super) log: FailureLog<IpAddr>,
    /// Per client name: two processes with one name replacing each other.
    pub(super) flaps: HashMap<String, FlapDetector>,
}
