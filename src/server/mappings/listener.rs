//! The life of one mapping's listener: (re)bind until it has its port, then
//! accept, checking each visitor against the mapping's policy, its loop check,
//! its connection limit and the process's descriptor budget before any target
//! or tunnel work.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::context::Ctx;
use super::visitor::{serve_visitor, Admission};
use crate::core::protocol::{MappingKey, Protocol};
use crate::core::sync::lock;
use crate::net::socket;
use crate::server::connections::End;
use crate::store::MappingSpec;
use crate::telemetry::{refused_reason, MappingMetrics};

/// Descriptors one visitor holds: its own connection and the target's.
pub(super) const DIRECT_VISITOR_DESCRIPTORS: u32 = 2;
/// Tunneled: its own, the data channel's two (its socket and the second handle
/// on it that exchanges keep, see `exchange::relay`), and the fresh channel the
/// client opens to replace the one taken from the pool.
pub(super) const TUNNELED_VISITOR_DESCRIPTORS: u32 = 4;

/// What one visitor of `spec` costs from the process's descriptor budget.
pub(super) fn visitor_descriptors(spec: &MappingSpec) -> u32 {
    if spec.use_tunnel {
        TUNNELED_VISITOR_DESCRIPTORS
    } else {
        DIRECT_VISITOR_DESCRIPTORS
    }
}

/// How often a mapping that could not bind its port tries again.
const BIND_RETRY: Duration = Duration::from_secs(5);

pub(super) fn set(slot: &Mutex<Option<String>>, value: Option<String>) {
    *lock(slot) = value;
}

pub(super) fn describe_bind_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "port in use by another process".into(),
        _ => e.to_string(),
    }
}

/// A mapping's bound port: a TCP listener, or a UDP socket.
pub(crate) enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

pub(super) async fn bind(addr: IpAddr, key: MappingKey) -> std::io::Result<Bound> {
    let addr = SocketAddr::new(addr, key.port);
    match key.protocol {
        // Visitors are accepted tuned and armed (see `socket::listen_for_visitors`).
        Protocol::Tcp => socket::listen_for_visitors(addr).map(Bound::Tcp),
        Protocol::Udp => super::udp::bind(addr).map(Bound::Udp),
    }
}

/// The life of one mapping: (re)bind until it has its port, then accept until
/// removed or shut down.
pub(super) async fn run_mapping(
    ctx: Arc<Ctx>,
    spec: Arc<MappingSpec>,
    admission: Admission,
    listener: Option<Bound>,
    bind_error: Arc<Mutex<Option<String>>>,
    cancel: CancellationToken,
    metrics: MappingMetrics,
) {
    let port = spec.source_port;
    metrics.up.set(i64::from(listener.is_some()));
    let listener = match listener {
        Some(l) => l,
        None => loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ctx.stop_accepting.cancelled() => return,
                _ = tokio::time::sleep(BIND_RETRY) => {}
            }
            match bind(ctx.settings.bind_addr, spec.key()).await {
                Ok(l) => {
                    info!(port, "mapping port is free again; now listening");
                    set(&bind_error, None);
                    metrics.up.set(1);
                    break l;
                }
                Err(e) => {
                    debug!(port, error = %e, "mapping port still unavailable");
                    set(&bind_error, Some(describe_bind_error(&e)));
                }
            }
        },
    };
    let listener = match listener {
        Bound::Tcp(listener) => listener,
        Bound::Udp(socket) => return super::udp::serve(ctx, spec, admission, socket, cancel, metrics).await,
    };
    // Shared by every visitor's task: one reference count each.
    let admission = Arc::new(admission);
    let slots = Arc::new(Semaphore::new(ctx.settings.max_connections));
    let descriptors = visitor_descriptors(&spec);
    // A refused visitor, or one not yet served, is shown under the group's
    // first client (a mapping's one client). The name is shared by every
    // connection's entry: no allocation per visitor.
    let first_client = || admission.group.members().list.first().map(|m| m.name.clone());
    let refused = |peer: SocketAddr, reason: &'static str| ctx.live.refused(spec.key(), first_client().as_deref(), peer, reason);
    loop {
        let (visitor, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.stop_accepting.cancelled() => break,
            accepted = socket::accept(&listener, || metrics.refused_no_descriptors.inc()) => accepted,
        };
        // Armed from the start (the listener's options, inherited): however
        // this connection ends early, the visitor sees a reset, not an EOF
        // that looks like a complete answer.
        // Policy first, before any target or tunnel work: a refused visitor is
        // dropped here, armed, so it gets a reset at once.
        if !admission.policy.admits(peer.ip()) {
            metrics.refused_acl.inc();
            refused(peer, refused_reason::ACL);
            debug!(port, %peer, "visitor refused by the mapping's allow/deny lists");
            continue;
        }
        if admission.policy.quota_blocked() {
            metrics.refused_quota.inc();
            refused(peer, refused_reason::QUOTA);
            debug!(port, %peer, "visitor refused: the mapping's quota for this period is used up");
            continue;
        }
        if let Some((_, why)) = ctx.tunnel_loop(&spec, &admission.group.members(), &admission.resolved) {
            metrics.refused_loop.inc();
            refused(peer, refused_reason::LOOP);
            debug!(port, %peer, reason = %why, "visitor refused: the mapping would forward to itself");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused_connection_limit.inc();
            refused(peer, refused_reason::CONNECTION_LIMIT);
            debug!(port, %peer, limit = ctx.settings.max_connections, "visitor refused: mapping at its connection limit");
            continue;
        };
        // Shared by every mapping: however visitors come back around (a loop
        // through another host or relay), they stop here, and the descriptors
        // kept back stay free for the API, the tunnel and the store.
        let Some(held) = ctx.descriptors.try_take(descriptors) else {
            metrics.refused_process_limit.inc();
            refused(peer, refused_reason::PROCESS_LIMIT);
            let budget = ctx.descriptors.capacity();
            match ctx.descriptors.refused() {
                Some(not_logged) => warn!(
                    port,
                    %peer,
                    visitor_descriptors = budget,
                    refused_not_logged = not_logged,
                    "visitor refused: all mappings' visitors together hold the descriptors kept for them (a loop, or a flood?); further refusals are counted and logged at most every 10 s"
                ),
                None => debug!(port, %peer, visitor_descriptors = budget, "visitor refused: process-wide visitor bound reached"),
            }
            continue;
        };
        let ctx2 = ctx.clone();
        let spec = spec.clone();
        let metrics = metrics.clone();
        let admission = admission.clone();
        let cancel = cancel.clone();
        let tracked = ctx.live.open(spec.key(), first_client(), peer);
        ctx.connections.spawn(async move {
            let _slot = (slot, held);
            let end = tokio::select! {
                end = serve_visitor(&ctx2, &spec, &admission, &metrics, visitor, &tracked) => end,
                _ = tracked.close_requested() => {
                    debug!(port = spec.source_port, %peer, "connection reset: closed through the API");
                    End::ClosedByApi
                }
                _ = cancel.cancelled() => {
                    debug!(port = spec.source_port, %peer, "connection closed: mapping removed or daemon stopping");
                    // The mapping's token is a child of the daemon's abort.
                    if ctx2.abort.is_cancelled() { End::Shutdown } else { End::MappingRemoved }
                }
            };
            tracked.finish(end);
        });
    }
}
