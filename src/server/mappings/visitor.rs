//! What happens to one visitor once admitted: the target is dialed directly or
//! reached through the mapping's tunnel client, told who the visitor is when
//! the mapping asks for a PROXY header, and the bytes are relayed, counted and
//! capped until either side is done.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::context::Ctx;
use super::group::Group;
use super::health::HealthWindow;
use super::target::ResolvedHere;
use crate::net::relay::{self, Side};
use crate::net::socket;
use crate::policy::LivePolicy;
use crate::server::connections::{End, Tracked};
use crate::server::hub::OpenError;
use crate::store::MappingSpec;
use crate::telemetry::{refused_reason, relay_path, MappingMetrics, Meter, Visit};
use crate::tunnel::exchange::{self, ExchangeError};
use crate::tunnel::message::{Connect, ProxyHeader};

/// What each visitor of a mapping is checked against at accept, before any
/// target or tunnel work: its policy, and (tunneled) its target as resolved
/// here, for the loop check.
pub(super) struct Admission {
    pub(super) policy: Arc<LivePolicy>,
    pub(super) resolved: Arc<ResolvedHere>,
    /// Told why a visitor's target could not be reached.
    pub(super) health: Arc<HealthWindow>,
    /// Tunneled: the clients a visitor may go to.
    pub(super) group: Arc<Group>,
}

pub(super) async fn serve_visitor(
    ctx: &Ctx,
    spec: &MappingSpec,
    admission: &Admission,
    metrics: &MappingMetrics,
    visitor: TcpStream,
    tracked: &Tracked,
) -> End {
    let Admission { policy, health, group, .. } = admission;
    let port = spec.source_port;
    let peer = tracked.source();
    let visit = metrics.visitor_accepted();
    // The same meters as ever, tallying into this connection's entry too.
    let (up, down) = policy.capped(metrics.meters());
    let meters = (up.tallying(tracked.sent()), down.tallying(tracked.received()));
    // The address the visitor reached: this listener's, concrete even on a
    // wildcard bind. Without it no header can be written, and a target that
    // expects one must never get the visitor's bytes bare.
    let proxy_header = match policy.proxy_protocol().map(|version| (version, visitor.local_addr())) {
        None => None,
        Some((version, Ok(destination))) => Some(ProxyHeader { version, source: peer, destination }),
        Some((_, Err(e))) => {
            debug!(port, %peer, error = %e, "visitor dropped: its socket has no local address for the PROXY header");
            return End::VisitorReset;
        }
    };
    let result = if spec.use_tunnel {
        // The client writes the PROXY header after dialing the target.
        let connect = Connect::Connect { host: spec.target_host.clone(), port: spec.target_port, proxy_header };
        tunneled(ctx, group, metrics, meters, &visit, (&visitor, tracked), &connect).await
    } else {
        direct(ctx, spec, metrics, meters, &visit, &visitor, proxy_header).await
    };
    match result {
        Ok((sent, received)) => {
            debug!(port, %peer, sent, received, "connection finished");
            End::Closed
        }
        Err(VisitorError::NoDescriptors(e)) => {
            metrics.refused_no_descriptors.inc();
            debug!(port, %peer, error = %e, "visitor refused: out of file descriptors");
            End::Refused(refused_reason::NO_DESCRIPTORS)
        }
        Err(VisitorError::Target(e)) => {
            health.connect_failed(&e);
            metrics.connect_errors.inc();
            let target = format!("{}:{}", spec.target_host, spec.target_port);
            if ctx.first_refusal(port, TARGET_UNREACHABLE, &e) {
                warn!(port, %peer, %target, error = %e, "visitor refused: target unreachable; further refusals on this port are summarised once a minute");
            } else {
                debug!(port, %peer, %target, error = %e, "visitor refused: target unreachable");
            }
            End::TargetUnreachable(e)
        }
        Err(VisitorError::Ended(end, e)) => {
            debug!(port, %peer, error = %e, end = end.name(), "connection ended with error");
            end
        }
    }
}

