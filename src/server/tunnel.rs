//! The server's side of the tunnel: accepting clients, authenticating them,
//! keeping the one live session, and handing out data channels to visitors.
//!
//! One client at a time: a newly authenticated client replaces the previous
//! session, so a client that restarts after a crash is back in service at once
//! instead of waiting for the dead session's heartbeat timeout.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::throttle::{AuthThrottle, FailureLog, FlapDetector, Flapping, Pending, Unauthenticated};
use crate::metered::MeteredStream;
use crate::metrics::{session_result, Meter, Metrics};
use crate::protocol::{self, Message, ProtocolError, PROTOCOL_VERSION};

/// Idle data channels kept beyond this are closed; the client refills on demand.
const MAX_IDLE_DATA_CHANNELS: usize = 64;

/// A connection that has not said who it is within this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections held open before they authenticate, in total and per source.
const MAX_UNAUTHENTICATED: usize = 256;
const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;
const UNKNOWN_SESSION: &str = "data channel for an unknown session";
/// Failures beyond a source's first are logged as one summary per this interval.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no tunnel client is connected")]
    NoClient,
    #[error("the tunnel client did not provide a data channel in time")]
    Timeout,
    #[error("data channel failed: {0}")]
    Channel(#[from] ProtocolError),
}

/// Shared by the tunnel acceptor and every tunneled mapping.
pub struct TunnelHub {
    secret: String,
    metrics: Arc<Metrics>,
    heartbeat: Duration,
    connect_timeout: Duration,
    current: Mutex<Option<Arc<Session>>>,
    defences: Mutex<Defences>,
    unauthenticated: Arc<Unauthenticated>,
}

/// What the tunnel port remembers about misbehaving sources and clients.
struct Defences {
    throttle: AuthThrottle,
    log: FailureLog,
    flaps: FlapDetector,
}

/// One authenticated client.
struct Session {
    id: u64,
    token: String,
    peer: SocketAddr,
    control: mpsc::Sender<Message>,
    pool: Mutex<Pool>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Pool {
    idle: VecDeque<TcpStream>,
    waiting: VecDeque<oneshot::Sender<TcpStream>>,
}

impl TunnelHub {
    pub fn new(secret: String, metrics: Arc<Metrics>, heartbeat: Duration, connect_timeout: Duration) -> Arc<TunnelHub> {
        Arc::new(TunnelHub {
            secret,
            metrics,
            heartbeat,
            connect_timeout,
            current: Mutex::new(None),
            defences: Mutex::new(Defences {
                throttle: AuthThrottle::default(),
                log: FailureLog::new(FAILURE_LOG_INTERVAL),
                flaps: FlapDetector::default(),
            }),
            unauthenticated: Unauthenticated::new(MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_SOURCE),
        })
    }

    /// Two clients fighting over the session right now, for `/health`.
    pub fn flapping(&self) -> Option<Flapping> {
        self.defences.lock().ok()?.flaps.flapping(Instant::now())
    }

    /// Counts a failed handshake against `peer`'s address and logs it — the first
    /// of an interval at once, the rest as one summary line later.
    fn failed(&self, peer: SocketAddr, result: &'static str, reason: &'static str) {
        self.metrics.count_session(result);
        // A data channel naming a session that just ended is a client catching up
        // after a replacement, not a guess (session tokens are random): it is
        // logged in aggregate but does not count against the address.
        let guessing = reason != UNKNOWN_SESSION;
        let log_now = match self.defences.lock() {
            Ok(mut d) => {
                if guessing {
                    d.throttle.failed(peer.ip(), Instant::now());
                }
                d.log.record(peer.ip(), reason, Instant::now())
            }
            Err(_) => true,
        };
        if log_now {
            warn!(%peer, reason, "tunnel handshake failed; further failures from this address are summarised once a minute");
        }
    }

    /// Whether a new connection from `peer` may start a handshake: not while its
    /// address is throttled or holds too many unauthenticated connections.
    fn admit(&self, peer: SocketAddr) -> Option<Pending> {
        let throttled = self.defences.lock().map(|mut d| !d.throttle.allows(peer.ip(), Instant::now())).unwrap_or(false);
        let pending = if throttled { None } else { self.unauthenticated.enter(peer.ip()) };
        if pending.is_none() {
            self.metrics.count_session(session_result::THROTTLED);
            let reason =
                if throttled { "throttled: too many failed handshakes" } else { "throttled: too many unauthenticated connections" };
            let log_now = self.defences.lock().map(|mut d| d.log.record(peer.ip(), reason, Instant::now())).unwrap_or(true);
            if log_now {
                warn!(%peer, reason, "tunnel connection refused; further refusals from this address are summarised once a minute");
            }
        }
        pending
    }

