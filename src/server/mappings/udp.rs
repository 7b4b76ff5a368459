//! A direct UDP mapping: datagrams stay datagrams.
//!
//! Each visitor address is a *session*: its own socket toward the target,
//! connected, so the target's replies come back on it and go to that visitor
//! alone. A session ends after `server.udp_session_idle_secs` without a
//! datagram either way, when closed through the API, or when the mapping goes.
//!
//! What a datagram from anywhere can cost is bounded before anything is
//! allocated for it: it is checked against the allow/deny lists and the quota,
//! a new address needs one of `server.max_udp_sessions_per_mapping` session
//! slots and a descriptor from the process's budget, and what waits to be sent
//! is bounded per session (datagrams) and per mapping (bytes). Whatever does
//! not fit is dropped whole and counted in
//! `tunneld_mapping_dropped_datagrams_total{reason}`; nothing is truncated.
//!
//! Counting is the TCP mapping's: `tunneld_mapping_bytes_total` (payload bytes
//! that reached the other side), the session as a connection (its own counters,
//! `/api/connections`, the connection log), plus the datagram counters.
//!
//! Datagrams that come in bursts move in batches: the mapping's socket is read
//! with `recvmmsg` (up to `net::udp::BATCH` a call), each session is woken
//! once for its share of a batch and sends what it has queued in one call (a
//! GSO train or `sendmmsg`); a wake-up and a call per datagram were most of
//! what a direct datagram cost (bench/README.md, "Direct UDP in batches").
//!
//! A tunneled mapping differs in one thing only, where a session's datagrams
//! go ([`Target`]): instead of a socket of its own, a session of the mapping's
//! client, through its tunnel's datagram link (`hub::udp`); the client holds
//! the socket toward the target. Everything else (the table of sessions, the
//! checks, the caps, the queues, the counting, the idle end) is this file's,
//! for both. A datagram for a tunneled mapping whose clients are all away is
//! dropped and counted (`no_tunnel`) before any session is opened for it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::context::Ctx;
use super::group::{Group, Serving};
use super::health::HealthWindow;
use super::target::ResolvedHere;
use super::visitor::Admission;
use crate::core::sync::lock;
use crate::net;
use crate::policy::LivePolicy;
use crate::server::connections::{End, Tracked};
use crate::server::hub::{TunnelUdpSession, UdpOpenError};
use crate::store::MappingSpec;
use crate::telemetry::{MappingMetrics, Meter, UdpMetrics};
use crate::tunnel::datagram::SendError;

/// Datagrams one session may have waiting for its target: a burst beyond what
/// the target socket takes at once, while the session's task is off the CPU
/// (256 lost tens of thousands of datagrams of an iperf3 run on a busy
/// machine). More are dropped (`queue_full`); memory stays bounded by
/// [`MAPPING_QUEUED_BYTES`] whatever the count.
const SESSION_QUEUE: usize = 2048;

/// Payload bytes all sessions of one mapping may have waiting for their
/// targets together, so a flood of large datagrams cannot grow memory with the
/// number of sessions.
const MAPPING_QUEUED_BYTES: usize = 4 << 20;

/// Binds a UDP mapping's port, with large buffers: every visitor's datagrams
/// converge on it.
pub(super) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    UdpSocket::from_std(net::udp::bind_buffered(addr)?)
}

/// One visitor address's way to its session's task.
struct SessionHandle {
    /// Distinguishes this session from a later one of the same address.
    id: u64,
    queue: mpsc::Sender<Vec<u8>>,
}

/// What every session of a mapping shares.
struct Shared {
    ctx: Arc<Ctx>,
    spec: Arc<MappingSpec>,
    policy: Arc<LivePolicy>,
    health: Arc<HealthWindow>,
    /// Tunneled: the clients a session may go through.
    group: Arc<Group>,
    /// Tunneled: the target as this host resolves it, for the loop check.
    resolved: Arc<ResolvedHere>,
    metrics: MappingMetrics,
    /// The mapping's own socket: what visitors send to, and replies leave from.
    listener: Arc<UdpSocket>,
    sessions: Mutex<HashMap<SocketAddr, SessionHandle>>,
    /// Payload bytes queued toward targets, all sessions together.
    queued: AtomicUsize,
    cancel: CancellationToken,
    /// The sessions' tasks, so the mapping's end waits for them: they hold its
    /// socket, and the port must be free again when a removal returns.
    tasks: TaskTracker,
}

