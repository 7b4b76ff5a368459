//! The server's side of the tunnel: accepting clients, authenticating them,
//! keeping each named client's live session, and handing out data channels to
//! visitors of that client's mappings.
//!
//! Clients are known by name, each with its own secret. One session per name: a
//! newly authenticated connection under a name replaces that name's session, so a
//! client that restarts after a crash is back in service at once instead of
//! waiting for the dead session's heartbeat timeout. Other names are untouched.
//!
//! Every connection is TLS unless `server.tls = false`; the first byte tells a TLS
//! client from a plain one, so a mismatch (or a version-1 client) gets a clear
//! answer instead of a "malformed frame". Data channels are reused: after a clean
//! exchange a channel goes back into the session's idle pool.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::throttle::{AuthThrottle, FailureLog, FlapDetector, Flapping, Pending, Unauthenticated};
use crate::core::names::DEFAULT_CLIENT;
use crate::net::metered::MeteredStream;
use crate::net::socket;
use crate::net::transport::TunnelStream;
use crate::telemetry::{session_result, Metrics};
use crate::tunnel::protocol::{self, Message, ProtocolError, PROTOCOL_VERSION};

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
    #[error("tunnel client {0} is not connected")]
    NoClient(String),
    #[error("the tunnel client did not provide a data channel in time")]
    Timeout,
    #[error("data channel failed: {0}")]
    Channel(#[from] ProtocolError),
}

/// How the tunnel port behaves, from `server.*`.
pub struct HubSettings {
    pub heartbeat: Duration,
    pub connect_timeout: Duration,
    /// `None` when `server.tls = false`.
    pub tls: Option<TlsAcceptor>,
    pub pool_idle: Duration,
}

/// Shared by the tunnel acceptor, every tunneled mapping and the client API.
pub struct TunnelHub {
    metrics: Arc<Metrics>,
    settings: HubSettings,
    /// Every known client by name. Metric series of a client are created and
    /// removed under this lock, so a session ending as its client is removed
    /// cannot bring the removed series back.
    clients: RwLock<HashMap<String, Arc<Client>>>,
    defences: Mutex<Defences>,
    unauthenticated: Arc<Unauthenticated>,
    presence: tokio::sync::broadcast::Sender<Presence>,
}

/// A client came or went: a session began, or ended without a successor (a
/// replacement is neither; a removed client's end is not reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub client: String,
    pub connected: bool,
}

/// What the tunnel port remembers about misbehaving sources and clients.
struct Defences {
    throttle: AuthThrottle,
    log: FailureLog,
    /// Per client name: two processes with one name replacing each other.
    flaps: HashMap<String, FlapDetector>,
}

/// A named client: its secret and, while it is connected, its session.
struct Client {
    name: String,
    secret: String,
    session: Mutex<Option<Arc<Session>>>,
    /// Cancelled when the client is removed: its session and every exchange on
    /// its data channels end.
    removed: CancellationToken,
}

/// What the API shows of a client besides its traffic.
#[derive(Debug, Clone)]
pub struct ClientStatus {
    pub name: String,
    /// While connected: the control connection's source address.
    pub peer: Option<SocketAddr>,
    /// While connected: when this session authenticated (Unix seconds).
    pub connected_since: Option<f64>,
}

/// One authenticated connection of a client.
struct Session {
    id: u64,
    token: String,
    peer: SocketAddr,
    /// Unix seconds.
    authenticated_at: f64,
    client: Arc<Client>,
    control: mpsc::Sender<Message>,
    pool: Mutex<Pool>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Pool {
    /// Oldest first, with when each became idle.
    idle: VecDeque<(TunnelStream, Instant)>,
    waiting: VecDeque<oneshot::Sender<TunnelStream>>,
}

/// Where a data channel lent to one visitor goes back after a clean exchange.
pub struct Lease(Arc<Session>);

impl Lease {
    /// Resolves when the channel's client is removed: its exchanges end then.
    pub async fn revoked(&self) {
        self.0.client.removed.cancelled().await
    }

