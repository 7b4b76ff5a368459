//! The hub itself: every known client by name, each one's live session, and
//! the way a visitor of a client's mapping gets a data channel.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::defences::{Defences, FAILURE_LOG_INTERVAL};
use super::session::{Client, Lease, Session};
use crate::core::failure_log::FailureLog;
use crate::core::names::DEFAULT_CLIENT;
use crate::core::secret::Secret;
use crate::core::sync::{lock, read, write};
use crate::net::transport::TunnelStream;
use crate::server::throttle::{AuthThrottle, EndedSessions, Flapping, KnownSources, Unauthenticated};
use crate::telemetry::{session_result, Metrics};
use crate::tunnel::exchange;
use crate::tunnel::frame::ProtocolError;
use crate::tunnel::message::Connect;

/// Connections held open before they authenticate, in total and per source.
const MAX_UNAUTHENTICATED: usize = 256;
const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;
/// Beyond [`MAX_UNAUTHENTICATED`], slots only addresses that clients
/// authenticated from recently may use: a client reconnecting, or opening data
/// channels, gets in while strangers hold every ordinary slot.
const RESERVED_FOR_KNOWN_CLIENTS: usize = 64;

/// Why no data channel could be had for a visitor.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("tunnel client {0} is not connected")]
    NoClient(String),
    #[error("the tunnel client did not provide a data channel in time")]
    Timeout,
    #[error("data channel failed: {0}")]
    Channel(#[from] ProtocolError),
    /// The mapping asks for a PROXY header and the client's build cannot
    /// write one: sent bare, its visitors would reach a target expecting the
    /// header without it, or with the client's address taken for theirs.
    #[error("tunnel client {0} is too old to write PROXY protocol headers (the mapping sets proxy_protocol): upgrade it")]
    NoProxyHeaders(String),
}

/// How the tunnel port behaves, from `server.*`.
pub struct HubSettings {
    pub heartbeat: Duration,
    pub connect_timeout: Duration,
    /// `None` when `server.tls = false`.
    pub tls: Option<crate::net::tls::ServerTls>,
    pub pool_idle: Duration,
}

/// Shared by the tunnel acceptor, every tunneled mapping and the client API.
pub struct TunnelHub {
    pub(super) metrics: Arc<Metrics>,
    pub(super) settings: HubSettings,
    /// Every known client by name. Metric series of a client are created and
    /// removed under this lock, so a session ending as its client is removed
    /// cannot bring the removed series back.
    pub(super) clients: RwLock<HashMap<String, Arc<Client>>>,
    pub(super) defences: Mutex<Defences>,
    pub(super) unauthenticated: Arc<Unauthenticated>,
    pub(super) presence: tokio::sync::broadcast::Sender<Presence>,
}

/// A client came or went: a session began, or ended without a successor (a
/// replacement is neither; the end of a removed client's session is not
/// reported, nor that of sessions the server ends because it is stopping: a
/// shutdown loses no client, and each reconnects to the next process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub client: String,
    pub connected: bool,
}

/// What the API shows of a client besides its traffic.
#[derive(Debug, Clone)]
pub struct ClientStatus {
    pub name: String,
    /// While connected: the control connection's source address.
    pub peer: Option<SocketAddr>,
    /// While connected: when this session authenticated (Unix seconds).
    pub connected_since: Option<f64>,
    /// While its tunnel carries datagrams: how (`quic`, `framed`).
    pub udp_transport: Option<&'static str>,
}

impl TunnelHub {
    /// A hub that knows the client `default` (whose secret is `server.secret`) and
    /// the stored `clients` (name, secret).
    pub fn new(
        default_secret: Secret,
        clients: impl IntoIterator<Item = (String, Secret)>,
        metrics: Arc<Metrics>,
        settings: HubSettings,
    ) -> Arc<TunnelHub> {
        let hub = Arc::new(TunnelHub {
            metrics,
            settings,
            clients: RwLock::new(HashMap::new()),
            defences: Mutex::new(Defences {
                throttle: AuthThrottle::default(),
                known: KnownSources::default(),
                ended: EndedSessions::default(),
                log: FailureLog::new(FAILURE_LOG_INTERVAL),
                flaps: HashMap::new(),
            }),
            unauthenticated: Unauthenticated::new(MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_SOURCE, RESERVED_FOR_KNOWN_CLIENTS),
            presence: tokio::sync::broadcast::channel(256).0,
        });
        hub.add_client(DEFAULT_CLIENT, default_secret);
        for (name, secret) in clients {
            hub.add_client(&name, secret);
        }
        hub
    }