/// The reason a summary of refused visitors names for targets that could not
/// be reached.
const TARGET_UNREACHABLE: &str = "target_unreachable";

/// Why a visitor's connection ended early: the target could not be reached
/// (counted as a connect error), or the relay failed midway (how, for the
/// connection log, and what was said).
enum VisitorError {
    Target(String),
    /// This process is out of descriptors: a local limit, counted as a refusal,
    /// not as the target's fault.
    NoDescriptors(std::io::Error),
    Ended(End, String),
}

/// How a direct relay's error ended the connection: the idle timeout, or a
/// reset from one side (the relay says which, see `relay::failed_side`).
fn relay_ended(e: std::io::Error) -> VisitorError {
    let end = match relay::failed_side(&e) {
        Some(Side::B) => End::TargetReset(None),
        Some(Side::A) => End::VisitorReset,
        None if e.kind() == std::io::ErrorKind::TimedOut => End::IdleTimeout,
        None => End::VisitorReset,
    };
    VisitorError::Ended(end, e.to_string())
}

/// Meters for (visitor → target, target → visitor).
type Meters = (Meter, Meter);

/// The PROXY header, when the mapping asks for one, goes to the target before
/// any of the visitor's bytes and outside the meters: it is not user traffic.
/// The bytes are then spliced in the kernel where it can (see
/// `net::splice`), and the mapping's metrics say which way they went.
async fn direct(
    ctx: &Ctx,
    spec: &MappingSpec,
    metrics: &MappingMetrics,
    (up, down): Meters,
    visit: &Visit,
    visitor: &TcpStream,
    proxy_header: Option<ProxyHeader>,
) -> Result<(u64, u64), VisitorError> {
    let mut target = socket::connect(&spec.target_host, spec.target_port, ctx.settings.connect_timeout).await.map_err(|e| {
        match socket::out_of_descriptors(&e) {
            true => VisitorError::NoDescriptors(e),
            false => VisitorError::Target(e.to_string()),
        }
    })?;
    if let Some(header) = proxy_header {
        target.write_all(&header.encode()).await.map_err(|e| VisitorError::Target(format!("writing the PROXY header: {e}")))?;
    }
    visit.target_answered();
    relay::arm(&target);
    let pipes = ctx.pipes.splicing().then_some(&ctx.pipes);
    metrics.relaying(if pipes.is_some() { relay_path::SPLICE } else { relay_path::COPY });
    relay::relay(visitor, &target, &up, &down, ctx.settings.idle_timeout, pipes).await.map_err(relay_ended)
}

