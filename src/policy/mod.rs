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

/// An address block, `10.0.0.0/8`, `2001:db8::/32`, or one address. IPv4-mapped
/// IPv6 visitors (`::ffff:10.1.2.3`, as a dual-stack listener sees them) match
/// IPv4 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            Some(_) => return None,
            None => max,
        };
        // Stored as the network address, so `10.1.2.3/8` lists as `10.0.0.0/8`.
        Some(Cidr { network: mask(addr, prefix), prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            IpAddr::V6((bits & m).into())
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(d)?;
        Cidr::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("invalid CIDR block {text:?}")))
    }
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
        self.policy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, policy: Policy) {
        let rate = policy.bandwidth_limit.unwrap_or(0);
        self.upload.set_rate(rate);
        self.download.set_rate(rate);
        if !policy.quota.is_some_and(|q| q.action == QuotaAction::Block) {
            self.quota_blocked.store(false, Ordering::Relaxed);
        }
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
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
        self.policy.read().unwrap_or_else(|p| p.into_inner()).admits(ip)
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
    fn cidrs_match_their_family_and_mapped_v4() {
        let net = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
        assert_eq!(Cidr::parse("::1").unwrap().to_string(), "::1/128");
        for bad in ["10.0.0.0/33", "10.0.0/8", "10.0.0.0/", "10.0.0.0/+8", "::/129", "example.com", ""] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
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
