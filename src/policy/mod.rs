//! Per-mapping policy: a description, a bandwidth cap, a traffic quota and
//! visitor allow/deny lists — what is stored, how the API's JSON is validated
//! into it, and the live state the forwarders consult ([`LivePolicy`]).
//!
//! The data path reads policy in two places only: once per visitor at accept
//! (ACL and quota block, under a short read lock), and once per chunk through
//! the mapping's [`Limiter`]s, which cost one relaxed atomic load when no cap is
//! set.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::core::rate::Limiter;
use crate::core::sync::{read, write};

mod acl;

pub use acl::Cidr;

/// The fields a policy has, as named in the API.
pub const FIELDS: [&str; 5] = ["description", "bandwidth_limit", "quota", "allow", "deny"];

/// Longest description accepted: a label, not a document.
const MAX_DESCRIPTION: usize = 500;
/// Most CIDR blocks in one list.
const MAX_CIDRS: usize = 256;

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
pub struct Quota {
    /// Allowance per period, both directions together.
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
    /// Applies the policy fields present in `body`: a value sets the field,
    /// `null` removes it, an absent field stays as it is. Fields other than the
    /// policy's are ignored (the route checks for unknown ones). The message of
    /// an error names the field.
    pub fn apply(&mut self, body: &Map<String, Value>) -> Result<(), String> {
        let mut next = self.clone();
        for (key, value) in body.iter().filter(|(k, _)| FIELDS.contains(&k.as_str())) {
            match (key.as_str(), value) {
                ("description", Value::Null) => next.description = None,
                ("description", Value::String(s)) if s.chars().count() <= MAX_DESCRIPTION && !s.chars().any(char::is_control) => {
                    next.description = Some(s.trim().to_string()).filter(|s| !s.is_empty())
                }
                ("description", _) => {
                    return Err(format!("`description` must be text of at most {MAX_DESCRIPTION} characters without control characters"))
                }
                ("bandwidth_limit", Value::Null) => next.bandwidth_limit = None,
                ("bandwidth_limit", Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => next.bandwidth_limit = n.as_u64(),
                ("bandwidth_limit", other) => {
                    return Err(format!("`bandwidth_limit` must be a positive whole number of bytes per second (got {other})"))
                }
                ("quota", Value::Null) => next.quota = None,
                ("quota", value) => next.quota = Some(parse_quota(value)?),
                ("allow", Value::Null) => next.allow.clear(),
                ("allow", value) => next.allow = parse_cidrs("allow", value)?,
                ("deny", Value::Null) => next.deny.clear(),
                ("deny", value) => next.deny = parse_cidrs("deny", value)?,
                _ => {}
            }
        }
        *self = next;
        Ok(())
    }

    /// Whether a visitor from `ip` may connect: not denied, and allowed when an
    /// allow list exists.
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.iter().any(|c| c.contains(ip)) && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }
}

fn parse_quota(value: &Value) -> Result<Quota, String> {
    const SHAPE: &str = "`quota` must be {\"bytes\": N, \"period\": \"day\"|\"month\", \"action\": \"alert\"|\"block\"}";
    let Value::Object(q) = value else { return Err(SHAPE.into()) };
    if let Some(unknown) = q.keys().find(|k| !["bytes", "period", "action"].contains(&k.as_str())) {
        return Err(format!("unknown field `quota.{unknown}` ({SHAPE})"));
    }
    let bytes = match q.get("bytes") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => n.as_u64().unwrap_or_default(),
        Some(other) => return Err(format!("`quota.bytes` must be a positive whole number (got {other})")),
        None => return Err(format!("missing field `quota.bytes` ({SHAPE})")),
    };
    let period = match q.get("period").and_then(Value::as_str) {
        Some("day") => QuotaPeriod::Day,
        Some("month") => QuotaPeriod::Month,
        _ => return Err(format!("`quota.period` must be \"day\" or \"month\" (got {})", q.get("period").unwrap_or(&Value::Null))),
    };
    let action = match q.get("action").and_then(Value::as_str) {
        Some("alert") => QuotaAction::Alert,
        Some("block") => QuotaAction::Block,
        _ => return Err(format!("`quota.action` must be \"alert\" or \"block\" (got {})", q.get("action").unwrap_or(&Value::Null))),
    };
    Ok(Quota { bytes, period, action })
}