    /// Logs, once per interval, how many failures each source had beyond the one
    /// logged when it started.
    async fn summarise_failures(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FAILURE_LOG_INTERVAL / 4);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let summaries = self.defences.lock().map(|mut d| d.log.drain(Instant::now())).unwrap_or_default();
            for s in summaries {
                warn!(source = %s.source, count = s.count, last_reason = s.last_reason, interval_secs = FAILURE_LOG_INTERVAL.as_secs(), "more failed or refused tunnel handshakes from this address");
            }
        }
    }

    pub fn connected(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// Accepts tunnel connections until `shutdown`; each is handled on its own task
    /// so a slow or hostile peer never holds up another.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        tokio::spawn(self.clone().summarise_failures(shutdown.clone()));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = crate::forward::accept(&listener, || self.metrics.count_session(session_result::THROTTLED)) => accepted,
            };
            let Some(pending) = self.admit(peer) else { continue };
            crate::forward::tune(&stream);
            let hub = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.handle_connection(stream, peer, pending, shutdown).await {
                    debug!(%peer, error = %e, "tunnel connection ended");
                }
            });
        }
        if let Some(session) = self.current() {
            session.cancel.cancel();
        }
    }

    async fn handle_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        pending: Pending,
        shutdown: CancellationToken,
    ) -> Result<(), ProtocolError> {
        let (sent, received) = self.metrics.tunnel_meters();
        let mut stream = MeteredStream::new(stream, sent, received);
        let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, protocol::read_frame(&mut stream)).await;
        let hello = match first {
            Ok(Ok((msg, _))) => msg,
            Ok(Err(e)) => {
                self.failed(peer, session_result::PROTOCOL_ERROR, "bad first frame");
                return Err(e);
            }
            Err(_) => {
                self.failed(peer, session_result::PROTOCOL_ERROR, "no hello within the handshake timeout");
                return Ok(());
            }
        };
        match hello {
            Message::Hello { version } => self.control_channel(stream, peer, version, pending, shutdown).await,
            Message::DataHello { version, session } => {
                drop(pending);
                self.data_channel(stream.into_inner(), peer, version, &session);
                Ok(())
            }
            other => {
                self.failed(peer, session_result::PROTOCOL_ERROR, "unexpected first message");
                Err(ProtocolError::Unexpected(other.kind()))
            }
        }
    }

    async fn control_channel(
        self: Arc<Self>,
        mut stream: MeteredStream,
        peer: SocketAddr,
        version: u32,
        pending: Pending,
        shutdown: CancellationToken,
    ) -> Result<(), ProtocolError> {
        if version != PROTOCOL_VERSION {
            let reason = format!("protocol version {version} is not supported (server speaks {PROTOCOL_VERSION})");
            warn!(%peer, version, "client rejected: protocol version mismatch");
            self.metrics.count_session(session_result::VERSION_MISMATCH);
            protocol::write_frame(&mut stream, &Message::Rejected { reason }).await?;
            return Ok(());
        }
        let nonce = protocol::new_nonce();
        protocol::write_frame(&mut stream, &Message::Challenge { nonce: nonce.clone() }).await?;
        let answer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, protocol::read_frame(&mut stream)).await {
            Ok(Ok((Message::Auth { mac }, _))) => mac,
            Ok(Ok((other, _))) => {
                self.failed(peer, session_result::PROTOCOL_ERROR, "unexpected message instead of auth");
                return Err(ProtocolError::Unexpected(other.kind()));
            }
            Ok(Err(e)) => {
                self.failed(peer, session_result::PROTOCOL_ERROR, "bad auth frame");
                return Err(e);
            }
            Err(_) => {
                self.failed(peer, session_result::PROTOCOL_ERROR, "no auth within the handshake timeout");
                return Ok(());
            }
        };
        if !protocol::verify(&self.secret, &nonce, &answer) {
            self.failed(peer, session_result::AUTH_FAILED, "authentication failed (wrong secret)");
            let reason = "authentication failed: the client's secret does not match the server's".to_string();
            protocol::write_frame(&mut stream, &Message::Rejected { reason }).await?;
            return Ok(());
        }
        drop(pending);
        if let Ok(mut d) = self.defences.lock() {
            d.throttle.succeeded(peer.ip());
        }

        let (control_tx, mut control_rx) = mpsc::channel::<Message>(64);
        let session = Arc::new(Session {
            id: rand::random(),
            token: protocol::new_nonce(),
            peer,
            control: control_tx,
            pool: Mutex::new(Pool::default()),
            cancel: shutdown.child_token(),
        });
        let welcome = Message::Welcome { session: session.token.clone(), heartbeat_interval_secs: self.heartbeat.as_secs().max(1) };
        protocol::write_frame(&mut stream, &welcome).await?;
        self.install(session.clone());
        info!(%peer, session = session.id, "tunnel client authenticated");

        let mut framed = Framed::new(stream, protocol::codec());
        let mut tick = tokio::time::interval(self.heartbeat);
        let mut last_heard = Instant::now();
        let silent_limit = self.heartbeat * 3;
        let outcome = loop {
            tokio::select! {
                _ = session.cancel.cancelled() => break Ok("replaced or shutting down"),
                frame = framed.next() => match frame {
                    Some(Ok(bytes)) => match Message::decode(&bytes) {
                        Ok(Message::Heartbeat) => last_heard = Instant::now(),
                        Ok(other) => break Err(ProtocolError::Unexpected(other.kind())),
                        Err(e) => break Err(e),
                    },
                    Some(Err(e)) => break Err(ProtocolError::Io(e)),
                    None => break Ok("client closed the control channel"),
                },
                Some(msg) = control_rx.recv() => {
                    if let Err(e) = framed.send(msg.to_bytes()).await {
                        break Err(ProtocolError::Io(e));
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > silent_limit {
                        break Ok("client silent for three heartbeat intervals");
                    }
                    if let Err(e) = framed.send(Message::Heartbeat.to_bytes()).await {
                        break Err(ProtocolError::Io(e));
                    }
                }
            }
        };
        match &outcome {
            Ok(reason) => info!(%peer, session = session.id, reason, "tunnel session ended"),
            Err(e) => warn!(%peer, session = session.id, error = %e, "tunnel session ended"),
        }
        self.uninstall(&session);
        outcome.map(|_| ())
    }

    /// Newest wins — a restarted client is back at once — but two clients taking
    /// turns is flapping: logged as an error naming both, and shown in `/health`.
    fn install(&self, session: Arc<Session>) {
        let latest = session.peer;
        let previous = self.current.lock().ok().and_then(|mut c| c.replace(session));
        if let Some(old) = previous {
            warn!(previous = %old.peer, latest = %latest, session = old.id, "a newly authenticated client replaces the connected one");
            self.metrics.count_session(session_result::REPLACED);
            old.cancel.cancel();
            let flapping = self.defences.lock().ok().and_then(|mut d| d.flaps.replaced(old.peer, latest, Instant::now()));
            if let Some(f) = flapping {
                error!(
                    previous = %f.previous,
                    latest = %f.latest,
                    replacements = f.replacements,
                    "tunnel clients are flapping: two clients with the same secret keep replacing each other; stop one of them"
                );
            }
        }
        self.metrics.count_session(session_result::OK);
        self.metrics.session_started();
    }

    fn uninstall(&self, session: &Arc<Session>) {
        session.cancel.cancel();
        if let Ok(mut current) = self.current.lock() {
            if current.as_ref().is_some_and(|c| c.id == session.id) {
                *current = None;
                self.metrics.session_ended();
            }
        }
        // Idle channels and waiting visitors of a dead session go with it.
        if let Ok(mut pool) = session.pool.lock() {
            pool.idle.clear();
            pool.waiting.clear();
        }
    }

    fn data_channel(&self, stream: TcpStream, peer: SocketAddr, version: u32, token: &str) {
        let session = self.current().filter(|s| protocol::tokens_equal(&s.token, token));
        match session {
            Some(session) if version == PROTOCOL_VERSION => session.offer(stream),
            _ => self.failed(peer, session_result::PROTOCOL_ERROR, UNKNOWN_SESSION),
        }
    }

    /// Gets a data channel through the client — a pooled one if one is idle,
    /// else one requested now — and sends it the `connect` request for
    /// `host:port`. The client's answer is read by the caller, so the visitor's
    /// first bytes can travel with the request.
    pub async fn open(&self, host: &str, port: u16, tunnel_sent: &Meter) -> Result<TcpStream, OpenError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let connect = Message::Connect { host: host.to_string(), port };
        // A pooled channel whose client end is already gone fails the write; try
        // another. (One that dies later surfaces as a missing answer.)
        let mut last_error = OpenError::Timeout;
        for _ in 0..4 {
            let session = self.current().ok_or(OpenError::NoClient)?;
            let mut channel = match tokio::time::timeout_at(deadline, session.acquire()).await {
                Ok(Some(channel)) => channel,
                Ok(None) => return Err(OpenError::NoClient),
                Err(_) => return Err(OpenError::Timeout),
            };
            match protocol::write_frame(&mut channel, &connect).await {
                Ok(n) => {
                    tunnel_sent.record(n as u64);
                    return Ok(channel);
                }
                Err(e) => {
                    debug!(error = %e, "stale data channel, trying another");
                    last_error = OpenError::Channel(e);
                }
            }
        }
        Err(last_error)
    }
}

impl Session {
    /// An idle channel, or a wait for the next one the client opens. `None` when
    /// the session died meanwhile.
    async fn acquire(&self) -> Option<TcpStream> {
        let rx = {
            let mut pool = self.pool.lock().ok()?;
            if let Some(channel) = pool.idle.pop_front() {
                return Some(channel);
            }
            let (tx, rx) = oneshot::channel();
            pool.waiting.push_back(tx);
            rx
        };
        // Ask for one more; the client also refills its pool on its own.
        let _ = self.control.try_send(Message::OpenDataChannel);
        tokio::select! {
            channel = rx => channel.ok(),
            _ = self.cancel.cancelled() => None,
        }
    }

    /// A new data channel from the client: to the longest-waiting visitor, else
    /// into the idle pool.
    fn offer(&self, mut channel: TcpStream) {
        let Ok(mut pool) = self.pool.lock() else { return };
        while let Some(waiter) = pool.waiting.pop_front() {
            match waiter.send(channel) {
                Ok(()) => return,
                Err(back) => channel = back,
            }
        }
        if pool.idle.len() < MAX_IDLE_DATA_CHANNELS {
            pool.idle.push_back(channel);
        }
    }
}
