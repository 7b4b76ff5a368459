//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, versions 1 and 2)
//! that tells a target who the visitor really is: written to the target before
//! any of the visitor's bytes, by whoever dials it (the server for a direct
//! mapping, the tunnel client for a tunneled one).
//!
//! Only what tunneld forwards is encoded: a TCP stream over IPv4 or IPv6 with
//! the `PROXY` command. The header is protocol, not user traffic: callers write
//! it outside the meters.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Which version of the header a target expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The human-readable line, `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary form, with its 12-byte signature.
    V2,
}

impl ProxyVersion {
    /// The wire name, as the API and the tunnel protocol write it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// The first twelve bytes of every version 2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command `PROXY` (the connection was relayed on behalf of another).
const V2_PROXY_COMMAND: u8 = 0x21;
/// Address family and transport: `AF_INET` or `AF_INET6`, `SOCK_STREAM`.
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// The header announcing a TCP connection from `source` (the visitor) to
/// `destination` (the address it connected to). IPv4-mapped IPv6 addresses are
/// written as the IPv4 addresses they are; when the two families still differ
/// (a visitor on IPv4 reaching a dual-stack listener by its IPv6 address),
/// both are written as IPv6, the IPv4 one mapped: a header has one family.
pub fn encode(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source_ip, destination_ip) = match (source.ip().to_canonical(), destination.ip().to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(as_v6(s)), IpAddr::V6(as_v6(d))),
    };
    let (source_port, destination_port) = (source.port(), destination.port());
    match version {
        ProxyVersion::V1 => {
            let family = if source_ip.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {source_ip} {destination_ip} {source_port} {destination_port}\r\n").into_bytes()
        }
        ProxyVersion::V2 => {
            let mut header = Vec::with_capacity(16 + 36);
            header.extend_from_slice(&V2_SIGNATURE);
            header.push(V2_PROXY_COMMAND);
            match (source_ip, destination_ip) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    header.push(V2_TCP4);
                    header.extend_from_slice(&12u16.to_be_bytes());
                    header.extend_from_slice(&s.octets());
                    header.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    header.push(V2_TCP6);
                    header.extend_from_slice(&36u16.to_be_bytes());
                    header.extend_from_slice(&as_v6(s).octets());
                    header.extend_from_slice(&as_v6(d).octets());
                }
            }
            header.extend_from_slice(&source_port.to_be_bytes());
            header.extend_from_slice(&destination_port.to_be_bytes());
            header
        }
    }
}

fn as_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn version_1_is_the_specifications_line() {
        // The examples of section 2.1 of proxy-protocol.txt.
        let header = encode(ProxyVersion::V1, addr("192.168.0.1:56324"), addr("192.168.0.11:443"));
        assert_eq!(header, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let worst = encode(ProxyVersion::V1, addr("255.255.255.255:65535"), addr("255.255.255.255:65535"));
        assert_eq!(worst, b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n");
        assert_eq!(worst.len(), 56, "the specification's longest TCP4 line");
        let worst6 = encode(
            ProxyVersion::V1,
            addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            addr("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        );
        assert_eq!(worst6.len(), 104, "the specification's longest TCP6 line");
        assert!(worst6.len() <= 107, "within the 107-byte limit");
        let six = encode(ProxyVersion::V1, addr("[2001:db8::1]:4000"), addr("[::1]:80"));
        assert_eq!(six, b"PROXY TCP6 2001:db8::1 ::1 4000 80\r\n");
    }

    #[test]
    fn version_2_is_the_specifications_binary_block() {
        let header = encode(ProxyVersion::V2, addr("192.168.0.1:56324"), addr("192.168.0.11:443"));
        let mut expected = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A".to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        expected.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 11]);
        expected.extend_from_slice(&[0xDC, 0x04, 0x01, 0xBB]);
        assert_eq!(header, expected);
        assert_eq!(header.len(), 16 + 12);

        let header = encode(ProxyVersion::V2, addr("[2001:db8::1]:4000"), addr("[::1]:80"));
        assert_eq!(&header[..12], &V2_SIGNATURE);
        assert_eq!(&header[12..16], &[0x21, 0x21, 0x00, 0x24]);
        let source: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(&header[16..32], &source.octets());
        assert_eq!(&header[32..48], &std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(&header[48..], &[0x0F, 0xA0, 0x00, 0x50]);
    }

    #[test]
    fn mapped_addresses_are_ipv4_and_mixed_families_are_ipv6() {
        let mapped = encode(ProxyVersion::V1, addr("[::ffff:127.0.0.2]:5000"), addr("[::ffff:127.0.0.1]:80"));
        assert_eq!(mapped, b"PROXY TCP4 127.0.0.2 127.0.0.1 5000 80\r\n");
        let mixed = encode(ProxyVersion::V1, addr("127.0.0.2:5000"), addr("[::1]:80"));
        assert_eq!(mixed, b"PROXY TCP6 ::ffff:127.0.0.2 ::1 5000 80\r\n");
        let mixed = encode(ProxyVersion::V2, addr("127.0.0.2:5000"), addr("[::1]:80"));
        assert_eq!(mixed[13], V2_TCP6);
        assert_eq!(mixed.len(), 16 + 36);
    }

    #[test]
    fn versions_are_written_as_the_api_names_them() {
        assert_eq!(serde_json::to_value(ProxyVersion::V1).unwrap(), serde_json::json!("v1"));
        assert_eq!(serde_json::from_value::<ProxyVersion>(serde_json::json!("v2")).unwrap(), ProxyVersion::V2);
        assert!(serde_json::from_value::<ProxyVersion>(serde_json::json!("v3")).is_err());
        assert_eq!(ProxyVersion::V2.as_str(), "v2");
    }
}
