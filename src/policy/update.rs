//! A change to a mapping's policy, as the API's create and update requests carry
//! it, and the rules each value must meet.
//!
//! The rules are checked while deserializing — each function here is the
//! `deserialize_with` of one request field — so an update that exists is a valid
//! one and applying it cannot fail halfway. The error messages say what was
//! expected and what came; the caller that knows where the value sat (the API's
//! body extractor) puts the field's name in front.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;

use super::acl::Cidr;
use super::model::Policy;
use super::quota::{Positive, Quota};
use crate::core::text::display_hazard;
use crate::net::proxy_header::ProxyVersion;

/// Longest description accepted: a label, not a document.
const MAX_DESCRIPTION: usize = 500;
/// Most CIDR blocks in one list.
const MAX_CIDRS: usize = 256;

/// What a request changes in a policy. Per field, `None` (absent from the
/// request) keeps the current value, `Some(None)` (`null`) removes it, and
/// `Some(Some(value))` sets it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyUpdate {
    /// Trimmed text; blank counts as `null`.
    pub description: Option<Option<String>>,
    /// Bytes per second per direction.
    pub bandwidth_limit: Option<Option<u64>>,
    /// The allowance per period and what happens when it is used up.
    pub quota: Option<Option<Quota>>,
    /// Visitor blocks let in (`null` or `[]`: everyone).
    pub allow: Option<Option<Vec<Cidr>>>,
    /// Visitor blocks refused (wins over `allow`).
    pub deny: Option<Option<Vec<Cidr>>>,
    /// The PROXY protocol header version targets receive.
    pub proxy_protocol: Option<Option<ProxyVersion>>,
}

impl PolicyUpdate {
    /// The update that makes any policy equal to `policy`: every field set (or
    /// removed), as a mapping declared in the config file is reconciled.
    pub fn to(policy: Policy) -> PolicyUpdate {
        let Policy { description, bandwidth_limit, quota, allow, deny, proxy_protocol } = policy;
        PolicyUpdate {
            description: Some(description),
            bandwidth_limit: Some(bandwidth_limit),
            quota: Some(quota),
            allow: Some(Some(allow)),
            deny: Some(Some(deny)),
            proxy_protocol: Some(proxy_protocol),
        }
    }
}

impl Policy {
    /// This policy with `update`'s fields set or removed and the others kept.
    /// Returns the names of the fields whose value changed: a field sent with
    /// the value it already has is not a change.
    pub fn apply(&mut self, update: PolicyUpdate) -> Vec<&'static str> {
        fn set<T: PartialEq>(field: &mut T, value: Option<T>, name: &'static str, changed: &mut Vec<&'static str>) {
            if let Some(value) = value.filter(|v| v != field) {
                *field = value;
                changed.push(name);
            }
        }
        let PolicyUpdate { description, bandwidth_limit, quota, allow, deny, proxy_protocol } = update;
        let mut changed = Vec::new();
        set(&mut self.description, description, "description", &mut changed);
        set(&mut self.bandwidth_limit, bandwidth_limit, "bandwidth_limit", &mut changed);
        set(&mut self.quota, quota, "quota", &mut changed);
        set(&mut self.allow, allow.map(Option::unwrap_or_default), "allow", &mut changed);
        set(&mut self.deny, deny.map(Option::unwrap_or_default), "deny", &mut changed);
        set(&mut self.proxy_protocol, proxy_protocol, "proxy_protocol", &mut changed);
        changed
    }
}

/// `description`: text of at most 500 characters without control, bidi or
/// line-separator characters (it ends up in logs, on terminals and on the page,
/// see [`display_hazard`]); stored trimmed, and blank removes it.
pub(crate) fn description<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    let Some(text) = Option::<String>::deserialize(d)? else { return Ok(Some(None)) };
    let expected = format!("text of at most {MAX_DESCRIPTION} characters without control, bidi or line-separator characters");
    if let Some((c, hazard)) = text.chars().find_map(|c| display_hazard(c).map(|h| (c, h))) {
        let found = format!("text with {hazard} (U+{:04X})", c as u32);
        return Err(de::Error::invalid_value(Unexpected::Other(&found), &expected.as_str()));
    }
    let length = text.chars().count();
    if length > MAX_DESCRIPTION {
        return Err(de::Error::invalid_value(Unexpected::Other(&format!("{length} characters")), &expected.as_str()));
    }
    Ok(Some(Some(text.trim().to_string()).filter(|t| !t.is_empty())))
}

/// `bandwidth_limit`: a positive whole number of bytes per second.
pub(crate) fn bandwidth_limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    d.deserialize_option(Nullable(Positive("a positive whole number of bytes per second"))).map(Some)
}

/// `quota`: an object with exactly `bytes`, `period` and `action`.
pub(crate) fn quota<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Quota>>, D::Error> {
    d.deserialize_option(Nullable(QuotaObject)).map(Some)
}

/// `allow` and `deny`: lists of at most 256 CIDR blocks.
pub(crate) fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Vec<Cidr>>>, D::Error> {
    d.deserialize_option(Nullable(CidrList)).map(Some)
}

/// `proxy_protocol`: `"v1"` or `"v2"`.
pub(crate) fn proxy_protocol<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<ProxyVersion>>, D::Error> {
    Option::<ProxyVersion>::deserialize(d).map(Some)
}

/// A visitor that also takes `null` (as `None`), for fields where `null` means
/// "remove". Everything else goes to the inner visitor.
struct Nullable<V>(V);

/// A visitor whose value is read with a `deserialize_*` call of its choosing.
trait ReadWith<'de>: Visitor<'de> + Sized {
    fn read<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error>;
}

impl<'de, V: ReadWith<'de>> Visitor<'de> for Nullable<V> {
    type Value = Option<V::Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.read(d).map(Some)
    }
}

impl<'de> ReadWith<'de> for Positive {
    fn read<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_u64(self)
    }
}

/// A quota, from an object only: the derived impl would also take the three
/// values as an array, which no one means.
struct QuotaObject;

impl<'de> Visitor<'de> for QuotaObject {
    type Value = Quota;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"an object {"bytes": N, "period": "day"|"month", "action": "alert"|"block"}"#)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Quota, A::Error> {
        Quota::deserialize(de::value::MapAccessDeserializer::new(map))
    }
}

impl<'de> ReadWith<'de> for QuotaObject {
    fn read<D: Deserializer<'de>>(self, d: D) -> Result<Quota, D::Error> {
        d.deserialize_map(self)
    }
}

/// A list of CIDR blocks, refused whole at the first bad one (named in the
/// message) or past [`MAX_CIDRS`].
struct CidrList;

impl<'de> Visitor<'de> for CidrList {
    type Value = Vec<Cidr>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"a list of CIDR blocks like "10.0.0.0/8""#)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Cidr>, A::Error> {
        let mut blocks = Vec::new();
        while let Some(text) = seq.next_element::<String>()? {
            if blocks.len() == MAX_CIDRS {
                return Err(de::Error::custom(format!("has more than {MAX_CIDRS} blocks")));
            }
            match Cidr::parse(&text) {
                Some(block) => blocks.push(block),
                None => return Err(de::Error::custom(format!(r#"{text:?} is not a CIDR block (like "192.0.2.0/24" or "2001:db8::/32")"#))),
            }
        }
        Ok(blocks)
    }
}

impl<'de> ReadWith<'de> for CidrList {
    fn read<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Cidr>, D::Error> {
        d.deserialize_seq(self)
    }
}