    /// Into the session's pool (or to a waiting visitor); dropped if the session
    /// has ended meanwhile.
    pub fn give_back(self, stream: TunnelStream) {
        if !self.0.cancel.is_cancelled() {
            self.0.offer(stream);
        }
    }
}

impl TunnelHub {
    /// A hub that knows the client `default` (whose secret is `server.secret`) and
    /// the stored `clients` (name, secret).
    pub fn new(
        default_secret: String,
        clients: impl IntoIterator<Item = (String, String)>,
        metrics: Arc<Metrics>,
        settings: HubSettings,
    ) -> Arc<TunnelHub> {
        let hub = Arc::new(TunnelHub {
            metrics,
            settings,
            clients: RwLock::new(HashMap::new()),
            defences: Mutex::new(Defences {
                throttle: AuthThrottle::default(),
                log: FailureLog::new(FAILURE_LOG_INTERVAL),
                flaps: HashMap::new(),
            }),
            unauthenticated: Unauthenticated::new(MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_SOURCE),
            presence: tokio::sync::broadcast::channel(256).0,
        });
        hub.add_client(DEFAULT_CLIENT, default_secret);
        for (name, secret) in clients {
            hub.add_client(&name, secret);
        }
        hub
    }

    /// Makes `name` known with `secret` (replacing nothing: callers check first).
    pub fn add_client(&self, name: &str, secret: String) {
        let client = Arc::new(Client { name: name.to_string(), secret, session: Mutex::new(None), removed: CancellationToken::new() });
        if let Ok(mut clients) = self.clients.write() {
            self.metrics.add_client(name);
            clients.insert(name.to_string(), client);
        }
    }

    /// Forgets `name`: its session and the exchanges on its data channels end now,
    /// and its metric series go. Returns whether it was known.
    pub fn remove_client(&self, name: &str) -> bool {
        let removed = match self.clients.write() {
            Ok(mut clients) => {
                let removed = clients.remove(name);
                if removed.is_some() {
                    self.metrics.remove_client(name);
                }
                removed
            }
            Err(_) => None,
        };
        let Some(client) = removed else { return false };
        client.removed.cancel();
        if let Some(session) = client.session.lock().ok().and_then(|s| s.clone()) {
            session.cancel.cancel();
        }
        if let Ok(mut d) = self.defences.lock() {
            d.flaps.remove(name);
        }
        true
    }

    /// Every session that begins or ends from now on, as it happens — a client
    /// that stays for a moment is seen too.
    pub fn presence(&self) -> tokio::sync::broadcast::Receiver<Presence> {
        self.presence.subscribe()
    }

    pub fn knows(&self, name: &str) -> bool {
        self.client(name).is_some()
    }

    /// Every known client, by name.
    pub fn clients(&self) -> Vec<ClientStatus> {
        let clients: Vec<Arc<Client>> = self.clients.read().map(|c| c.values().cloned().collect()).unwrap_or_default();
        let mut status: Vec<ClientStatus> = clients
            .iter()
            .map(|c| {
                let session = c.current();
                ClientStatus {
                    name: c.name.clone(),
                    peer: session.as_ref().map(|s| s.peer),
                    connected_since: session.as_ref().map(|s| s.authenticated_at),
                }
            })
            .collect();
        status.sort_by(|a, b| a.name.cmp(&b.name));
        status
    }

    fn client(&self, name: &str) -> Option<Arc<Client>> {
        self.clients.read().ok()?.get(name).cloned()
    }