/// Serves a bound UDP mapping until it is removed or the daemon stops.
pub(super) async fn serve(
    ctx: Arc<Ctx>,
    spec: Arc<MappingSpec>,
    admission: Admission,
    socket: UdpSocket,
    cancel: CancellationToken,
    metrics: MappingMetrics,
) {
    let port = spec.source_port;
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        spec,
        policy: admission.policy,
        health: admission.health,
        group: admission.group,
        resolved: admission.resolved,
        metrics,
        listener: Arc::new(socket),
        sessions: Mutex::new(HashMap::new()),
        queued: AtomicUsize::new(0),
        cancel: cancel.clone(),
        tasks: TaskTracker::new(),
    });
    let max = ctx.settings.max_udp_datagram;
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.stop_accepting.cancelled() => break,
            ready = shared.listener.readable() => if let Err(e) = ready {
                debug!(port, error = %e, "UDP socket not readable");
                continue;
            },
        }
        // Everything waiting, a batch per call: one wake-up of this task and
        // one system call for up to `BATCH` datagrams, and each session's task
        // woken once for all of its datagrams in the batch.
        let read = net::udp::receive_batch(&shared.listener, max, |(datagram, peer)| {
            shared.admit(peer, datagram, &mut next_id);
        });
        match read {
            // A full batch: more are likely waiting. Let the sessions just
            // woken (on this worker, next) send theirs before reading on, so
            // a batch goes out in one call (GSO or `sendmmsg`) rather than piling up.
            Ok(n) if n == net::udp::BATCH => tokio::task::yield_now().await,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // ICMP errors reported on the unconnected socket, and the like:
            // nothing to do for one datagram, keep serving.
            Err(e) => debug!(port, error = %e, "UDP receive failed"),
        }
    }
    // Sessions end with the mapping (their queues close; on removal their
    // tasks see the same token), and hold its socket until they have.
    lock(&shared.sessions).clear();
    shared.tasks.close();
    shared.tasks.wait().await;
}

impl Shared {
    /// Checks one datagram from `peer` (`None`: it was too large) against the
    /// mapping's limits and policy, and queues it for `peer`'s session.
    fn admit(self: &Arc<Self>, peer: SocketAddr, datagram: Option<&[u8]>, next_id: &mut u64) {
        let Some(datagram) = datagram else {
            self.metrics.udp.dropped_too_large.inc();
            debug!(port = self.spec.source_port, %peer, limit = self.ctx.settings.max_udp_datagram, "datagram dropped: larger than server.max_udp_datagram_bytes");
            return;
        };
        if !self.policy.admits(peer.ip()) {
            self.metrics.refused_acl.inc();
            return;
        }
        if self.policy.quota_blocked() {
            self.metrics.refused_quota.inc();
            return;
        }
        self.forward(peer, datagram, next_id);
    }

