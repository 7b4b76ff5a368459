//! Per-mapping policy: a description, a bandwidth cap, a traffic quota,
//! visitor allow/deny lists and the PROXY protocol header for targets — what
//! is stored, how a request changes it ([`update`]), and the live state the
//! forwarders consult ([`LivePolicy`]).
//!
//! The data path reads policy in two places only: once per visitor at accept
//! (ACL and quota block, under a short read lock), and once per chunk through
//! the mapping's [`Limiter`](crate::core::rate::Limiter)s, which cost one relaxed atomic load when no cap is
//! set.
//!
//! May import `core`, `telemetry` (the meters a cap paces) and `net` (the
//! PROXY header's versions).

mod acl;
mod group;
mod live;
mod model;
mod quota;
pub(crate) mod update;

pub use acl::Cidr;
pub use group::{invalid_group, Balance, HealthCheck};
pub(crate) use live::LivePolicy;
pub use model::Policy;
pub use quota::{Quota, QuotaAction, QuotaPeriod};
pub use update::PolicyUpdate;

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
        assert!(p.apply(PolicyUpdate::default()).is_empty());
        assert_eq!(p, before, "an empty update changes nothing");
        let same = PolicyUpdate {
            description: Some(Some("office ssh".into())),
            quota: Some(None),
            allow: Some(Some(vec![])),
            ..PolicyUpdate::default()
        };
        assert!(p.apply(same).is_empty(), "values as they are are no change");
        let some =
            PolicyUpdate { description: Some(None), bandwidth_limit: Some(None), deny: Some(Some(vec![])), ..PolicyUpdate::default() };
        assert_eq!(p.apply(some), ["description"]);
    }

    #[test]
    fn proxy_protocol_is_set_changed_and_removed_like_the_other_fields() {
        use crate::net::proxy_header::ProxyVersion;
        let mut p = Policy::default();
        assert_eq!(update::proxy_protocol(json!("v1")).unwrap(), Some(Some(ProxyVersion::V1)));
        assert_eq!(update::proxy_protocol(json!(null)).unwrap(), Some(None));
        let message = update::proxy_protocol(json!("v3")).unwrap_err().to_string();
        assert!(message.contains("`v3`") && message.contains("`v1`"), "{message}");
        assert_eq!(p.apply(PolicyUpdate { proxy_protocol: Some(Some(ProxyVersion::V1)), ..PolicyUpdate::default() }), ["proxy_protocol"]);
        assert!(p.apply(PolicyUpdate { proxy_protocol: Some(Some(ProxyVersion::V1)), ..PolicyUpdate::default() }).is_empty());
        assert!(p.apply(PolicyUpdate { description: Some(Some("x".into())), ..PolicyUpdate::default() }) == ["description"]);
        assert_eq!(p.proxy_protocol, Some(ProxyVersion::V1), "absent keeps it");
        p.apply(PolicyUpdate { proxy_protocol: Some(None), ..PolicyUpdate::default() });
        assert_eq!(p.proxy_protocol, None, "null removes it");
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
        for hidden in ["a\u{202E}b", "a\u{2066}b", "a\u{2028}b", "a\u{2029}b"] {
            let message = update::description(json!(hidden)).unwrap_err().to_string();
            assert!(message.contains("bidi") || message.contains("line separator"), "{hidden:?}: {message}");
        }
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