    /// Makes `name` known with `secret` (replacing nothing: callers check first).
    pub fn add_client(&self, name: &str, secret: Secret) {
        let client = Arc::new(Client { name: name.to_string(), secret, session: Mutex::new(None), removed: CancellationToken::new() });
        let mut clients = write(&self.clients);
        self.metrics.add_client(name);
        clients.insert(name.to_string(), client);
    }

    /// Forgets `name`: its session and the exchanges on its data channels end now,
    /// and its metric series go. Returns whether it was known.
    pub fn remove_client(&self, name: &str) -> bool {
        // Remembered before the session can no longer be found, so none of its
        // data channels in flight is taken for a forgery.
        if let Some(session) = self.session(name) {
            self.session_ending(&session);
        }
        let removed = {
            let mut clients = write(&self.clients);
            let removed = clients.remove(name);
            if removed.is_some() {
                self.metrics.remove_client(name);
            }
            removed
        };
        let Some(client) = removed else { return false };
        client.removed.cancel();
        if let Some(session) = client.current() {
            session.cancel.cancel();
        }
        lock(&self.defences).flaps.remove(name);
        true
    }

    /// Every session that begins or ends from now on, as it happens — a client
    /// that stays for a moment is seen too.
    pub fn presence(&self) -> tokio::sync::broadcast::Receiver<Presence> {
        self.presence.subscribe()
    }

    /// Whether a client of that name exists (connected or not).
    pub fn knows(&self, name: &str) -> bool {
        self.client(name).is_some()
    }

    /// Every known client, by name.
    pub fn clients(&self) -> Vec<ClientStatus> {
        let mut status: Vec<ClientStatus> = self
            .all_clients()
            .iter()
            .map(|c| {
                let session = c.current();
                ClientStatus {
                    name: c.name.clone(),
                    peer: session.as_ref().map(|s| s.peer),
                    connected_since: session.as_ref().map(|s| s.authenticated_at),
                    udp_transport: session.as_ref().and_then(|s| s.udp.borrow().as_ref().filter(|l| l.is_open()).map(|l| l.transport)),
                }
            })
            .collect();
        status.sort_by(|a, b| a.name.cmp(&b.name));
        status
    }

    pub(super) fn client(&self, name: &str) -> Option<Arc<Client>> {
        read(&self.clients).get(name).cloned()
    }

    pub(super) fn all_clients(&self) -> Vec<Arc<Client>> {
        read(&self.clients).values().cloned().collect()
    }

    /// Clients whose processes are fighting over one name right now, for `/health`.
    pub fn flapping(&self) -> BTreeMap<String, Flapping> {
        let now = Instant::now();
        lock(&self.defences).flaps.iter().filter_map(|(name, f)| Some((name.clone(), f.flapping(now)?))).collect()
    }

    /// Whether the client `name` has a live session.
    pub fn connected(&self, name: &str) -> bool {
        self.session(name).is_some()
    }

    /// Where the client `name` is connected from, when that is this host (its
    /// session's peer is a local address): its targets are then this host's.
    pub fn peer_on_this_host(&self, name: &str) -> Option<SocketAddr> {
        self.session(name).filter(|s| s.on_this_host).map(|s| s.peer)
    }

    pub(super) fn session(&self, name: &str) -> Option<Arc<Session>> {
        self.client(name)?.current()
    }