    /// Clients whose processes are fighting over one name right now, for `/health`.
    pub fn flapping(&self) -> BTreeMap<String, Flapping> {
        let now = Instant::now();
        let Ok(d) = self.defences.lock() else { return BTreeMap::new() };
        d.flaps.iter().filter_map(|(name, f)| Some((name.clone(), f.flapping(now)?))).collect()
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

    /// Whether the client `name` has a live session.
    pub fn connected(&self, name: &str) -> bool {
        self.session(name).is_some()
    }

    fn session(&self, name: &str) -> Option<Arc<Session>> {
        self.client(name)?.current()
    }

    /// Accepts tunnel connections until `shutdown`; each is handled on its own task
    /// so a slow or hostile peer never holds up another.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        tokio::spawn(self.clone().summarise_failures(shutdown.clone()));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = socket::accept(&listener, || self.metrics.count_session(session_result::THROTTLED)) => accepted,
            };
            let Some(pending) = self.admit(peer) else { continue };
            socket::tune(&stream);
            let hub = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.handle_connection(stream, peer, pending, shutdown).await {
                    debug!(%peer, error = %e, "tunnel connection ended");
                }
            });
        }
        let clients: Vec<Arc<Client>> = self.clients.read().map(|c| c.values().cloned().collect()).unwrap_or_default();
        for session in clients.iter().filter_map(|c| c.current()) {
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
        let Some(mut stream) = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.secure(stream, peer)).await.unwrap_or_else(|_| {
            self.failed(peer, session_result::PROTOCOL_ERROR, "no handshake within the timeout");
            None
        }) else {
            return Ok(());
        };
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
            Message::Hello { version, .. } | Message::DataHello { version, .. } if version != PROTOCOL_VERSION => {
                self.reject_version(&mut stream, peer, version).await
            }
            Message::Hello { client, .. } => self.control_channel(stream, peer, &client, pending, shutdown).await,
            Message::DataHello { session, .. } => {
                drop(pending);
                self.data_channel(stream, peer, &session);
                Ok(())
            }
            other => {
                self.failed(peer, session_result::PROTOCOL_ERROR, "unexpected first message");
                Err(ProtocolError::Unexpected(other.kind()))
            }
        }
    }

    async fn reject_version(&self, stream: &mut TunnelStream, peer: SocketAddr, version: u32) -> Result<(), ProtocolError> {
        warn!(%peer, version, "client rejected: protocol version mismatch");
        self.metrics.count_session(session_result::VERSION_MISMATCH);
        protocol::write_frame(stream, &Message::Rejected { reason: protocol::version_rejection(version) }).await?;
        Ok(())
    }

    /// The connection as this server speaks it: TLS (handshake done) or plain.
    /// A peer on the other side of a TLS/plain mismatch is told so and dropped.
    async fn secure(&self, stream: TcpStream, peer: SocketAddr) -> Option<TunnelStream> {
        let mut first = [0u8; 1];
        let peeked = stream.peek(&mut first).await.ok()?;
        let speaks_tls = peeked == 1 && first[0] == crate::net::tls::TLS_HANDSHAKE_BYTE;
        // Counted as a client's once it has authenticated (see `attribute`).
        let mut metered = MeteredStream::unattributed(stream);
        match (&self.settings.tls, speaks_tls) {
            (Some(acceptor), true) => match acceptor.accept(metered.reading_ahead()).await {
                Ok(tls) => Some(TunnelStream::Tls(Box::new(tls.into()))),
                Err(e) => {
                    debug!(%peer, error = %e, "TLS handshake with a tunnel client failed");
                    self.failed(peer, session_result::TLS_ERROR, "TLS handshake failed");
                    None
                }
            },
            (None, false) => Some(TunnelStream::Plain(Box::new(metered))),
            (Some(_), false) => {
                // A version-1 client, a client with `tls = false`, or garbage: read
                // its hello in the clear to tell which, and answer in the clear.
                let mut plain = TunnelStream::Plain(Box::new(metered));
                match protocol::read_frame(&mut plain).await {
                    Ok((Message::Hello { version, .. } | Message::DataHello { version, .. }, _)) if version != PROTOCOL_VERSION => {
                        let _ = self.reject_version(&mut plain, peer, version).await;
                    }
                    Ok((Message::Hello { .. } | Message::DataHello { .. }, _)) => {
                        self.failed(
                            peer,
                            session_result::TLS_ERROR,
                            "client speaks plain TCP but this server requires TLS (server.tls = true)",
                        );
                        let reason = "this server requires TLS (server.tls = true): remove `tls = false` from the client's \
                                      configuration and pin the server's fingerprint"
                            .to_string();
                        let _ = protocol::write_frame(&mut plain, &Message::Rejected { reason }).await;
                    }
                    Ok((other, _)) => {
                        debug!(%peer, kind = other.kind(), "unexpected first message");
                        self.failed(peer, session_result::PROTOCOL_ERROR, "unexpected first message");
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "bad first frame");
                        self.failed(peer, session_result::PROTOCOL_ERROR, "bad first frame");
                    }
                }
                None
            }
            (None, true) => {
                self.failed(peer, session_result::TLS_ERROR, "client speaks TLS but this server runs with server.tls = false");
                // A plaintext fatal alert: the client reports "server has TLS off".
                let _ = metered.write_all(&crate::net::tls::PLAIN_SERVER_ALERT).await;
                None
            }
        }
    }

    async fn control_channel(
        self: Arc<Self>,
        mut stream: TunnelStream,
        peer: SocketAddr,
        name: &str,
        pending: Pending,
        shutdown: CancellationToken,
    ) -> Result<(), ProtocolError> {
        if crate::core::names::invalid_client_name(name).is_some() {
            self.failed(peer, session_result::PROTOCOL_ERROR, "invalid client name in hello");
            let reason = "invalid client name: 1 to 64 characters of a-z, 0-9, '_' and '-'".to_string();
            protocol::write_frame(&mut stream, &Message::Rejected { reason }).await?;
            return Ok(());
        }
        // An unknown name is challenged like a known one and refused with the same
        // words as a wrong secret, so names cannot be probed.
        let client = self.client(name);
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
        let binding = stream.binding();
        let Some(client) = client.filter(|c| protocol::verify(&c.secret, &nonce, &binding, &answer)) else {
            let reason =
                if self.knows(name) { "authentication failed (wrong secret)" } else { "authentication failed (unknown client name)" };
            debug!(%peer, client = name, reason, "tunnel client refused");
            self.failed(peer, session_result::AUTH_FAILED, reason);
            let reason = "authentication failed: unknown client name or wrong secret".to_string();
            protocol::write_frame(&mut stream, &Message::Rejected { reason }).await?;
            return Ok(());
        };
        drop(pending);
        if let Ok(mut d) = self.defences.lock() {
            d.throttle.succeeded(peer.ip());
        }
        let (sent, received) = self.metrics.tunnel_meters(&client.name);
        stream.attribute(sent, received);

        let (control_tx, mut control_rx) = mpsc::channel::<Message>(64);
        let session = Arc::new(Session {
            id: rand::random(),
            token: protocol::new_nonce(),
            peer,
            authenticated_at: crate::core::time::unix_now(),
            client: client.clone(),
            control: control_tx,
            pool: Mutex::new(Pool::default()),
            cancel: shutdown.child_token(),
        });
        let heartbeat = self.settings.heartbeat;
        let welcome = Message::Welcome { session: session.token.clone(), heartbeat_interval_secs: heartbeat.as_secs().max(1) };
        protocol::write_frame(&mut stream, &welcome).await?;
        self.install(session.clone());
        info!(%peer, client = %client.name, session = session.id, "tunnel client authenticated");

        let (mut frames, mut writer) = protocol::control_channel(stream);
        let mut tick = tokio::time::interval(heartbeat);
        let mut last_heard = Instant::now();
        let silent_limit = heartbeat * 3;
        let outcome = loop {
            tokio::select! {
                _ = session.cancel.cancelled() => break Ok(if client.removed.is_cancelled() { "client removed" } else { "replaced or shutting down" }),
                frame = frames.next() => match frame {
                    Some(Ok(bytes)) => match Message::decode(&bytes) {
                        Ok(Message::Heartbeat) => last_heard = Instant::now(),
                        Ok(other) => break Err(ProtocolError::Unexpected(other.kind())),
                        Err(e) => break Err(e),
                    },
                    Some(Err(e)) => break Err(ProtocolError::Io(e)),
                    None => break Ok("client closed the control channel"),
                },
                Some(msg) = control_rx.recv() => {
                    if let Err(e) = protocol::write_frame(&mut writer, &msg).await {
                        break Err(e);
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > silent_limit {
                        break Ok("client silent for three heartbeat intervals");
                    }
                    session.expire_idle(self.settings.pool_idle);
                    if let Err(e) = protocol::write_frame(&mut writer, &Message::Heartbeat).await {
                        break Err(e);
                    }
                }
            }
        };
        match &outcome {
            Ok(reason) => info!(%peer, client = %client.name, session = session.id, reason, "tunnel session ended"),
            Err(e) => warn!(%peer, client = %client.name, session = session.id, error = %e, "tunnel session ended"),
        }
        self.uninstall(&session);
        outcome.map(|_| ())
    }

    /// Newest wins — a restarted client is back at once — but two processes with
    /// one name taking turns is flapping: logged as an error naming both, and
    /// shown in `/health`.
    fn install(&self, session: Arc<Session>) {
        let client = session.client.clone();
        let latest = session.peer;
        let previous = client.session.lock().ok().and_then(|mut c| c.replace(session));
        let previous_peer = previous.as_ref().map(|old| old.peer);
        if let Some(old) = previous {
            warn!(client = %client.name, previous = %old.peer, latest = %latest, session = old.id, "a newly authenticated client replaces the connected one with the same name");
            self.metrics.count_session(session_result::REPLACED);
            old.cancel.cancel();
            let flapping = self
                .defences
                .lock()
                .ok()
                .and_then(|mut d| d.flaps.entry(client.name.clone()).or_default().replaced(old.peer, latest, Instant::now()));
            if let Some(f) = flapping {
                error!(
                    client = %client.name,
                    previous = %f.previous,
                    latest = %f.latest,
                    replacements = f.replacements,
                    "tunnel clients are flapping: two clients with the same name keep replacing each other; stop one of them"
                );
            }
        }
        self.metrics.count_session(session_result::OK);
        if let Ok(clients) = self.clients.read() {
            // A client removed during the handshake: its series stay removed and
            // the session ends at once.
            match clients.get(&client.name) {
                Some(known) if Arc::ptr_eq(known, &client) => {
                    if let Some(since) = client.current().map(|s| s.authenticated_at) {
                        self.metrics.session_started(&client.name, since);
                    }
                    if previous_peer.is_none() {
                        let _ = self.presence.send(Presence { client: client.name.clone(), connected: true });
                    }
                }
                _ => {
                    if let Some(s) = client.current() {
                        s.cancel.cancel();
                    }
                }
            }
        }
    }

    fn uninstall(&self, session: &Arc<Session>) {
        session.cancel.cancel();
        let client = &session.client;
        let was_current = match client.session.lock() {
            Ok(mut current) if current.as_ref().is_some_and(|c| c.id == session.id) => {
                *current = None;
                true
            }
            _ => false,
        };
        if was_current {
            if let Ok(clients) = self.clients.read() {
                if clients.get(&client.name).is_some_and(|known| Arc::ptr_eq(known, client)) {
                    self.metrics.session_ended(&client.name);
                    let _ = self.presence.send(Presence { client: client.name.clone(), connected: false });
                }
            }
        }
        // Idle channels and waiting visitors of a dead session go with it.
        if let Ok(mut pool) = session.pool.lock() {
            pool.idle.clear();
            pool.waiting.clear();
        }
    }

    /// A data channel presents its session's token; the session tells whose it is.
    fn data_channel(&self, mut stream: TunnelStream, peer: SocketAddr, token: &str) {
        let clients: Vec<Arc<Client>> = self.clients.read().map(|c| c.values().cloned().collect()).unwrap_or_default();
        match clients.iter().filter_map(|c| c.current()).find(|s| crate::core::secret::tokens_equal(&s.token, token)) {
            Some(session) => {
                let (sent, received) = self.metrics.tunnel_meters(&session.client.name);
                stream.attribute(sent, received);
                session.offer(stream)
            }
            None => self.failed(peer, session_result::PROTOCOL_ERROR, UNKNOWN_SESSION),
        }
    }

    /// Gets a data channel through `client` — a pooled one if one is idle, else
    /// one requested now — and sends it the `connect` request for `host:port`,
    /// with what `visitor` has already sent as the first chunk in the same write
    /// (returned: how many user bytes went with it). The client's answer is read
    /// by the caller, so the visitor's bytes travel ahead of it.
    pub async fn open(&self, client: &str, host: &str, port: u16, visitor: &TcpStream) -> Result<(TunnelStream, Lease, usize), OpenError> {
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        let connect = Message::Connect { host: host.to_string(), port };
        let mut opening: Option<(Vec<u8>, usize)> = None;
        let no_client = || OpenError::NoClient(client.to_string());
        // A pooled channel whose client end is already gone fails the write; try
        // another. (One that dies later surfaces as a missing answer.)
        let mut last_error = OpenError::Timeout;
        for _ in 0..4 {
            let session = self.session(client).ok_or_else(no_client)?;
            let mut stream = match tokio::time::timeout_at(deadline, session.acquire(self.settings.pool_idle)).await {
                Ok(Some(stream)) => stream,
                Ok(None) => return Err(no_client()),
                Err(_) => return Err(OpenError::Timeout),
            };
            // Read once a channel is at hand (the visitor had longest to send),
            // and kept for the next channel should this one turn out stale.
            let (wire, sent_ahead) = opening.get_or_insert_with(|| {
                let early = crate::tunnel::exchange::early_bytes(visitor);
                (crate::tunnel::exchange::opening(&connect, &early), early.len())
            });
            let sent = async {
                stream.write_all(wire).await?;
                // Under TLS the request is not on its way until flushed.
                stream.flush().await
            };
            match sent.await.map_err(ProtocolError::Io) {
                Ok(()) => return Ok((stream, Lease(session), *sent_ahead)),
                Err(e) => {
                    debug!(error = %e, "stale data channel, trying another");
                    last_error = OpenError::Channel(e);
                }
            }
        }
        Err(last_error)
    }
}

