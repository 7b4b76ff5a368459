//! Mappings: their lifecycle (create, restore, remove), their listeners, and what
//! happens to each visitor.
//!
//! Each mapping is one task that owns its listener. A mapping whose port cannot be
//! bound (say, taken by another process at start) keeps its row, shows the error in
//! `list`, and retries in the background — one bad mapping never stops the daemon.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::hub::TunnelHub;
use crate::net::relay;
use crate::net::socket;
use crate::policy::{LivePolicy, Policy, PolicyUpdate};
use crate::store::{MappingSpec, Store, StoreError};
use crate::telemetry::{MappingMetrics, Meter, Metrics};
use crate::tunnel::exchange::{self, ExchangeError};

/// How often a mapping that could not bind its port tries again.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Bound on resolving a new mapping's `target_host`.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("no mapping on port {0}")]
    NotFound(u16),
    #[error("no client named {0:?}")]
    UnknownClient(String),
    /// `action` says what failed ("save the mapping on port 4000").
    #[error("could not {action}: {error}")]
    Store { action: String, error: StoreError },
}

impl MappingError {
    fn store(action: impl Into<String>) -> impl FnOnce(StoreError) -> MappingError {
        let action = action.into();
        move |error| MappingError::Store { action, error }
    }
}

/// What the API asks for.
#[derive(Debug, Clone)]
pub struct NewMapping {
    pub source_port: u16,
    pub target_host: String,
    pub target_port: u16,
    pub use_tunnel: bool,
    /// Which client reaches the target (`None`: `default`); tunneled mappings only.
    pub client: Option<String>,
    pub policy: Policy,
}

/// A mapping as `create` and `list` show it (the API turns it into its wire type).
#[derive(Debug, Clone)]
pub struct MappingView {
    /// Where it forwards, as stored.
    pub spec: MappingSpec,
    /// Its policy now.
    pub policy: Policy,
    /// With a quota: bytes used in the current period.
    pub quota_used: Option<u64>,
    /// With a quota: whether new visitors are refused for it.
    pub quota_blocked: Option<bool>,
    /// Whether it is serving.
    pub status: MappingStatus,
}

/// Whether a mapping is serving, as the API shows it: `"active"`,
/// `"waiting_for_tunnel"`, or `"error: <why>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingStatus {
    /// Listening, and (tunneled) its client is connected.
    Active,
    /// Listening, but the client that reaches the target is not connected.
    WaitingForTunnel,
    /// The port cannot be bound (retried in the background); why.
    Error(String),
}

impl std::fmt::Display for MappingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            MappingStatus::Active => f.write_str("active"),
            MappingStatus::WaitingForTunnel => f.write_str("waiting_for_tunnel"),
            MappingStatus::Error(why) => write!(f, "error: {why}"),
        }
    }
}

impl std::str::FromStr for MappingStatus {
    type Err = String;

    fn from_str(text: &str) -> Result<MappingStatus, String> {
        match text {
            "active" => Ok(MappingStatus::Active),
            "waiting_for_tunnel" => Ok(MappingStatus::WaitingForTunnel),
            _ => match text.strip_prefix("error: ") {
                Some(why) => Ok(MappingStatus::Error(why.to_string())),
                None => Err(format!("unknown mapping status {text:?}")),
            },
        }
    }
}

impl Serialize for MappingStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MappingStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MappingStatus, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

