//! The address blocks of a mapping's `allow` and `deny` lists.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An address block, `10.0.0.0/8`, `2001:db8::/32`, or one address. IPv4-mapped
/// IPv6 visitors (`::ffff:10.1.2.3`, as a dual-stack listener sees them) match
/// IPv4 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    /// A block in CIDR notation, or one address (a /32 or a /128). Host bits are
    /// dropped, so `10.1.2.3/8` is kept, and listed, as `10.0.0.0/8`.
    ///
    /// The address goes through std's parser, not `IpNet`'s: ipnet reads
    /// `010.0.0.1` as 10.0.0.1, while other tools read a leading zero as octal
    /// (8.0.0.1), and an access list must not guess which one was meant.
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().ok()?;
        let net = match prefix {
            None => IpNet::from(addr),
            // Digits only: `u8`'s parser would take `+8` too.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => IpNet::new(addr, p.parse().ok()?).ok()?,
            Some(_) => return None,
        };
        Some(Cidr(canonical(net).trunc()))
    }

    /// Whether `ip` is in the block; an IPv4-mapped IPv6 address counts as the
    /// IPv4 address it carries, any other address of the other family never is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

/// An IPv4-mapped block (`::ffff:127.0.0.1`, `::ffff:10.0.0.0/104`) as the IPv4
/// block it stands for. Visitors are compared in their canonical form, so a
/// mapped block kept as IPv6 would never match anyone: a deny entry would fail
/// open. Blocks wider than the mapped range (`::/64`) stay IPv6.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// As its text, `"10.0.0.0/8"`.
impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// From its text, by [`Cidr::parse`]: a bare address or host bits are accepted
/// here as they are from the API.
impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(d)?;
        Cidr::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("invalid CIDR block {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mapped = Cidr::parse("::ffff:127.0.0.1").unwrap();
        assert_eq!(mapped.to_string(), "127.0.0.1/32");
        assert!(mapped.contains("127.0.0.1".parse().unwrap()));
        assert!(mapped.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("::ffff:10.9.0.0/104").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::parse("::ffff:0:0/96").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(Cidr::parse("::/64").unwrap().to_string(), "::/64");
        for bad in ["10.0.0.0/33", "10.0.0/8", "10.0.0.0/", "10.0.0.0/+8", "::/129", "example.com", "", "010.0.0.0/8", "10.0.0.0/8 "] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn serde_uses_the_normalised_text() {
        let cidrs: Vec<Cidr> = serde_json::from_str(r#"["10.1.2.3/8", "::1", "192.0.2.7"]"#).unwrap();
        assert_eq!(serde_json::to_string(&cidrs).unwrap(), r#"["10.0.0.0/8","::1/128","192.0.2.7/32"]"#);
        assert!(serde_json::from_str::<Cidr>(r#""10.0.0.0/33""#).is_err());
    }
}