impl Client {
    fn current(&self) -> Option<Arc<Session>> {
        self.session.lock().ok().and_then(|s| s.clone())
    }
}

impl Session {
    /// An idle channel, or a wait for the next one the client opens. `None` when
    /// the session died meanwhile.
    async fn acquire(&self, max_idle: Duration) -> Option<TunnelStream> {
        let rx = {
            let mut pool = self.pool.lock().ok()?;
            // Most recently used first: it is the least likely to have been closed
            // by a middlebox or the client, and it lets the rest age out.
            while let Some((mut channel, since)) = pool.idle.pop_back() {
                if since.elapsed() < max_idle && !channel.is_stale() {
                    return Some(channel);
                }
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
    fn offer(&self, mut channel: TunnelStream) {
        let Ok(mut pool) = self.pool.lock() else { return };
        while let Some(waiter) = pool.waiting.pop_front() {
            match waiter.send(channel) {
                Ok(()) => return,
                Err(back) => channel = back,
            }
        }
        if pool.idle.len() < MAX_IDLE_DATA_CHANNELS {
            channel.release_read_ahead();
            pool.idle.push_back((channel, Instant::now()));
        }
    }

    /// Closes channels idle for `max_idle`; the client notices and opens fresh ones.
    fn expire_idle(&self, max_idle: Duration) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.idle.retain(|(_, since)| since.elapsed() < max_idle);
        }
    }
}