pub struct Settings {
    pub bind_addr: IpAddr,
    /// The API's and the tunnel's own ports: never mappable.
    pub reserved_ports: Vec<(u16, &'static str)>,
    pub connect_timeout: Duration,
    /// `server.max_connections_per_mapping`.
    pub max_connections: usize,
    /// `server.idle_timeout_secs`.
    pub idle_timeout: Duration,
}

pub struct Mappings {
    entries: tokio::sync::Mutex<BTreeMap<u16, Entry>>,
    ctx: Arc<Ctx>,
}

/// What every mapping task needs.
struct Ctx {
    store: Store,
    metrics: Arc<Metrics>,
    hub: Arc<TunnelHub>,
    settings: Settings,
    /// Shutdown, phase 1: listeners close.
    stop_accepting: CancellationToken,
    /// Shutdown, phase 2: open connections are cut.
    abort: CancellationToken,
    connections: TaskTracker,
}

struct Entry {
    spec: Arc<MappingSpec>,
    policy: Arc<LivePolicy>,
    quota_used: prometheus::Gauge,
    bind_error: Arc<Mutex<Option<String>>>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Mappings {
    pub fn new(store: Store, metrics: Arc<Metrics>, hub: Arc<TunnelHub>, settings: Settings) -> Mappings {
        let abort = CancellationToken::new();
        Mappings {
            entries: tokio::sync::Mutex::new(BTreeMap::new()),
            ctx: Arc::new(Ctx {
                store,
                metrics,
                hub,
                settings,
                stop_accepting: CancellationToken::new(),
                abort,
                connections: TaskTracker::new(),
            }),
        }
    }

    /// Brings back every stored mapping. Ports that bind now are serving when this
    /// returns; the others are retried in the background. Returns (restored, failed).
    pub async fn restore(&self) -> Result<(usize, usize), StoreError> {
        let stored = self.ctx.store.list().await?;
        let mut restored = 0;
        let mut entries = self.entries.lock().await;
        let mut failed = 0;
        for (spec, policy) in stored {
            let port = spec.source_port;
            let bind_error = Arc::new(Mutex::new(None));
            let listener = match bind(self.ctx.settings.bind_addr, port).await {
                Ok(l) => Some(l),
                Err(e) => {
                    failed += 1;
                    warn!(port, error = %e, "stored mapping cannot bind its port; will retry");
                    set(&bind_error, Some(describe_bind_error(&e)));
                    None
                }
            };
            restored += usize::from(listener.is_some());
            let entry = self.spawn_mapping(Arc::new(spec), policy, listener, bind_error);
            entries.insert(port, entry);
        }
        Ok((restored, failed))
    }

    pub async fn create(&self, req: NewMapping) -> Result<MappingView, MappingError> {
        let host = req.target_host.trim().to_string();
        if req.source_port == 0 {
            return Err(MappingError::Invalid("source_port must be between 1 and 65535".into()));
        }
        if req.target_port == 0 {
            return Err(MappingError::Invalid("target_port must be between 1 and 65535".into()));
        }
        if let Some((_, owner)) = self.ctx.settings.reserved_ports.iter().find(|(p, _)| *p == req.source_port) {
            return Err(MappingError::Invalid(format!("source_port {} is tunneld's own {owner} port", req.source_port)));
        }
        if host.is_empty() {
            return Err(MappingError::Invalid("target_host must not be empty".into()));
        }
        let client = match (req.use_tunnel, req.client) {
            (true, client) => Some(client.unwrap_or_else(|| crate::core::names::DEFAULT_CLIENT.to_string())),
            (false, None) => None,
            (false, Some(_)) => {
                return Err(MappingError::Invalid("client: only a tunneled mapping (use_tunnel: true) has a client".into()))
            }
        };
        // Host names and address literals are ASCII; anything else (bidi controls,
        // zero-width characters, homoglyphs) would only let a name display as
        // something it is not. International names go in their punycode form.
        if host.len() > 253 || !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%')) {
            return Err(MappingError::Invalid(format!(
                "target_host {host:?} is not a valid host name or address (letters, digits, `.-_:%` only; use punycode for international names)"
            )));
        }
        // Tunneled targets are resolved inside the client's network, which may know
        // names the server cannot; only direct targets must resolve here.
        let resolved = if req.use_tunnel { Vec::new() } else { resolve(&host, req.target_port).await? };

        let mut entries = self.entries.lock().await;
        // Checked under the mappings lock, which client removal takes too: a
        // mapping never names a client that is being removed.
        if let Some(name) = client.as_deref().filter(|name| !self.ctx.hub.knows(name)) {
            return Err(MappingError::Invalid(format!("client: no client named {name:?} (create it with /api/client/create)")));
        }
        if entries.contains_key(&req.source_port) {
            return Err(MappingError::Conflict(format!("port {} is already mapped", req.source_port)));
        }
        if let Some(why) = self.own_listener(&resolved, req.source_port, &entries) {
            return Err(MappingError::Invalid(format!("target {host}:{} is {why}: the mapping would forward to itself", req.target_port)));
        }
        let listener = bind(self.ctx.settings.bind_addr, req.source_port).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => MappingError::Conflict(format!("port {} is in use by another process", req.source_port)),
            _ => MappingError::Invalid(format!("cannot listen on port {}: {}", req.source_port, e)),
        })?;
        let spec = MappingSpec {
            source_port: req.source_port,
            target_host: host,
            target_port: req.target_port,
            use_tunnel: req.use_tunnel,
            client,
            created_at: crate::core::time::unix_now() as i64,
        };
        // On disk before anyone is told it exists.
        self.ctx
            .store
            .insert(spec.clone(), &req.policy)
            .await
            .map_err(MappingError::store(format!("save the mapping on port {}", spec.source_port)))?;
        info!(port = spec.source_port, target = %format!("{}:{}", spec.target_host, spec.target_port), use_tunnel = spec.use_tunnel, client = spec.client.as_deref().unwrap_or(""), "mapping created");
        let entry = self.spawn_mapping(Arc::new(spec), req.policy, Some(listener), Arc::new(Mutex::new(None)));
        let view = self.view(&entry);
        entries.insert(req.source_port, entry);
        Ok(view)
    }

    /// Changes a mapping's policy live: `update` is applied to a copy of the
    /// current one, which is stored, then put in force. Open connections stay and
    /// follow the new caps at once.
    pub async fn update(&self, port: u16, update: PolicyUpdate) -> Result<MappingView, MappingError> {
        let entries = self.entries.lock().await;
        let entry = entries.get(&port).ok_or(MappingError::NotFound(port))?;
        let mut policy = entry.policy.get();
        policy.apply(update);
        self.ctx
            .store
            .set_policy(port, &policy)
            .await
            .map_err(MappingError::store(format!("save the policy of the mapping on port {port}")))?;
        entry.policy.set(policy);
        info!(port, "mapping policy updated");
        Ok(self.view(entry))
    }

    /// Every mapping's live policy and quota gauge, for the quota check.
    pub async fn policies(&self) -> Vec<crate::server::quotas::MappingPolicy> {
        let entries = self.entries.lock().await;
        entries
            .iter()
            .map(|(port, e)| crate::server::quotas::MappingPolicy {
                port: *port,
                policy: e.policy.clone(),
                quota_used: e.quota_used.clone(),
            })
            .collect()
    }

    pub async fn remove(&self, port: u16) -> Result<(), MappingError> {
        let mut entries = self.entries.lock().await;
        if !entries.contains_key(&port) {
            return Err(MappingError::NotFound(port));
        }
        self.ctx.store.remove(port).await.map_err(MappingError::store(format!("remove the mapping on port {port}")))?;
        let removed = entries.get(&port).map(|e| e.spec.clone());
        if let Some(entry) = entries.remove(&port) {
            entry.cancel.cancel();
            // The listener is released when the task ends: wait, so the port can be
            // mapped again the moment this returns.
            let _ = entry.task.await;
        }
        if let Some(spec) = &removed {
            let [target, mode, client] = info_labels(spec);
            self.ctx.metrics.remove_mapping(port, [&target, &mode, &client]);
        }
        info!(port, "mapping removed");
        Ok(())
    }

    /// Registers a new tunnel client and returns its secret. The secret is stored
    /// (a client's answer is checked against it) but never shown again.
    pub async fn create_client(&self, name: &str) -> Result<String, MappingError> {
        if let Some(why) = crate::core::names::invalid_client_name(name) {
            return Err(MappingError::Invalid(format!("name: {why}")));
        }
        // Under the mappings lock: creation and removal of clients are serialised
        // with each other and with mappings that name them.
        let _entries = self.entries.lock().await;
        if self.ctx.hub.knows(name) {
            return Err(MappingError::Conflict(format!("a client named {name:?} already exists")));
        }
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let stored =
            crate::store::StoredClient { name: name.to_string(), secret: secret.clone(), created_at: crate::core::time::unix_now() as i64 };
        self.ctx.store.insert_client(stored).await.map_err(MappingError::store(format!("save the client {name:?}")))?;
        self.ctx.hub.add_client(name, secret.clone());
        info!(client = name, "tunnel client created");
        Ok(secret)
    }

    /// Forgets a client: it can no longer authenticate and its session ends now.
    /// While mappings name it this is a conflict, unless `force`: then they stay,
    /// waiting for a client of that name. Returns the ports of those mappings.
    pub async fn remove_client(&self, name: &str, force: bool) -> Result<Vec<u16>, MappingError> {
        if name == crate::core::names::DEFAULT_CLIENT {
            return Err(MappingError::Invalid(
                "the client `default` cannot be removed: its secret is server.secret; change that to lock it out".into(),
            ));
        }
        let entries = self.entries.lock().await;
        if !self.ctx.hub.knows(name) {
            return Err(MappingError::UnknownClient(name.to_string()));
        }
        let users: Vec<u16> = entries.values().filter(|e| e.spec.client.as_deref() == Some(name)).map(|e| e.spec.source_port).collect();
        if !users.is_empty() && !force {
            return Err(MappingError::Conflict(format!(
                "client {name:?} is used by the mappings on ports {users:?}: remove them first, or send \"force\": true to keep them waiting for this name"
            )));
        }
        self.ctx.store.remove_client(name).await.map_err(MappingError::store(format!("remove the client {name:?}")))?;
        self.ctx.hub.remove_client(name);
        info!(client = name, mappings_left_waiting = users.len(), "tunnel client removed");
        Ok(users)
    }

    /// How many mappings name each client.
    pub async fn mappings_per_client(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.entries.lock().await.values() {
            if let Some(client) = &entry.spec.client {
                *counts.entry(client.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// Why a direct target at `addrs` would be this daemon's own listener — the
    /// new mapping's port, another mapping's, the API's or the tunnel's, on any
    /// local address — or `None`. Dialing one makes each visitor a new visitor:
    /// a chain that ends only when the descriptors do.
    fn own_listener(&self, addrs: &[SocketAddr], source_port: u16, entries: &BTreeMap<u16, Entry>) -> Option<String> {
        let addr = addrs.iter().find(|a| is_local_address(a.ip()))?;
        let port = addr.port();
        if port == source_port {
            return Some(format!("this mapping's own port on a local address ({})", addr.ip()));
        }
        if entries.contains_key(&port) {
            return Some(format!("the mapping on port {port} (a local address)"));
        }
        let (_, owner) = self.ctx.settings.reserved_ports.iter().find(|(p, _)| *p == port)?;
        Some(format!("tunneld's own {owner} port"))
    }

    /// `(port, reason)` for every mapping that is not serving, for `/health`.
    pub async fn unbound(&self) -> Vec<(u16, String)> {
        let entries = self.entries.lock().await;
        entries.iter().filter_map(|(port, e)| e.bind_error.lock().ok().and_then(|b| b.clone()).map(|b| (*port, b))).collect()
    }

    pub async fn list(&self) -> Vec<MappingView> {
        self.entries.lock().await.values().map(|e| self.view(e)).collect()
    }

    fn view(&self, entry: &Entry) -> MappingView {
        let status = match entry.bind_error.lock().ok().and_then(|e| e.clone()) {
            Some(error) => MappingStatus::Error(error),
            None if entry.spec.client.as_deref().is_some_and(|c| !self.ctx.hub.connected(c)) => MappingStatus::WaitingForTunnel,
            None => MappingStatus::Active,
        };
        let policy = entry.policy.get();
        let has_quota = policy.quota.is_some();
        MappingView {
            spec: (*entry.spec).clone(),
            policy,
            quota_used: has_quota.then(|| entry.policy.quota_used()),
            quota_blocked: has_quota.then(|| entry.policy.quota_blocked()),
            status,
        }
    }

    /// Closes every listener, gives open connections `grace` to finish, then cuts
    /// the rest.
    pub async fn shutdown(&self, grace: Duration) {
        self.ctx.stop_accepting.cancel();
        let tasks: Vec<JoinHandle<()>> = {
            let mut entries = self.entries.lock().await;
            std::mem::take(&mut *entries).into_values().map(|e| e.task).collect()
        };
        for task in tasks {
            let _ = task.await;
        }
        self.ctx.connections.close();
        let open = self.ctx.connections.len();
        if open > 0 {
            info!(open, grace_secs = grace.as_secs(), "waiting for open connections to finish");
        }
        if tokio::time::timeout(grace, self.ctx.connections.wait()).await.is_err() {
            warn!(open = self.ctx.connections.len(), "grace period over; closing remaining connections");
            self.ctx.abort.cancel();
            self.ctx.connections.wait().await;
        }
    }

    fn spawn_mapping(
        &self,
        spec: Arc<MappingSpec>,
        policy: Policy,
        listener: Option<TcpListener>,
        bind_error: Arc<Mutex<Option<String>>>,
    ) -> Entry {
        let [target, mode, client] = info_labels(&spec);
        let metrics = self.ctx.metrics.add_mapping(spec.source_port, [&target, &mode, &client]);
        let policy = LivePolicy::new(policy);
        let quota_used = metrics.quota_used.clone();
        let cancel = self.ctx.abort.child_token();
        let task = tokio::spawn(run_mapping(
            self.ctx.clone(),
            spec.clone(),
            policy.clone(),
            listener,
            bind_error.clone(),
            cancel.clone(),
            metrics,
        ));
        Entry { spec, policy, quota_used, bind_error, cancel, task }
    }
}

/// `tunneld_mapping_info`'s labels besides the port: target, mode, client.
fn info_labels(spec: &MappingSpec) -> [String; 3] {
    let mode = if spec.use_tunnel { "tunnel" } else { "direct" };
    [format!("{}:{}", spec.target_host, spec.target_port), mode.into(), spec.client.clone().unwrap_or_default()]
}

fn set(slot: &Mutex<Option<String>>, value: Option<String>) {
    if let Ok(mut s) = slot.lock() {
        *s = value;
    }
}

fn describe_bind_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "port in use by another process".into(),
        _ => e.to_string(),
    }
}

async fn bind(addr: IpAddr, port: u16) -> std::io::Result<TcpListener> {
    socket::listen(SocketAddr::new(addr, port))
}

/// Whether `ip` is one of this host's own addresses (loopback, the wildcard, or
/// an interface address): an address this host can bind is one it answers on.
fn is_local_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, MappingError> {
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

/// The life of one mapping: (re)bind until it has its port, then accept until
/// removed or shut down.
async fn run_mapping(
    ctx: Arc<Ctx>,
    spec: Arc<MappingSpec>,
    policy: Arc<LivePolicy>,
    listener: Option<TcpListener>,
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
            match bind(ctx.settings.bind_addr, port).await {
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
    let slots = Arc::new(Semaphore::new(ctx.settings.max_connections));
    loop {
        let (visitor, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.stop_accepting.cancelled() => break,
            accepted = socket::accept(&listener, || metrics.refused_no_descriptors.inc()) => accepted,
        };
        // Armed from the start: however this connection ends early, the visitor
        // sees a reset, not an EOF that looks like a complete answer.
        relay::arm(&visitor);
        // Policy first, before any target or tunnel work: a refused visitor is
        // dropped here, armed, so it gets a reset at once.
        if !policy.admits(peer.ip()) {
            metrics.refused_acl.inc();
            debug!(port, %peer, "visitor refused by the mapping's allow/deny lists");
            continue;
        }
        if policy.quota_blocked() {
            metrics.refused_quota.inc();
            debug!(port, %peer, "visitor refused: the mapping's quota for this period is used up");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused_connection_limit.inc();
            debug!(port, %peer, limit = ctx.settings.max_connections, "visitor refused: mapping at its connection limit");
            continue;
        };
        let ctx2 = ctx.clone();
        let spec = spec.clone();
        let metrics = metrics.clone();
        let policy = policy.clone();
        let cancel = cancel.clone();
        ctx.connections.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = serve_visitor(&ctx2, &spec, &policy, &metrics, visitor, peer) => {}
                _ = cancel.cancelled() => debug!(port = spec.source_port, %peer, "connection closed: mapping removed or daemon stopping"),
            }
        });
    }
}

