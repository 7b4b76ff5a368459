//! A mapping's policy as stored and shown: description, bandwidth cap, quota,
//! allow and deny lists, and the PROXY protocol header its targets expect.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::acl::Cidr;
use super::quota::Quota;
use crate::net::proxy_header::ProxyVersion;

/// What a mapping lets through, and how much.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// What the mapping is for, in the operator's words (at most 500 characters).
    pub description: Option<String>,
    /// Bytes per second per direction, shared by all of the mapping's connections.
    pub bandwidth_limit: Option<u64>,
    /// How much traffic per day or month, and what happens then.
    pub quota: Option<Quota>,
    /// Empty: everyone (unless denied).
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Wins over `allow`.
    #[serde(default)]
    pub deny: Vec<Cidr>,
    /// The PROXY protocol header each visitor's target receives before its
    /// bytes (absent from policies stored before it: none).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyVersion>,
}

impl Policy {
    /// Whether a visitor from `ip` may connect: not denied, and allowed when an
    /// allow list exists.
    pub fn admits(&self, ip: IpAddr) -> bool {
        !self.deny.iter().any(|c| c.contains(ip)) && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }
}
