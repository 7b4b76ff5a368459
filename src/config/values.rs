//! Checks on single values that the configuration and the tools share: tokens,
//! loopback addresses, fingerprints, origins, `host:port`.

use std::net::IpAddr;

/// Shortest API token accepted: long enough that guessing it online is hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// The most data channels a client may keep open ahead of need (`client.pool_size`).
pub const MAX_POOL_SIZE: usize = 256;

/// Whether `ip` is loopback, counting IPv4-mapped IPv6 (`::ffff:127.0.0.1`) too.
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Normalizes a fingerprint as an operator may paste it (`sha256:` prefix optional,
/// colons allowed, any case); `None` when it is not 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let hexpart = text.trim();
    let hexpart = hexpart.strip_prefix("sha256:").or_else(|| hexpart.strip_prefix("SHA256:")).unwrap_or(hexpart);
    let digits: String = hexpart.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    (digits.len() == 64 && digits.chars().all(|c| c.is_ascii_hexdigit())).then(|| format!("sha256:{digits}"))
}

/// What a TLS client without a pin or a CA is told (config validation uses it too).
pub const NO_TRUST_ANCHOR: &str = "TLS is on but the client has no way to verify the server: set client.server_fingerprint \
     (flag --fingerprint) to the output of `tunneld fingerprint` on the server (the server also logs it at start), \
     or set client.tls_ca (and client.tls_server_name) to trust a CA; client.tls = false only on a trusted network";

/// `scheme://host[:port]` with nothing after it, as browsers send in `Origin`.
pub(super) fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains(['/', '?', '#', ' '])
}

/// Splits `host:port` (IPv6 as `[::1]:9000`); `None` when malformed.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port: u16 = port.parse().ok()?;
    (!host.is_empty() && port != 0).then_some((host, port))
}

/// Where a process on this host reaches a listener bound to `listen`: a
/// wildcard address (`0.0.0.0`, `::`) is reached on loopback.
pub fn reachable_here(mut listen: std::net::SocketAddr) -> std::net::SocketAddr {
    if listen.ip().is_unspecified() {
        listen.set_ip(if listen.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    listen
}