async fn serve_visitor(ctx: &Ctx, spec: &MappingSpec, policy: &LivePolicy, metrics: &MappingMetrics, visitor: TcpStream, peer: SocketAddr) {
    let port = spec.source_port;
    let _active = metrics.visitor_accepted();
    socket::tune(&visitor);
    let result = if spec.use_tunnel {
        tunneled(ctx, spec, policy, metrics, &visitor).await
    } else {
        direct(ctx, spec, policy, metrics, &visitor).await
    };
    match result {
        Ok((sent, received)) => debug!(port, %peer, sent, received, "connection finished"),
        Err(VisitorError::NoDescriptors(e)) => {
            metrics.refused_no_descriptors.inc();
            debug!(port, %peer, error = %e, "visitor refused: out of file descriptors");
        }
        Err(VisitorError::Target(e)) => {
            metrics.connect_errors.inc();
            warn!(port, %peer, target = %format!("{}:{}", spec.target_host, spec.target_port), error = %e, "visitor refused: target unreachable");
        }
        Err(VisitorError::Relay(e)) => debug!(port, %peer, error = %e, "connection ended with error"),
    }
}

/// Why a visitor's connection ended early: the target could not be reached
/// (counted as a connect error), or the relay failed midway.
enum VisitorError {
    Target(String),
    /// This process is out of descriptors: a local limit, counted as a refusal,
    /// not as the target's fault.
    NoDescriptors(std::io::Error),
    Relay(std::io::Error),
}

