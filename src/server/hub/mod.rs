//! The server's side of the tunnel: the registry of named clients and their live
//! sessions (here), the tunnel port and its handshake (`accept`), and the pools of
//! data channels that visitors of a client's mappings borrow (`pool`).
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

mod accept;
mod pool;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::throttle::{AuthThrottle, FailureLog, Flapping, Unauthenticated};
use crate::core::names::DEFAULT_CLIENT;
use crate::core::secret::Secret;
use crate::core::sync::{lock, read, write};
use crate::telemetry::{session_result, Metrics};
use accept::{Defences, FAILURE_LOG_INTERVAL};
use pool::Session;
pub use pool::{Lease, OpenError};

/// Connections held open before they authenticate, in total and per source.
const MAX_UNAUTHENTICATED: usize = 256;
const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 16;

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

/// A named client: its secret and, while it is connected, its session.
struct Client {
    name: String,
    secret: Secret,
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
    pub fn add_client(&self, name: &str, secret: Secret) {
        let client = Arc::new(Client { name: name.to_string(), secret, session: Mutex::new(None), removed: CancellationToken::new() });
        let mut clients = write(&self.clients);
        self.metrics.add_client(name);
        clients.insert(name.to_string(), client);
    }

    /// Forgets `name`: its session and the exchanges on its data channels end now,
    /// and its metric series go. Returns whether it was known.
    pub fn remove_client(&self, name: &str) -> bool {
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
                }
            })
            .collect();
        status.sort_by(|a, b| a.name.cmp(&b.name));
        status
    }

    fn client(&self, name: &str) -> Option<Arc<Client>> {
        read(&self.clients).get(name).cloned()
    }

    fn all_clients(&self) -> Vec<Arc<Client>> {
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

    fn session(&self, name: &str) -> Option<Arc<Session>> {
        self.client(name)?.current()
    }

    /// Newest wins — a restarted client is back at once — but two processes with
    /// one name taking turns is flapping: logged as an error naming both, and
    /// shown in `/health`.
    fn install(&self, session: Arc<Session>) {
        let client = session.client.clone();
        let latest = session.peer;
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

    fn uninstall(&self, session: &Arc<Session>) {
        session.cancel.cancel();
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
            let _ = self.presence.send(Presence { client: client.name.clone(), connected: false });
        }
        // Idle channels and waiting visitors of a dead session go with it.
        let mut pool = lock(&session.pool);
        pool.idle.clear();
        pool.waiting.clear();
    }
}

impl Client {
    fn current(&self) -> Option<Arc<Session>> {
        lock(&self.session).clone()
    }
}