fn parse_cidrs(field: &str, value: &Value) -> Result<Vec<Cidr>, String> {
    let Value::Array(items) = value else { return Err(format!("`{field}` must be a list of CIDR blocks like \"10.0.0.0/8\"")) };
    if items.len() > MAX_CIDRS {
        return Err(format!("`{field}` has more than {MAX_CIDRS} blocks"));
    }
    items
        .iter()
        .map(|item| match item.as_str().and_then(Cidr::parse) {
            Some(cidr) => Ok(cidr),
            None => Err(format!("`{field}`: {item} is not a CIDR block (like \"192.0.2.0/24\" or \"2001:db8::/32\")")),
        })
        .collect()
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

    fn apply(policy: &mut Policy, body: Value) -> Result<(), String> {
        policy.apply(body.as_object().unwrap())
    }

    #[test]
    fn deny_wins_and_empty_allow_is_everyone() {
        let mut p = Policy::default();
        assert!(p.admits("192.0.2.1".parse().unwrap()));
        apply(&mut p, json!({"allow": ["127.0.0.0/8"], "deny": ["127.0.0.3"]})).unwrap();
        assert!(p.admits("127.0.0.2".parse().unwrap()));
        assert!(!p.admits("127.0.0.3".parse().unwrap()));
        assert!(!p.admits("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn updates_keep_absent_fields_and_null_removes() {
        let mut p = Policy::default();
        apply(
            &mut p,
            json!({"description": "ssh", "bandwidth_limit": 1000, "quota": {"bytes": 10, "period": "month", "action": "block"}, "deny": ["::1"]}),
        )
        .unwrap();
        apply(&mut p, json!({"bandwidth_limit": null, "description": "office ssh"})).unwrap();
        assert_eq!(p.bandwidth_limit, None);
        assert_eq!(p.description.as_deref(), Some("office ssh"));
        assert_eq!(p.quota, Some(Quota { bytes: 10, period: QuotaPeriod::Month, action: QuotaAction::Block }));
        assert_eq!(p.deny.len(), 1);
        apply(&mut p, json!({"quota": null, "deny": null})).unwrap();
        assert_eq!(p.quota, None);
        assert!(p.deny.is_empty());
    }

    #[test]
    fn errors_name_the_field_and_change_nothing() {
        let mut p = Policy { bandwidth_limit: Some(5), ..Policy::default() };
        let cases = [
            (json!({"bandwidth_limit": 0}), "`bandwidth_limit`"),
            (json!({"bandwidth_limit": -3}), "`bandwidth_limit`"),
            (json!({"bandwidth_limit": 1.5}), "`bandwidth_limit`"),
            (json!({"allow": ["10.0.0.0/33"]}), "`allow`"),
            (json!({"deny": "10.0.0.0/8"}), "`deny`"),
            (json!({"quota": {"bytes": 1, "period": "week", "action": "block"}}), "`quota.period`"),
            (json!({"quota": {"bytes": 1, "period": "day", "action": "drop"}}), "`quota.action`"),
            (json!({"quota": {"bytes": 0, "period": "day", "action": "alert"}}), "`quota.bytes`"),
            (json!({"quota": {"bytes": 1, "period": "day", "action": "alert", "x": 1}}), "`quota.x`"),
            (json!({"description": 5}), "`description`"),
        ];
        for (body, field) in cases {
            // Valid fields next to the bad one are not applied either.
            let mut body = body.as_object().unwrap().clone();
            body.entry("bandwidth_limit").or_insert(json!(7));
            let err = apply(&mut p, body.into()).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
        assert_eq!(p.bandwidth_limit, Some(5), "a refused update changes nothing");
    }
}
