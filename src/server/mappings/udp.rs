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

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::context::Ctx;
use super::health::HealthWindow;
use super::visitor::Admission;
use crate::core::sync::lock;
use crate::policy::LivePolicy;
use crate::server::connections::{End, Tracked};
use crate::store::MappingSpec;
use crate::telemetry::{MappingMetrics, Meter, UdpMetrics};

/// Datagrams one session may have waiting for its target: a burst beyond what
/// the target socket takes at once. More are dropped (`queue_full`).
const SESSION_QUEUE: usize = 256;

/// Payload bytes all sessions of one mapping may have waiting for their
/// targets together, so a flood of large datagrams cannot grow memory with the
/// number of sessions.
const MAPPING_QUEUED_BYTES: usize = 4 << 20;

/// Binds a UDP mapping's port.
pub(super) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
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
        metrics,
        listener: Arc::new(socket),
        sessions: Mutex::new(HashMap::new()),
        queued: AtomicUsize::new(0),
        cancel: cancel.clone(),
        tasks: TaskTracker::new(),
    });
    let max = ctx.settings.max_udp_datagram;
    // One byte more than the largest datagram forwarded: a datagram that fills
    // it was larger, and is dropped rather than forwarded cut.
    let mut buf = vec![0u8; max + 1];
    let mut next_id = 0u64;
    loop {
        let (n, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.stop_accepting.cancelled() => break,
            received = shared.listener.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    // ICMP errors reported on the unconnected socket, and the
                    // like: nothing to do for one datagram, keep serving.
                    debug!(port, error = %e, "UDP receive failed");
                    continue;
                }
            },
        };
        if n > max {
            shared.metrics.udp.dropped_too_large.inc();
            debug!(port, %peer, limit = max, "datagram dropped: larger than server.max_udp_datagram_bytes");
            continue;
        }
        if !shared.policy.admits(peer.ip()) {
            shared.metrics.refused_acl.inc();
            continue;
        }
        if shared.policy.quota_blocked() {
            shared.metrics.refused_quota.inc();
            continue;
        }
        shared.forward(peer, &buf[..n], &mut next_id);
    }
    // Sessions end with the mapping (their queues close; on removal their
    // tasks see the same token), and hold its socket until they have.
    lock(&shared.sessions).clear();
    shared.tasks.close();
    shared.tasks.wait().await;
}

impl Shared {
    /// Queues one admitted datagram for `peer`'s session, opening it if needed.
    fn forward(self: &Arc<Self>, peer: SocketAddr, datagram: &[u8], next_id: &mut u64) {
        let port = self.spec.source_port;
        if self.queued.load(Ordering::Relaxed) + datagram.len() > MAPPING_QUEUED_BYTES {
            self.metrics.udp.dropped_queue_full.inc();
            return;
        }
        let mut sessions = lock(&self.sessions);
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
        // One descriptor per session, from the budget every mapping's visitors share.
        let Some(held) = self.ctx.descriptors.try_take(1) else {
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
        let target = match self.open_target().await {
            Ok(target) => target,
            Err(e) => {
                let e = e.to_string();
                self.health.connect_failed(&e);
                self.metrics.connect_errors.inc();
                debug!(port, %peer, error = %e, "UDP session refused: target unreachable");
                queue.close();
                while let Some(datagram) = queue.recv().await {
                    self.queued.fetch_sub(datagram.len(), Ordering::Relaxed);
                }
                return End::TargetUnreachable(e);
            }
        };
        visit.target_answered();
        debug!(port, %peer, "UDP session opened");
        let idle = self.ctx.settings.udp_session_idle;
        let max = self.ctx.settings.max_udp_datagram;
        let deadline = tokio::time::sleep(idle);
        tokio::pin!(deadline);
        let end = loop {
            tokio::select! {
                _ = &mut deadline => break End::IdleTimeout,
                _ = tracked.close_requested() => break End::ClosedByApi,
                _ = self.cancel.cancelled() => {
                    break if self.ctx.abort.is_cancelled() { End::Shutdown } else { End::MappingRemoved };
                }
                datagram = queue.recv() => {
                    // The mapping stopped taking datagrams: removed, or the daemon stops.
                    let Some(datagram) = datagram else {
                        break if self.ctx.stop_accepting.is_cancelled() { End::Shutdown } else { End::MappingRemoved };
                    };
                    self.queued.fetch_sub(datagram.len(), Ordering::Relaxed);
                    deadline.as_mut().reset(Instant::now() + idle);
                    self.to_target(peer, &target, &datagram, &up).await;
                }
                ready = target.readable() => {
                    if let Err(e) = ready {
                        self.target_error(peer, &e);
                        continue;
                    }
                    match receive(&target, max) {
                        Ok(Some(reply)) => {
                            deadline.as_mut().reset(Instant::now() + idle);
                            self.to_visitor(peer, &reply, &down).await;
                        }
                        Ok(None) => self.metrics.udp.dropped_too_large.inc(),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => self.target_error(peer, &e),
                    }
                }
            }
        };
        debug!(port, %peer, end = end.name(), "UDP session ended");
        end
    }

    /// A socket connected to the target, of the target's address family.
    async fn open_target(&self) -> io::Result<UdpSocket> {
        let addrs = tokio::time::timeout(
            self.ctx.settings.connect_timeout,
            tokio::net::lookup_host((self.spec.target_host.as_str(), self.spec.target_port)),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "resolving the target timed out"))??;
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{} resolves to no address", self.spec.target_host));
        for addr in addrs {
            let local: IpAddr = if addr.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
            let socket = match UdpSocket::bind((local, 0)).await {
                Ok(socket) => socket,
                Err(e) => return Err(e),
            };
            match socket.connect(addr).await {
                Ok(()) => return Ok(socket),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends one datagram to the target, within the mapping's bandwidth cap;
    /// counted once the socket took it whole.
    async fn to_target(&self, peer: SocketAddr, target: &UdpSocket, datagram: &[u8], up: &Meter) {
        whole_allowance(up, datagram.len()).await;
        match target.send(datagram).await {
            Ok(n) if n == datagram.len() => {
                up.record(n as u64);
                self.metrics.udp.datagrams_sent.inc();
            }
            Ok(_) => up.unused(datagram.len()),
            Err(e) => {
                up.unused(datagram.len());
                self.target_error(peer, &e);
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

thread_local! {
    /// Where a session's reply is read before it is copied out at its size: one
    /// buffer per worker thread rather than 64 KiB per session, so a session
    /// costs what it holds (its task, its socket, its queue), not the largest
    /// datagram there could be.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads one datagram from a ready socket: `None` when it was larger than
/// `max` (dropped whole; the buffer is one byte longer to tell).
fn receive(socket: &UdpSocket, max: usize) -> io::Result<Option<Vec<u8>>> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < max + 1 {
            scratch.resize(max + 1, 0);
        }
        let n = socket.try_recv(&mut scratch[..max + 1])?;
        Ok((n <= max).then(|| scratch[..n].to_vec()))
    })
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
