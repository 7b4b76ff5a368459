//! A mapping's policy as the forwarders see it while it changes.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::model::Policy;
use super::quota::QuotaAction;
use crate::core::rate::Limiter;
use crate::core::sync::{read, write};
use crate::net::proxy_header::ProxyVersion;

/// A mapping's policy as the forwarders see it, changed in place by an update so
/// open connections follow it (their meters hold the same [`Limiter`]s).
pub struct LivePolicy {
    policy: RwLock<Policy>,
    /// Visitor→target and target→visitor caps.
    pub upload: Arc<Limiter>,
    pub download: Arc<Limiter>,
    /// Set while a blocking quota is used up for the current period.
    quota_blocked: AtomicBool,
    /// Bytes used in the current quota period (as of the last check).
    quota_used: AtomicU64,
}

impl LivePolicy {
    pub fn new(policy: Policy) -> Arc<LivePolicy> {
        let live = Arc::new(LivePolicy {
            policy: RwLock::new(Policy::default()),
            upload: Arc::new(Limiter::default()),
            download: Arc::new(Limiter::default()),
            quota_blocked: AtomicBool::new(false),
            quota_used: AtomicU64::new(0),
        });
        live.set(policy);
        live
    }

    pub fn get(&self) -> Policy {
        read(&self.policy).clone()
    }

    pub fn set(&self, policy: Policy) {
        let rate = policy.bandwidth_limit.unwrap_or(0);
        self.upload.set_rate(rate);
        self.download.set_rate(rate);
        if !policy.quota.is_some_and(|q| q.action == QuotaAction::Block) {
            self.quota_blocked.store(false, Ordering::Relaxed);
        }
        *write(&self.policy) = policy;
    }

    /// A connection's (visitor→target, target→visitor) meters, paced by this
    /// mapping's shared caps from now on, whatever they are changed to later.
    pub fn capped(
        &self,
        (up, down): (crate::telemetry::Meter, crate::telemetry::Meter),
    ) -> (crate::telemetry::Meter, crate::telemetry::Meter) {
        (up.limited_by(self.upload.clone()), down.limited_by(self.download.clone()))
    }

    /// The PROXY header version a new visitor's target receives, if any.
    pub fn proxy_protocol(&self) -> Option<ProxyVersion> {
        read(&self.policy).proxy_protocol
    }

    pub fn admits(&self, ip: IpAddr) -> bool {
        read(&self.policy).admits(ip)
    }

    pub fn quota_blocked(&self) -> bool {
        self.quota_blocked.load(Ordering::Relaxed)
    }

    pub fn set_quota_blocked(&self, blocked: bool) {
        self.quota_blocked.store(blocked, Ordering::Relaxed);
    }

    pub fn quota_used(&self) -> u64 {
        self.quota_used.load(Ordering::Relaxed)
    }

    pub fn set_quota_used(&self, bytes: u64) {
        self.quota_used.store(bytes, Ordering::Relaxed);
    }
}