/// The visitor's bytes start flowing to the client together with the `connect`
/// request instead of after its answer, which saves a round trip on every new
/// connection; the answer is read first in the other direction, and a failure
/// there ends the connection and counts as a connect error. After a clean
/// exchange the data channel goes back to the pool for the next visitor.
///
/// The client is the first of the group's candidates (see
/// `Group::candidates`) that takes the visitor. One whose session ended a
/// moment ago is passed over for the next before any of the visitor's bytes
/// were taken. While another candidate is left, the client's answer is heard
/// before the exchange starts (the visitor's bytes beyond the first chunk wait
/// for it in its socket): if the channel dies first — the client was killed
/// or its session lost just then — the visitor goes to the next client with
/// the same first chunk, instead of failing.
async fn tunneled(
    ctx: &Ctx,
    group: &Group,
    metrics: &MappingMetrics,
    (up, down): Meters,
    visit: &Visit,
    (visitor, tracked): (&TcpStream, &Tracked),
    connect: &Connect,
) -> Result<(u64, u64), VisitorError> {
    let port = tracked.port();
    // User bytes only: the tunnel's wire bytes are counted under the channel.
    // What the visitor sent travels with the request only as far as the cap
    // allows at once; the rest follows, paced, in the exchange.
    let early_max = up.allowance_now(exchange::MAX_CHUNK);
    let mut early = None;
    let mut last_error = OpenError::NoClient(format!("of the mapping on port {port}"));
    let mut taken = None;
    let candidates = group.candidates(&ctx.hub);
    for (i, member) in candidates.iter().enumerate() {
        let opened = ctx.hub.open(&member.name, connect, visitor, early_max, &mut early).await;
        let (mut channel, lease, sent_ahead) = match opened {
            Ok(opened) => opened,
            // Not connected, or too old to write the PROXY header this
            // mapping needs: the next member may serve.
            Err(e @ (OpenError::NoClient(_) | OpenError::NoProxyHeaders(_))) => {
                last_error = e;
                continue;
            }
            Err(e) => {
                last_error = e;
                break;
            }
        };
        if i + 1 == candidates.len() {
            taken = Some((member.clone(), channel, lease, sent_ahead, false));
            break;
        }
        let heard = tokio::select! {
            heard = exchange::hear_answer(&mut channel) => heard,
            _ = lease.revoked() => Err(format!("the tunnel session of client {} ended", member.name)),
        };
        match heard {
            Ok(Ok(())) => {
                taken = Some((member.clone(), channel, lease, sent_ahead, true));
                break;
            }
            Ok(Err(refused)) => {
                up.unused(early_max - sent_ahead);
                return Err(VisitorError::Target(refused));
            }
            Err(lost) => {
                debug!(port, client = %member.name, error = %lost, "the client was lost before it answered; the visitor goes to the next one");
                last_error = OpenError::NoClient(member.name.to_string());
            }
        }
    }
    let Some((member, channel, lease, sent_ahead, heard)) = taken else {
        up.unused(early_max);
        return Err(VisitorError::Target(last_error.to_string()));
    };
    let _serving = member.serve();
    tracked.served_by(&member.name);
    let client = &*member.name;
    up.unused(early_max - sent_ahead);
    // Visitor bytes sent ahead of the answer reach the target only if it
    // answers: they are counted then.
    let (up, reached_target) = up.held_behind(Meter::default());
    // The client's answer says its dial of the target succeeded: the connect time.
    let answer = if heard {
        visit.target_answered();
        reached_target.release();
        exchange::Answer::Heard { sent_ahead }
    } else {
        exchange::Answer::Expected { reached_target: &reached_target, sent_ahead, answered: visit }
    };
    // A plain channel's chunks are spliced where the kernel allows (this end's
    // path; the client chooses its own the same way).
    let pipes = exchange::splicing(&channel, &ctx.pipes);
    metrics.relaying(if pipes.is_some() { relay_path::SPLICE } else { relay_path::COPY });
    let relayed = tokio::select! {
        relayed = exchange::relay(channel, visitor, &up, &down, answer, ctx.settings.idle_timeout, pipes) => relayed,
        // A removed client's access ends with its exchanges, not when they
        // finish; a lost session's exchanges have nothing left to go through.
        _ = lease.revoked() => {
            let end = if lease.client_removed() { End::ClientRemoved } else { End::TargetReset(Some(format!("the tunnel session of client {client} ended"))) };
            return Err(VisitorError::Ended(end, format!("the tunnel session of client {client} ended")));
        }
    };
    match relayed {
        Ok((channel, sent, received)) => {
            lease.give_back(channel);
            Ok((sent, received))
        }
        Err(ExchangeError::Refused(e)) => Err(VisitorError::Target(e)),
        // The exchange's own idle timer, or the visitor's socket.
        Err(ExchangeError::Socket(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
            Err(VisitorError::Ended(End::IdleTimeout, e.to_string()))
        }
        Err(ExchangeError::Socket(e)) => Err(VisitorError::Ended(End::VisitorReset, e.to_string())),
        // The client's target reset, or the tunnel under it broke.
        Err(e @ (ExchangeError::PeerReset | ExchangeError::Channel(_))) => {
            Err(VisitorError::Ended(End::TargetReset(Some(e.to_string())), e.to_string()))
        }
    }
}
