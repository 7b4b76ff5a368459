//! Per-mapping policy: a description, a bandwidth cap, a traffic quota and
//! visitor allow/deny lists — what is stored, how a request changes it
//! ([`update`]), and the live state the forwarders consult ([`LivePolicy`]).
//!
//! The data path reads policy in two places only: once per visitor at accept
//! (ACL and quota block, under a short read lock), and once per chunk through
//! the mapping's [`Limiter`]s, which cost one relaxed atomic load when no cap is
//! set.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub mod update;

use serde::{Deserialize, Serialize};

use crate::core::rate::Limiter;
use crate::core::sync::{read, write};

mod acl;

pub use acl::Cidr;
pub use update::PolicyUpdate;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub description: Option<String>,
    /// Bytes per second per direction, shared by all of the mapping's connections.
    pub bandwidth_limit: Option<u64>,
    pub quota: Option<Quota>,
    /// Empty: everyone (unless denied).
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Wins over `allow`.
    #[serde(default)]
    pub deny: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Allowance per period, both directions together.
    #[serde(deserialize_with = "update::quota_bytes")]
    pub bytes: u64,
    pub period: QuotaPeriod,
    pub action: QuotaAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Day,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaAction {
    /// Events only.
    Alert,
    /// Events, and new visitors refused until the period rolls over.
    Block,
}

impl Policy {
    /// Whether a visitor from `ip` may connect: not denied, and allowed when an
    /// allow list exists.
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.iter().any(|c| c.contains(ip)) && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn blocks(texts: &[&str]) -> Option<Option<Vec<Cidr>>> {
        Some(Some(texts.iter().map(|t| Cidr::parse(t).unwrap()).collect()))
    }

    #[test]
    fn deny_wins_and_empty_allow_is_everyone() {
        let mut p = Policy::default();
        assert!(p.admits("192.0.2.1".parse().unwrap()));
        p.apply(PolicyUpdate { allow: blocks(&["127.0.0.0/8"]), deny: blocks(&["127.0.0.3"]), ..PolicyUpdate::default() });
        assert!(p.admits("127.0.0.2".parse().unwrap()));
        assert!(!p.admits("127.0.0.3".parse().unwrap()));
        assert!(!p.admits("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn updates_keep_absent_fields_and_null_removes() {
        let quota = Quota { bytes: 10, period: QuotaPeriod::Month, action: QuotaAction::Block };
        let mut p = Policy::default();
        p.apply(PolicyUpdate {
            description: Some(Some("ssh".into())),
            bandwidth_limit: Some(Some(1000)),
            quota: Some(Some(quota)),
            deny: blocks(&["::1"]),
            ..PolicyUpdate::default()
        });
        p.apply(PolicyUpdate { bandwidth_limit: Some(None), description: Some(Some("office ssh".into())), ..PolicyUpdate::default() });
        assert_eq!(p.bandwidth_limit, None);
        assert_eq!(p.description.as_deref(), Some("office ssh"));
        assert_eq!(p.quota, Some(quota));
        assert_eq!(p.deny.len(), 1);
        p.apply(PolicyUpdate { quota: Some(None), deny: Some(None), ..PolicyUpdate::default() });
        assert_eq!(p.quota, None);
        assert!(p.deny.is_empty());
        assert_eq!(p.description.as_deref(), Some("office ssh"), "absent fields stay");
        let before = p.clone();
        p.apply(PolicyUpdate::default());
        assert_eq!(p, before, "an empty update changes nothing");
    }

    #[test]
    fn values_are_read_null_as_removal_and_text_trimmed() {
        assert_eq!(update::description(json!("  office ssh ")).unwrap(), Some(Some("office ssh".into())));
        assert_eq!(update::description(json!("   ")).unwrap(), Some(None), "blank removes");
        assert_eq!(update::description(json!(null)).unwrap(), Some(None));
        assert_eq!(update::description(json!("é".repeat(500))).unwrap(), Some(Some("é".repeat(500))), "characters, not bytes");
        assert_eq!(update::bandwidth_limit(json!(1000)).unwrap(), Some(Some(1000)));
        assert_eq!(update::bandwidth_limit(json!(null)).unwrap(), Some(None));
        let quota = json!({"bytes": 10, "period": "day", "action": "alert"});
        assert_eq!(update::quota(quota).unwrap(), Some(Some(Quota { bytes: 10, period: QuotaPeriod::Day, action: QuotaAction::Alert })));
        assert_eq!(update::quota(json!(null)).unwrap(), Some(None));
        assert_eq!(update::cidrs(json!(["10.1.2.3/8", "::1"])).unwrap(), blocks(&["10.0.0.0/8", "::1/128"]));
        assert_eq!(update::cidrs(json!(null)).unwrap(), Some(None));
        assert_eq!(update::cidrs(json!([])).unwrap(), Some(Some(vec![])));
        let most: Vec<String> = (0..256).map(|i| format!("10.0.{i}.0/24")).collect();
        assert_eq!(update::cidrs(json!(most)).unwrap().flatten().map(|b| b.len()), Some(256));
    }

    #[test]
    fn bad_values_say_what_was_expected_and_what_came() {
        let error = |result: Result<Option<Option<u64>>, serde_json::Error>| result.unwrap_err().to_string();
        for bad in [json!(0), json!(-3), json!(1.5), json!("1000")] {
            let message = error(update::bandwidth_limit(bad.clone()));
            assert!(message.contains("a positive whole number of bytes per second"), "{bad}: {message}");
        }
        let message = update::description(json!("x".repeat(501))).unwrap_err().to_string();
        assert!(message.contains("at most 500 characters") && message.contains("501 characters"), "{message}");
        let message = update::description(json!("two\nlines")).unwrap_err().to_string();
        assert!(message.contains("control character"), "{message}");
        assert!(update::description(json!(5)).unwrap_err().to_string().contains("a string"));

        let quota = |q: serde_json::Value| update::quota(q).unwrap_err().to_string();
        for (bad, needle) in [
            (json!({"bytes": 1, "period": "week", "action": "block"}), "`week`"),
            (json!({"bytes": 1, "period": "day", "action": "drop"}), "`drop`"),
            (json!({"bytes": 0, "period": "day", "action": "alert"}), "a positive whole number of bytes"),
            (json!({"bytes": 1, "period": "day", "action": "alert", "x": 1}), "unknown field `x`"),
            (json!({"period": "day", "action": "alert"}), "missing field `bytes`"),
            (json!([1, "day", "alert"]), r#"an object {"bytes": N"#),
        ] {
            let message = quota(bad.clone());
            assert!(message.contains(needle), "{bad}: {message}");
        }

        let cidrs = |c: serde_json::Value| update::cidrs(c).unwrap_err().to_string();
        assert!(cidrs(json!(["10.0.0.0/8", "10.0.0.0/33"])).contains(r#""10.0.0.0/33" is not a CIDR block"#));
        assert!(cidrs(json!("10.0.0.0/8")).contains("a list of CIDR blocks"));
        assert!(cidrs(json!([7])).contains("a string"));
        let too_many: Vec<String> = (0..257).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
        assert!(cidrs(json!(too_many)).contains("more than 256 blocks"));
    }
}