    /// Queues one admitted datagram for `peer`'s session, opening it if needed.
    fn forward(self: &Arc<Self>, peer: SocketAddr, datagram: &[u8], next_id: &mut u64) {
        let port = self.spec.source_port;
        if self.queued.load(Ordering::Relaxed) + datagram.len() > MAPPING_QUEUED_BYTES {
            self.metrics.udp.dropped_queue_full.inc();
            return;
        }
        let mut sessions = lock(&self.sessions);
        if self.spec.use_tunnel && !sessions.contains_key(&peer) {
            if !self.tunnel_available() {
                self.metrics.udp.dropped_no_tunnel.inc();
                debug!(port, %peer, "datagram dropped: no client of the mapping is connected");
                return;
            }
            // As a TCP visitor: a client on this host whose target is this
            // daemon's own port would send the datagram round again.
            if let Some((_, why)) = self.ctx.tunnel_loop(&self.spec, &self.group.members(), &self.resolved) {
                self.metrics.refused_loop.inc();
                debug!(port, %peer, reason = %why, "datagram dropped: the mapping would forward to itself");
                return;
            }
        }
        if let Some(session) = sessions.get(&peer) {
            match session.queue.try_send(datagram.to_vec()) {
                Ok(()) => {
                    self.queued.fetch_add(datagram.len(), Ordering::Relaxed);
                    return;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics.udp.dropped_queue_full.inc();
                    return;
                }
                // Its task ended a moment ago: a new session takes its place.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    sessions.remove(&peer);
                }
            }
        }
        if sessions.len() >= self.ctx.settings.max_udp_sessions {
            self.metrics.udp.dropped_session_limit.inc();
            debug!(port, %peer, limit = self.ctx.settings.max_udp_sessions, "datagram dropped: mapping at its UDP session limit");
            return;
        }
        // One descriptor per direct session (the client holds a tunneled
        // one's), from the budget every mapping's visitors share.
        let Some(held) = self.ctx.descriptors.try_take(u32::from(!self.spec.use_tunnel)) else {
            self.metrics.refused_process_limit.inc();
            debug!(port, %peer, "datagram dropped: all mappings' visitors hold the descriptors kept for them");
            return;
        };
        let (queue, receiver) = mpsc::channel(SESSION_QUEUE);
        // Fits: the channel is new and empty.
        let _ = queue.try_send(datagram.to_vec());
        self.queued.fetch_add(datagram.len(), Ordering::Relaxed);
        *next_id += 1;
        let id = *next_id;
        sessions.insert(peer, SessionHandle { id, queue });
        drop(sessions);
        let tracked = self.ctx.live.open(self.spec.key(), None, peer);
        let shared = self.clone();
        self.ctx.connections.spawn(self.tasks.track_future(async move {
            let _held = held;
            let end = shared.run_session(peer, receiver, &tracked).await;
            {
                let mut sessions = lock(&shared.sessions);
                if sessions.get(&peer).is_some_and(|s| s.id == id) {
                    sessions.remove(&peer);
                }
            }
            tracked.finish(end);
        }));
    }

    /// One session: datagrams from `queue` to the target, the target's back to
    /// `peer`, until it is idle for `server.udp_session_idle_secs`.
    async fn run_session(&self, peer: SocketAddr, mut queue: mpsc::Receiver<Vec<u8>>, tracked: &Tracked) -> End {
        let port = self.spec.source_port;
        let visit = self.metrics.visitor_accepted();
        self.metrics.udp.sessions.inc();
        let _session = SessionGauge(&self.metrics.udp);
        let (up, down) = self.policy.capped(self.metrics.meters());
        let (up, down) = (up.tallying(tracked.sent()), down.tallying(tracked.received()));
        let opened = match self.spec.use_tunnel {
            true => self.open_tunneled(tracked).await,
            false => self.open_target().await.map_err(|e| OpenFailed::Unreachable(e.to_string())),
        };
        let mut target = match opened {
            Ok(target) => target,
            Err(failed) => {
                queue.close();
                let mut waiting = 0;
                while let Some(datagram) = queue.recv().await {
                    self.queued.fetch_sub(datagram.len(), Ordering::Relaxed);
                    waiting += 1;
                }
                return match failed {
                    OpenFailed::Unreachable(e) => {
                        self.health.connect_failed(&e);
                        self.metrics.connect_errors.inc();
                        debug!(port, %peer, error = %e, "UDP session refused: target unreachable");
                        End::TargetUnreachable(e)
                    }
                    // Its client went away between the datagram and the open.
                    OpenFailed::NoTunnel(e) => {
                        self.metrics.udp.dropped_no_tunnel.inc_by(waiting);
                        debug!(port, %peer, error = %e, "UDP session dropped: no tunnel");
                        End::TargetUnreachable(e)
                    }
                };
            }
        };
        visit.target_answered();
        debug!(port, %peer, "UDP session opened");
        let idle = self.ctx.settings.udp_session_idle;
        let max = self.ctx.settings.max_udp_datagram;
        let deadline = tokio::time::sleep(idle);
        tokio::pin!(deadline);
        let mut batch = Vec::with_capacity(net::udp::BATCH);
        let end = loop {
            tokio::select! {
                _ = &mut deadline => break End::IdleTimeout,
                _ = tracked.close_requested() => break End::ClosedByApi,
                _ = self.cancel.cancelled() => {
                    break if self.ctx.abort.is_cancelled() { End::Shutdown } else { End::MappingRemoved };
                }
                // All that is queued, up to a batch: one wake-up of this task
                // and one send call for them (`net::udp::send_batch`).
                // Under a cap, one at a time: a batch would wait for the cap
                // as a whole, and the session's end (idle, closed through the
                // API) with it.
                received = queue.recv_many(&mut batch, if up.capped() { 1 } else { net::udp::BATCH }) => {
                    // The mapping stopped taking datagrams: removed, or the daemon stops.
                    if received == 0 {
                        break if self.ctx.stop_accepting.is_cancelled() { End::Shutdown } else { End::MappingRemoved };
                    }
                    self.queued.fetch_sub(batch.iter().map(Vec::len).sum(), Ordering::Relaxed);
                    deadline.as_mut().reset(Instant::now() + idle);
                    self.to_target(peer, &target, &mut batch, &up).await;
                }
                reply = target.recv(max) => match reply {
                    Ok(Reply::Datagram(reply)) => {
                        deadline.as_mut().reset(Instant::now() + idle);
                        self.to_visitor(peer, &reply, &down).await;
                    }
                    Ok(Reply::TooLarge) => self.metrics.udp.dropped_too_large.inc(),
                    Ok(Reply::Gone(client)) => {
                        break if self.ctx.hub.knows(&client) {
                            End::TargetReset(Some(format!("the tunnel session of client {client} ended")))
                        } else {
                            End::ClientRemoved
                        };
                    }
                    Err(e) => self.target_error(peer, &e),
                },
            }
        };
        // What is still queued is dropped with the session: give back its share
        // of the mapping's bound on queued bytes (or that bound shrinks for
        // good by what each such session held, until every datagram of the
        // mapping is dropped as `queue_full`).
        queue.close();
        while let Ok(datagram) = queue.try_recv() {
            self.queued.fetch_sub(datagram.len(), Ordering::Relaxed);
        }
        debug!(port, %peer, end = end.name(), "UDP session ended");
        end
    }

    /// Whether any client of the (tunneled) mapping is connected now.
    fn tunnel_available(&self) -> bool {
        self.group.members().list.iter().any(|m| self.ctx.hub.connected(&m.name))
    }

    /// A session through the first of the group's candidates that opens one
    /// (see `Group::candidates`).
    async fn open_tunneled(&self, tracked: &Tracked) -> Result<Target, OpenFailed> {
        let settings = &self.ctx.settings;
        let mut why = format!("no client of the mapping on port {} is connected", self.spec.source_port);
        for member in self.group.candidates(&self.ctx.hub) {
            let (host, port) = (&self.spec.target_host, self.spec.target_port);
            let opened = self.ctx.hub.open_udp(&member.name, host, port, settings.udp_session_idle, self.metrics.clone()).await;
            match opened {
                Ok(session) => {
                    tracked.served_by(&member.name);
                    return Ok(Target::Tunnel { client: member.name.clone(), _serving: member.serve(), session });
                }
                Err(UdpOpenError::NoTunnel(e)) => why = e,
                Err(UdpOpenError::Refused(e)) => return Err(OpenFailed::Unreachable(e)),
            }
        }
        Err(OpenFailed::NoTunnel(why))
    }

    /// A socket connected to the target, of the target's address family.
    async fn open_target(&self) -> io::Result<Target> {
        let socket = net::udp::connect(&self.spec.target_host, self.spec.target_port, self.ctx.settings.connect_timeout).await?;
        let to = socket.peer_addr()?;
        Ok(Target::Socket { socket, to })
    }

    /// Sends a batch of datagrams toward the target, in order, within the
    /// mapping's bandwidth cap, and empties `batch`. Each is counted once the
    /// socket took it whole (up to [`net::udp::BATCH`] per call: one GSO
    /// `sendmsg` for a train of equal sizes, else `sendmmsg`), or
    /// the tunnel's link queued it (a full queue drops it: `queue_full`).
    async fn to_target(&self, peer: SocketAddr, target: &Target, batch: &mut Vec<Vec<u8>>, up: &Meter) {
        match target {
            Target::Socket { socket, to } => {
                let mut next = 0;
                while next < batch.len() {
                    let chunk = &batch[next..batch.len().min(next + net::udp::BATCH)];
                    let bytes: usize = chunk.iter().map(Vec::len).sum();
                    whole_allowance(up, bytes).await;
                    match net::udp::send_batch(socket, *to, chunk).await {
                        Ok(sent) => {
                            let sent_bytes: usize = chunk[..sent].iter().map(Vec::len).sum();
                            up.record(sent_bytes as u64);
                            up.unused(bytes - sent_bytes);
                            self.metrics.udp.datagrams_sent.inc_by(sent as u64);
                            next += sent;
                        }
                        // The first of the chunk was not sent (the target
                        // refused an earlier one, say): it is dropped, the
                        // rest go on.
                        Err(e) => {
                            up.unused(bytes);
                            self.target_error(peer, &e);
                            next += 1;
                        }
                    }
                }
                batch.clear();
            }
            Target::Tunnel { session, .. } => {
                for datagram in batch.drain(..) {
                    let len = datagram.len();
                    whole_allowance(up, len).await;
                    match session.try_send(Bytes::from(datagram)) {
                        Ok(()) => {
                            up.record(len as u64);
                            self.metrics.udp.datagrams_sent.inc();
                        }
                        Err(SendError::Full) => {
                            self.metrics.udp.dropped_queue_full.inc();
                            up.unused(len);
                        }
                        // The link is gone: the session ends as its replies say so.
                        Err(SendError::Closed) => up.unused(len),
                    }
                }
            }
        }
    }

    /// Sends one of the target's datagrams to the visitor, within the cap.
    async fn to_visitor(&self, peer: SocketAddr, datagram: &[u8], down: &Meter) {
        whole_allowance(down, datagram.len()).await;
        match self.listener.send_to(datagram, peer).await {
            Ok(n) if n == datagram.len() => {
                down.record(n as u64);
                self.metrics.udp.datagrams_received.inc();
            }
            Ok(_) => down.unused(datagram.len()),
            Err(e) => {
                down.unused(datagram.len());
                debug!(port = self.spec.source_port, %peer, error = %e, "reply to the UDP visitor not sent");
            }
        }
    }

    /// The target refused a datagram (ICMP port unreachable, reported on the
    /// connected socket): counted against the target's health; the session
    /// stays, as the target may come back.
    fn target_error(&self, peer: SocketAddr, e: &io::Error) {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            self.metrics.connect_errors.inc();
            self.health.connect_failed(&e.to_string());
        }
        let port = self.spec.source_port;
        if self.ctx.first_refusal(port, "udp_target_error", &e.to_string()) {
            info!(port, %peer, error = %e, "UDP target did not take a datagram; further errors on this port are summarised once a minute");
        }
    }
}

