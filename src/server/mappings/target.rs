//! Checks on a mapping's target: a valid host, resolvable when the server
//! dials it, and never one of this daemon's own listeners — dialed directly,
//! or through a tunnel client on this host.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::context::Ctx;
use super::error::MappingError;
use super::group::Members;
use crate::core::sync::{lock, read};
use crate::net::socket::is_local_address;
use crate::store::MappingSpec;

/// Bound on resolving a new mapping's `target_host`.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on resolving a tunneled target here, which only matters should its
/// client run on this host; a name only the client's network knows fails fast
/// or times out without holding anything up for long.
const RESOLVE_HERE_TIMEOUT: Duration = Duration::from_secs(2);

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

/// A tunneled mapping's target as this host resolves it. A client on this host
/// dials the same addresses, so these are what the loop check compares with this
/// daemon's own listeners; empty when the name does not resolve here (then no
/// client on this host reaches it either).
#[derive(Default)]
pub(super) struct ResolvedHere(Mutex<Vec<SocketAddr>>);

impl ResolvedHere {
    pub(super) fn new(addrs: Vec<SocketAddr>) -> ResolvedHere {
        ResolvedHere(Mutex::new(addrs))
    }

    /// For `spec`: a literal target at once; a tunneled name looked up in the
    /// background, so a slow resolver holds nothing up (a restore, a create).
    pub(super) fn soon(spec: &MappingSpec) -> Arc<ResolvedHere> {
        let literal = literal(&spec.target_host, spec.target_port);
        let resolved = Arc::new(ResolvedHere::new(literal.into_iter().collect()));
        if spec.use_tunnel && literal.is_none() {
            let (slot, host, port) = (resolved.clone(), spec.target_host.clone(), spec.target_port);
            tokio::spawn(async move { *lock(&slot.0) = resolve_here(&host, port).await });
        }
        resolved
    }
}

/// `host:port` as this host resolves it, at once for an address literal; empty
/// when it does not resolve (in time).
pub(super) async fn resolve_here(host: &str, port: u16) -> Vec<SocketAddr> {
    if let Some(addr) = literal(host, port) {
        return vec![addr];
    }
    match tokio::time::timeout(RESOLVE_HERE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => addrs.collect(),
        _ => Vec::new(),
    }
}

/// The address literal `host:port`, if `host` is one: known without a lookup.
fn literal(host: &str, port: u16) -> Option<SocketAddr> {
    host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, port))
}

/// Why the tunneled mapping `spec` would forward to itself through a client
/// connected from this host at `client_peer` — its target (`addrs`, resolved
/// here) is one of this daemon's listeners, as [`own_listener`] tells — or `None`.
pub(super) fn through_client_on_this_host(
    addrs: &[SocketAddr],
    spec_port: u16,
    client: &str,
    client_peer: SocketAddr,
    mapped: impl Fn(u16) -> bool,
    reserved: &[(u16, &'static str)],
) -> Option<String> {
    let why = own_listener(addrs, spec_port, mapped, reserved)?;
    Some(format!("{why}, and its client {client:?} is connected from this host ({})", client_peer.ip()))
}

impl Ctx {
    /// Why the tunneled mapping `spec` refuses every visitor now — each of its
    /// connected clients is on this host and its target is one of this
    /// daemon's own listeners — with the first such client, or `None`. Cheap
    /// (no lookup): checked for every visitor.
    pub(super) fn tunnel_loop(&self, spec: &MappingSpec, members: &Members, resolved: &ResolvedHere) -> Option<(Arc<str>, String)> {
        if !spec.use_tunnel {
            return None;
        }
        let mut looping = None;
        for member in members.list.iter().filter(|m| self.hub.connected(&m.name)) {
            match self.loop_through(&member.name, spec, resolved) {
                Some(why) => {
                    looping.get_or_insert((member.name.clone(), why));
                }
                // One client that does not loop serves the visitors.
                None => return None,
            }
        }
        looping
    }

    /// Why `spec`'s visitors would come back to this daemon through `client`, if so.
    fn loop_through(&self, client: &str, spec: &MappingSpec, resolved: &ResolvedHere) -> Option<String> {
        let peer = self.hub.peer_on_this_host(client)?;
        let addrs = lock(&resolved.0);
        let mapped = read(&self.mapped_ports);
        let why = through_client_on_this_host(
            &addrs,
            spec.source_port,
            client,
            peer,
            |port| mapped.contains(&crate::core::protocol::MappingKey { port, protocol: spec.protocol }),
            &self.settings.reserved_ports,
        )?;
        Some(format!("target {}:{} is {why}: the mapping would forward to itself", spec.target_host, spec.target_port))
    }
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
    fn a_client_on_this_host_makes_a_local_target_a_loop() {
        let client = "127.0.0.1:40000".parse().unwrap();
        let own: Vec<SocketAddr> = vec!["127.0.0.1:5000".parse().unwrap()];
        let why = through_client_on_this_host(&own, 5000, "default", client, |_| false, &[]).expect("its own port");
        assert!(why.contains("own port") && why.contains("\"default\"") && why.contains("this host (127.0.0.1)"), "{why}");
        let other: Vec<SocketAddr> = vec!["127.0.0.1:6000".parse().unwrap()];
        assert!(through_client_on_this_host(&other, 5000, "default", client, |p| p == 6000, &[]).is_some(), "another mapping");
        assert!(through_client_on_this_host(&other, 5000, "default", client, |_| false, &[]).is_none(), "an outside target");
        let remote: Vec<SocketAddr> = vec!["192.0.2.1:5000".parse().unwrap()];
        assert!(through_client_on_this_host(&remote, 5000, "default", client, |_| true, &[]).is_none(), "another host");
    }

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