async fn direct(
    ctx: &Ctx,
    spec: &MappingSpec,
    policy: &LivePolicy,
    metrics: &MappingMetrics,
    visitor: &TcpStream,
) -> Result<(u64, u64), VisitorError> {
    let target = socket::connect(&spec.target_host, spec.target_port, ctx.settings.connect_timeout).await.map_err(|e| {
        match socket::out_of_descriptors(&e) {
            true => VisitorError::NoDescriptors(e),
            false => VisitorError::Target(e.to_string()),
        }
    })?;
    relay::arm(&target);
    let (up, down) = policy.capped(metrics.meters());
    relay::relay(visitor, &target, &up, &down, ctx.settings.idle_timeout).await.map_err(VisitorError::Relay)
}

/// The visitor's bytes start flowing to the client together with the `connect`
/// request instead of after its answer, which saves a round trip on every new
/// connection; the answer is read first in the other direction, and a failure
/// there ends the connection and counts as a connect error. After a clean
/// exchange the data channel goes back to the pool for the next visitor.
async fn tunneled(
    ctx: &Ctx,
    spec: &MappingSpec,
    policy: &LivePolicy,
    metrics: &MappingMetrics,
    visitor: &TcpStream,
) -> Result<(u64, u64), VisitorError> {
    let client = spec.client.as_deref().unwrap_or(crate::core::names::DEFAULT_CLIENT);
    let (channel, lease, sent_ahead) =
        ctx.hub.open(client, &spec.target_host, spec.target_port, visitor).await.map_err(|e| VisitorError::Target(e.to_string()))?;
    // User bytes only: the tunnel's wire bytes are counted under the channel.
    let (up, down) = policy.capped(metrics.meters());
    // Visitor bytes sent ahead of the answer reach the target only if it
    // answers: they are counted then.
    let (up, reached_target) = up.held_behind(Meter::default());
    let answer = exchange::Answer::Expected { reached_target: &reached_target, sent_ahead };
    let relayed = tokio::select! {
        relayed = exchange::relay(channel, visitor, &up, &down, answer, ctx.settings.idle_timeout) => relayed,
        // A removed client's access ends with its exchanges, not when they finish.
        _ = lease.revoked() => return Err(VisitorError::Relay(std::io::Error::other(format!("client {client} was removed")))),
    };
    match relayed {
        Ok((channel, sent, received)) => {
            lease.give_back(channel);
            Ok((sent, received))
        }
        Err(ExchangeError::Refused(e)) => Err(VisitorError::Target(e)),
        Err(ExchangeError::Socket(e)) => Err(VisitorError::Relay(e)),
        Err(e) => Err(VisitorError::Relay(std::io::Error::other(e))),
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