/// Where a session's datagrams go: the one thing a direct session and a
/// tunneled one do differently.
enum Target {
    /// Direct: a socket of the session's own, connected to the target `to`.
    Socket { socket: UdpSocket, to: SocketAddr },
    /// Tunneled: a session of `client`'s, which holds the socket toward the
    /// target; `_serving` counts it as one of the client's connections.
    Tunnel { client: Arc<str>, _serving: Serving, session: TunnelUdpSession },
}

/// What came back from the target.
enum Reply {
    Datagram(Bytes),
    /// Larger than `server.max_udp_datagram_bytes`: dropped whole.
    TooLarge,
    /// Tunneled: the client's session is over (its tunnel ended, or the
    /// client ended it), whose name this is.
    Gone(Arc<str>),
}

/// Why a session could not be opened.
enum OpenFailed {
    Unreachable(String),
    NoTunnel(String),
}

impl Target {
    /// The target's next datagram. Cancel-safe: nothing is read until it is
    /// returned.
    async fn recv(&mut self, max: usize) -> io::Result<Reply> {
        match self {
            Target::Socket { socket, .. } => Ok(match net::udp::next(socket, max).await? {
                Some(reply) => Reply::Datagram(Bytes::from(reply)),
                None => Reply::TooLarge,
            }),
            Target::Tunnel { client, session, .. } => Ok(match session.recv().await {
                Some(reply) if reply.len() > max => Reply::TooLarge,
                Some(reply) => Reply::Datagram(reply),
                None => Reply::Gone(client.clone()),
            }),
        }
    }
}

/// Waits until the cap lets `len` bytes through (at once without a cap): a
/// datagram moves whole or not at all.
async fn whole_allowance(meter: &Meter, len: usize) {
    let mut granted = 0;
    while granted < len {
        granted += meter.allowance(len - granted).await;
    }
}

/// Keeps `tunneld_mapping_udp_sessions` counting a session until it ends, however.
struct SessionGauge<'a>(&'a UdpMetrics);

impl Drop for SessionGauge<'_> {
    fn drop(&mut self) {
        self.0.sessions.dec();
    }
}