    /// Newest wins — a restarted client is back at once — but two processes with
    /// one name taking turns is flapping: logged as an error naming both, and
    /// shown in `/health`.
    pub(super) fn install(&self, session: Arc<Session>) {
        let client = session.client.clone();
        let latest = session.peer;
        if let Some(old) = client.current() {
            self.session_ending(&old);
        }
        let previous = lock(&client.session).replace(session);
        let previous_peer = previous.as_ref().map(|old| old.peer);
        if let Some(old) = previous {
            warn!(client = %client.name, previous = %old.peer, latest = %latest, session = old.id, "a newly authenticated client replaces the connected one with the same name");
            self.metrics.count_session(session_result::REPLACED);
            old.cancel.cancel();
            let flapping = lock(&self.defences).flaps.entry(client.name.clone()).or_default().replaced(old.peer, latest, Instant::now());
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
        let clients = read(&self.clients);
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

    /// A session is about to end (replaced, removed, gone): its client may still
    /// be opening data channels with its token, which are then no guesses.
    /// Called while the session can still be found, so no channel falls between.
    fn session_ending(&self, session: &Session) {
        lock(&self.defences).ended.ended(&session.token, Instant::now());
    }

    pub(super) fn uninstall(&self, session: &Arc<Session>) {
        session.cancel.cancel();
        self.session_ending(session);
        let client = &session.client;
        let was_current = {
            let mut current = lock(&client.session);
            let mine = current.as_ref().is_some_and(|c| c.id == session.id);
            if mine {
                *current = None;
            }
            mine
        };
        if was_current && read(&self.clients).get(&client.name).is_some_and(|known| Arc::ptr_eq(known, client)) {
            self.metrics.session_ended(&client.name);
            if !session.server_stopping.is_cancelled() {
                let _ = self.presence.send(Presence { client: client.name.clone(), connected: false });
            }
        }
        // Idle channels and waiting visitors of a dead session go with it.
        let mut pool = lock(&session.pool);
        pool.idle.clear();
        pool.waiting.clear();
    }
}

impl TunnelHub {
    /// A health check: asks `client` to dial `host:port` over a data channel
    /// of its own and hang up at once. `Err` says why it could not.
    pub async fn probe(&self, client: &str, host: &str, port: u16) -> Result<(), String> {
        let session = self.session(client).ok_or_else(|| format!("tunnel client {client} is not connected"))?;
        let mut channel = session.acquire(self.settings.pool_idle).await.ok_or_else(|| format!("tunnel client {client} disconnected"))?;
        // No PROXY header: a check is no visitor (a target expecting headers
        // sees a connection that closes without one).
        let connect = Connect::Connect { host: host.to_string(), port, proxy_header: None };
        exchange::probe(&mut channel, &connect).await.map_err(|e| e.to_string())
    }

    /// Gets a data channel through `client` — a pooled one if one is idle, else
    /// one requested now — and sends it `connect` (the target, and the PROXY
    /// header the client writes to it first, if any), with what `visitor` has
    /// already sent as the first chunk in the same write (at most `early_max`
    /// bytes, taken into `early` the first time; a retry through another
    /// client sends the same; returned: how many user bytes went with it). The
    /// client's answer is read by the caller, so the visitor's bytes travel
    /// ahead of it.
    pub async fn open(
        &self,
        client: &str,
        connect: &Connect,
        visitor: &TcpStream,
        early_max: usize,
        early: &mut Option<Vec<u8>>,
    ) -> Result<(TunnelStream, Lease, usize), OpenError> {
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        let wants_header = matches!(connect, Connect::Connect { proxy_header: Some(_), .. });
        let mut opening: Option<(Vec<u8>, usize)> = None;
        let no_client = || OpenError::NoClient(client.to_string());
        // A pooled channel whose client end is already gone fails the write; try
        // another. (One that dies later surfaces as a missing answer.)
        let mut last_error = OpenError::Timeout;
        for _ in 0..4 {
            let session = self.session(client).ok_or_else(no_client)?;
            if wants_header && !session.writes_proxy_headers {
                return Err(OpenError::NoProxyHeaders(client.to_string()));
            }
            let mut stream = match tokio::time::timeout_at(deadline, session.acquire(self.settings.pool_idle)).await {
                Ok(Some(stream)) => stream,
                Ok(None) => return Err(no_client()),
                Err(_) => return Err(OpenError::Timeout),
            };
            // Read once a channel is at hand (the visitor had longest to send),
            // and kept for the next channel should this one turn out stale.
            let (wire, sent_ahead) = opening.get_or_insert_with(|| {
                let early = early.get_or_insert_with(|| exchange::early_bytes(visitor, early_max));
                (exchange::opening(connect, early), early.len())
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
