//! Checks on a new mapping's target: a valid host, resolvable when the server
//! dials it, and never one of this daemon's own listeners.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::error::MappingError;

/// Bound on resolving a new mapping's `target_host`.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Host names and address literals are ASCII; anything else (bidi controls,
/// zero-width characters, homoglyphs) would only let a name display as
/// something it is not. International names go in their punycode form.
pub(super) fn check_host(host: &str) -> Result<(), MappingError> {
    if host.is_empty() {
        return Err(MappingError::Invalid("target_host must not be empty".into()));
    }
    if host.len() > 253 || !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%')) {
        return Err(MappingError::Invalid(format!(
            "target_host {host:?} is not a valid host name or address (letters, digits, `.-_:%` only; use punycode for international names)"
        )));
    }
    Ok(())
}

/// Why a direct target at `addrs` would be this daemon's own listener — the
/// new mapping's port, another mapping's, the API's or the tunnel's, on any
/// local address — or `None`. Dialing one makes each visitor a new visitor:
/// a chain that ends only when the descriptors do.
pub(super) fn own_listener(
    addrs: &[SocketAddr],
    source_port: u16,
    mapped: impl Fn(u16) -> bool,
    reserved: &[(u16, &'static str)],
) -> Option<String> {
    let addr = addrs.iter().find(|a| is_local_address(a.ip()))?;
    let port = addr.port();
    if port == source_port {
        return Some(format!("this mapping's own port on a local address ({})", addr.ip()));
    }
    if mapped(port) {
        return Some(format!("the mapping on port {port} (a local address)"));
    }
    let (_, owner) = reserved.iter().find(|(p, _)| *p == port)?;
    Some(format!("tunneld's own {owner} port"))
}

/// Whether `ip` is one of this host's own addresses (loopback, the wildcard, or
/// an interface address): an address this host can bind is one it answers on.
fn is_local_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

pub(super) async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, MappingError> {
    let unresolvable = |why: String| MappingError::Invalid(format!("target_host {host:?} cannot be resolved: {why}"));
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => match addrs.collect::<Vec<_>>() {
            addrs if addrs.is_empty() => Err(unresolvable("no addresses".into())),
            addrs => Ok(addrs),
        },
        Ok(Err(e)) => Err(unresolvable(e.to_string())),
        Err(_) => Err(unresolvable("lookup timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_are_the_ones_this_host_answers_on() {
        for local in ["127.0.0.1", "127.3.2.1", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1"] {
            assert!(is_local_address(local.parse().unwrap()), "{local}");
        }
        // TEST-NET-1 and documentation IPv6: never assigned to a real host.
        for remote in ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"] {
            assert!(!is_local_address(remote.parse().unwrap()), "{remote}");
        }
        // The host's own outward address, when it has one, is local too.
        let outward = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect("192.0.2.1:9").and_then(|_| s.local_addr()));
        if let Ok(addr) = outward {
            assert!(is_local_address(addr.ip()), "{addr}");
        }
    }
}
