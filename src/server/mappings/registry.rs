//! The registry of mappings: the one lock under which they are created,
//! restored, changed and removed, stored before anyone is told, and shown.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::context::{Ctx, RefusalLog, Settings, REFUSAL_LOG_INTERVAL};
use super::error::MappingError;
use super::group::Group;
use super::health::{Condition, HealthWindow};
use super::listener::{bind, describe_bind_error, run_mapping, set, Bound, DIRECT_VISITOR_DESCRIPTORS, TUNNELED_VISITOR_DESCRIPTORS};
use super::target::{self, ResolvedHere};
use super::view::{MappingStatus, MappingView};
use super::visitor::Admission;
use crate::core::names::DEFAULT_CLIENT;
use crate::core::protocol::{MappingKey, Protocol};
use crate::core::sync::{lock, write};
use crate::net::descriptors::DescriptorBudget;
use crate::net::socket;
use crate::policy::{invalid_group, Balance, HealthCheck, LivePolicy, Policy, PolicyUpdate, QuotaPeriod};
use crate::server::connections::Connections;
use crate::server::hub::TunnelHub;
use crate::store::{MappingSpec, Source, Store, StoreError};
use crate::telemetry::Metrics;

/// What the API asks for.
#[derive(Debug, Clone)]
pub struct NewMapping {
    pub source_port: u16,
    /// TCP (the default) or UDP.
    pub protocol: Protocol,
    pub target_host: String,
    pub target_port: u16,
    pub use_tunnel: bool,
    /// Which client reaches the target (`None`: `default`); tunneled mappings only.
    pub client: Option<String>,
    /// Several clients that reach the target (a group); instead of `client`,
    /// or starting with it.
    pub clients: Option<Vec<String>>,
    /// How a group's visitors are shared (default: failover, in list order).
    pub balance: Option<Balance>,
    /// Active checks of the target through each client of the group.
    pub health_check: Option<HealthCheck>,
    pub policy: Policy,
}

/// What `/api/mapping/update` changes in a tunneled mapping's group; absent
/// fields (`None`) stay, `health_check: Some(None)` removes the check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupUpdate {
    pub clients: Option<Vec<String>>,
    pub balance: Option<Balance>,
    pub health_check: Option<Option<HealthCheck>>,
}

impl GroupUpdate {
    /// Whether it changes anything at all.
    pub fn is_empty(&self) -> bool {
        self.clients.is_none() && self.balance.is_none() && self.health_check.is_none()
    }
}

/// The clients of a new mapping: `clients`, `[client]`, `[default]` for a
/// tunneled one, none for a direct one; refused when they do not fit.
fn group_of(use_tunnel: bool, client: Option<String>, clients: Option<Vec<String>>) -> Result<Vec<String>, MappingError> {
    let group = match (use_tunnel, client, clients) {
        (false, None, None) => return Ok(Vec::new()),
        (false, _, _) => {
            return Err(MappingError::Invalid("client, clients: only a tunneled mapping (use_tunnel: true) has clients".into()))
        }
        (true, None, None) => vec![DEFAULT_CLIENT.to_string()],
        (true, Some(client), None) => vec![client],
        (true, None, Some(clients)) => clients,
        (true, Some(client), Some(clients)) if clients.first() == Some(&client) => clients,
        (true, Some(client), Some(clients)) => {
            return Err(MappingError::Invalid(format!(
                "client {client:?} and clients {clients:?} disagree: give clients alone (client is its first one)"
            )))
        }
    };
    match invalid_group(&group) {
        Some(why) => Err(MappingError::Invalid(why)),
        None => Ok(group),
    }
}

fn check_health_check(check: Option<&HealthCheck>) -> Result<(), MappingError> {
    match check.and_then(HealthCheck::invalid) {
        Some(why) => Err(MappingError::Invalid(why)),
        None => Ok(()),
    }
}

pub struct Mappings {
    pub(super) entries: tokio::sync::Mutex<BTreeMap<MappingKey, Entry>>,
    pub(super) ctx: Arc<Ctx>,
    /// What the config file declares, as last reconciled.
    pub(super) declared: Mutex<DeclaredState>,
}

/// What the registry remembers of the last reconciled declaration (see
/// `declared`, which reconciles).
#[derive(Debug, Default)]
pub(super) struct DeclaredState {
    pub(super) file: Option<std::path::PathBuf>,
    /// Declared clients and their secrets (to see a rotated one).
    pub(super) clients: BTreeMap<String, crate::core::secret::Secret>,
}

/// A request that passed the checks that need no lock, with its target
/// resolved (see [`Mappings::prepare`]).
pub(super) struct Checked {
    pub(super) req: NewMapping,
    resolved: Vec<std::net::SocketAddr>,
    resolved_here: Vec<std::net::SocketAddr>,
}

/// Why a UDP mapping takes no health check: a check is a TCP connect to the
/// target through a client, which says nothing of a UDP service.
const UDP_NO_HEALTH_CHECK: &str =
    "health_check: a check is a TCP connect to the target; a UDP mapping has none (its clients serve in balance order)";

/// The checks a mapping request needs on its own, shared by the API and the
/// config file's `[[mappings]]` (`tunneld check-config` too): ports, a valid
/// target host (trimmed here), and a client only when tunneled (`default`
/// when it names none).
pub(crate) fn check_request(req: &mut NewMapping) -> Result<(), MappingError> {
    req.target_host = req.target_host.trim().to_string();
    target::check_host(&req.target_host)?;
    if req.source_port == 0 {
        return Err(MappingError::Invalid("source_port must be between 1 and 65535".into()));
    }
    if req.target_port == 0 {
        return Err(MappingError::Invalid("target_port must be between 1 and 65535".into()));
    }
    if req.protocol == Protocol::Udp && req.policy.proxy_protocol.is_some() {
        return Err(MappingError::Invalid("proxy_protocol: a PROXY header is sent on TCP connections; a UDP mapping has none".into()));
    }
    if req.protocol == Protocol::Udp && req.health_check.is_some() {
        return Err(MappingError::Invalid(UDP_NO_HEALTH_CHECK.into()));
    }
    let clients = group_of(req.use_tunnel, req.client.take(), req.clients.take())?;
    if !req.use_tunnel && (req.balance.is_some() || req.health_check.is_some()) {
        return Err(MappingError::Invalid(
            "balance, health_check: only a tunneled mapping (use_tunnel: true) has clients to balance or check".into(),
        ));
    }
    check_health_check(req.health_check.as_ref())?;
    // From here on `clients` is the whole group and `client` its first (both
    // `None` for a direct mapping), so checking again finds the same.
    req.client = clients.first().cloned();
    req.clients = (!clients.is_empty()).then_some(clients);
    Ok(())
}

pub(super) struct Entry {
    pub(super) spec: Arc<MappingSpec>,
    /// Its clients (tunneled), the one a visitor goes to, their checks.
    pub(super) group: Arc<Group>,
    policy: Arc<LivePolicy>,
    quota_used: prometheus::Gauge,
    quota_bytes: prometheus::IntGauge,
    /// Its counters over the recent window, for its health.
    health: Arc<HealthWindow>,
    /// `tunneld_mapping_info`'s labels now (the description changes live).
    info: Mutex<[String; 4]>,
    bind_error: Arc<Mutex<Option<String>>>,
    /// Tunneled: the target as this host resolves it, for the loop check.
    resolved: Arc<ResolvedHere>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Entry {
    /// Its policy now.
    pub(super) fn policy(&self) -> Policy {
        self.policy.get()
    }
}

impl Mappings {
    pub(crate) fn new(store: Store, metrics: Arc<Metrics>, hub: Arc<TunnelHub>, settings: Settings, live: Arc<Connections>) -> Mappings {
        let abort = CancellationToken::new();
        let descriptors = DescriptorBudget::for_this_process();
        info!(
            descriptor_limit = socket::descriptor_limit().unwrap_or(u64::MAX),
            visitor_descriptors = descriptors.capacity(),
            direct_visitors = descriptors.capacity() / DIRECT_VISITOR_DESCRIPTORS as usize,
            tunneled_visitors = descriptors.capacity() / TUNNELED_VISITOR_DESCRIPTORS as usize,
            "visitor connections of all mappings share this many descriptors; the rest of the open-file limit is kept for the API, the tunnel and the store"
        );
        let ctx = Arc::new(Ctx {
            store,
            metrics,
            hub,
            settings,
            stop_accepting: CancellationToken::new(),
            abort,
            connections: TaskTracker::new(),
            mapped_ports: Default::default(),
            descriptors,
            refusals: Mutex::new(RefusalLog::new(REFUSAL_LOG_INTERVAL)),
            live,
        });
        tokio::spawn(ctx.clone().summarise_refusals());
        Mappings { entries: tokio::sync::Mutex::new(BTreeMap::new()), ctx, declared: Mutex::default() }
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
            let key = spec.key();
            let bind_error = Arc::new(Mutex::new(None));
            let listener = match bind(self.ctx.settings.bind_addr, key).await {
                Ok(l) => Some(l),
                Err(e) => {
                    failed += 1;
                    warn!(port, protocol = %key.protocol, error = %e, "stored mapping cannot bind its port; will retry");
                    set(&bind_error, Some(describe_bind_error(&e)));
                    None
                }
            };
            restored += usize::from(listener.is_some());
            let resolved = ResolvedHere::soon(&spec);
            let entry = self.spawn_mapping(Arc::new(spec), policy, listener, bind_error, resolved);
            write(&self.ctx.mapped_ports).insert(key);
            entries.insert(key, entry);
        }
        Ok((restored, failed))
    }

    pub async fn create(&self, req: NewMapping) -> Result<MappingView, MappingError> {
        let checked = self.prepare(req, true).await?;
        let req = &checked.req;
        let mut entries = self.entries.lock().await;
        // Checked under the mappings lock, which client removal takes too: a
        // mapping never names a client that is being removed.
        if let Some(name) = req.clients.iter().flatten().find(|name| !self.ctx.hub.knows(name)) {
            return Err(MappingError::NamesUnknownClient(name.to_string()));
        }
        let key = MappingKey { port: req.source_port, protocol: req.protocol };
        if entries.contains_key(&key) {
            return Err(MappingError::Conflict(format!("{} port {} is already mapped", key.protocol.as_str().to_uppercase(), key.port)));
        }
        self.check_loops(&checked, |port| entries.contains_key(&MappingKey { port, protocol: key.protocol }))?;
        let listener = bind(self.ctx.settings.bind_addr, key).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                MappingError::Conflict(format!("{} port {} is in use by another process", key.protocol.as_str().to_uppercase(), key.port))
            }
            _ => MappingError::Invalid(format!("cannot listen on {} port {}: {}", key.protocol, key.port, e)),
        })?;
        self.install(&mut entries, checked, Source::Api, Some(listener), None).await
    }

    /// The checks a request needs besides the registry's state, and its target
    /// resolved: what [`Mappings::install`] takes. A direct target that does
    /// not resolve is refused when `must_resolve` (the API's create, where the
    /// operator is there to see it); a declared one is served anyway, as a
    /// stored one is at start: DNS may not be up yet at boot.
    pub(super) async fn prepare(&self, mut req: NewMapping, must_resolve: bool) -> Result<Checked, MappingError> {
        check_request(&mut req)?;
        // The API's and the tunnel's ports are TCP ports: a UDP mapping may take the number.
        let reserved = self.reserved(req.protocol);
        if let Some((_, owner)) = reserved.iter().find(|(p, _)| *p == req.source_port) {
            return Err(MappingError::Invalid(format!("source_port {} is tunneld's own {owner} port", req.source_port)));
        }
        // Tunneled targets are resolved inside the client's network, which may know
        // names the server cannot; only direct targets must resolve here.
        let resolved = match req.use_tunnel {
            true => Vec::new(),
            false => match target::resolve(&req.target_host, req.target_port).await {
                Ok(addrs) => addrs,
                Err(e) if must_resolve => return Err(e),
                Err(e) => {
                    warn!(port = req.source_port, error = %e, "declared mapping's target does not resolve now; serving it anyway");
                    Vec::new()
                }
            },
        };
        // Where a tunneled target is as this host sees it: what a client on this
        // host reaches, checked against this daemon's own listeners. Looked up
        // now only when such a client is connected (it may be refused);
        // otherwise soon after, so a name only the client's network knows
        // costs no wait.
        let client_here = req.clients.iter().flatten().any(|name| self.ctx.hub.peer_on_this_host(name).is_some());
        let resolved_here =
            if req.use_tunnel && client_here { target::resolve_here(&req.target_host, req.target_port).await } else { Vec::new() };
        Ok(Checked { req, resolved, resolved_here })
    }

    /// Refuses a mapping that would forward to itself: directly to one of this
    /// daemon's listeners (`mapped` says which ports are mappings'), or through
    /// a client on this host.
    pub(super) fn check_loops(&self, checked: &Checked, mapped: impl Fn(u16) -> bool) -> Result<(), MappingError> {
        let req = &checked.req;
        let reserved = self.reserved(req.protocol);
        if let Some(why) = target::own_listener(&checked.resolved, req.source_port, &mapped, reserved) {
            return Err(MappingError::Invalid(format!(
                "target {}:{} is {why}: the mapping would forward to itself",
                req.target_host, req.target_port
            )));
        }
        for (name, peer) in req.clients.iter().flatten().filter_map(|name| Some((name.as_str(), self.ctx.hub.peer_on_this_host(name)?))) {
            if let Some(why) = target::through_client_on_this_host(&checked.resolved_here, req.source_port, name, peer, &mapped, reserved) {
                return Err(MappingError::Invalid(format!(
                    "target {}:{} is {why}: the mapping would forward to itself",
                    req.target_host, req.target_port
                )));
            }
        }
        Ok(())
    }

    /// This daemon's own ports a mapping of `protocol` must not take nor target:
    /// the API and the tunnel listen on TCP.
    fn reserved(&self, protocol: Protocol) -> &[(u16, &'static str)] {
        match protocol {
            Protocol::Tcp => &self.ctx.settings.reserved_ports,
            Protocol::Udp => &[],
        }
    }

    /// Stores a checked mapping (before anyone is told it exists) and starts
    /// it: on `listener`, or, without one, retrying its port in the background
    /// with `bind_error` shown meanwhile.
    pub(super) async fn install(
        &self,
        entries: &mut BTreeMap<MappingKey, Entry>,
        checked: Checked,
        source: Source,
        listener: Option<Bound>,
        bind_error: Option<String>,
    ) -> Result<MappingView, MappingError> {
        let Checked { req, resolved_here, .. } = checked;
        let spec = MappingSpec {
            source_port: req.source_port,
            protocol: req.protocol,
            target_host: req.target_host,
            target_port: req.target_port,
            use_tunnel: req.use_tunnel,
            client: req.client,
            clients: req.clients.unwrap_or_default(),
            balance: req.balance.unwrap_or_default(),
            health_check: req.health_check,
            created_at: crate::core::time::unix_now() as i64,
            source,
        };
        self.ctx
            .store
            .insert(spec.clone(), &req.policy)
            .await
            .map_err(MappingError::store(format!("save the mapping on port {}", spec.source_port)))?;
        info!(port = spec.source_port, protocol = %spec.protocol, target = %format!("{}:{}", spec.target_host, spec.target_port), use_tunnel = spec.use_tunnel, clients = %spec.clients.join(","), balance = spec.balance.as_str(), source = source.as_str(), "mapping created");
        let resolved = match resolved_here.is_empty() {
            true => ResolvedHere::soon(&spec),
            false => Arc::new(ResolvedHere::new(resolved_here)),
        };
        let entry = self.spawn_mapping(Arc::new(spec), req.policy, listener, Arc::new(Mutex::new(bind_error)), resolved);
        let key = entry.spec.key();
        write(&self.ctx.mapped_ports).insert(key);
        let view = self.view(&entry);
        entries.insert(key, entry);
        Ok(view)
    }

    /// Changes a mapping's policy live: `update` is applied to a copy of the
    /// current one, which is stored, then put in force. Open connections stay and
    /// follow the new caps at once. An update that changes no value touches
    /// nothing: nothing is stored, nothing is put in force, nothing announced.
    pub async fn update(&self, key: MappingKey, update: PolicyUpdate) -> Result<MappingView, MappingError> {
        let entries = self.entries.lock().await;
        let entry = entries.get(&key).ok_or(MappingError::NotFound(key))?;
        self.refuse_declared(entry)?;
        if key.protocol == Protocol::Udp && matches!(update.proxy_protocol, Some(Some(_))) {
            return Err(MappingError::Invalid("proxy_protocol: a PROXY header is sent on TCP connections; a UDP mapping has none".into()));
        }
        self.update_entry(entry, update).await
    }

    /// [`Mappings::update`] on an entry the caller holds the lock for: the one
    /// path by which a policy changes live, from the API or from the config file.
    pub(super) async fn update_entry(&self, entry: &Entry, update: PolicyUpdate) -> Result<MappingView, MappingError> {
        let port = entry.spec.source_port;
        let key = entry.spec.key();
        let mut policy = entry.policy.get();
        let changed = policy.apply(update);
        if changed.is_empty() {
            debug!(port, "mapping policy update changes nothing");
            return Ok(self.view(entry));
        }
        self.ctx
            .store
            .set_policy(key, &policy)
            .await
            .map_err(MappingError::store(format!("save the policy of the mapping on port {port}")))?;
        entry.policy.set(policy);
        // Visitors refused under the old policy say nothing about the new one.
        entry.health.restart(std::time::Instant::now());
        let new = info_labels(&entry.spec, &entry.policy.get());
        {
            let mut info = lock(&entry.info);
            if *info != new {
                self.ctx.metrics.relabel_mapping(key, labels(&info), labels(&new));
                *info = new;
            }
        }
        info!(port, changed = %changed.join(", "), "mapping policy updated");
        Ok(self.view(entry))
    }

    /// Changes a tunneled mapping's group live: its clients, its balance mode,
    /// its health check. Open connections stay with the client that serves
    /// them; new visitors follow the new group at once. A change to nothing
    /// touches nothing.
    pub async fn update_group(&self, key: MappingKey, update: GroupUpdate) -> Result<MappingView, MappingError> {
        let mut entries = self.entries.lock().await;
        let entry = entries.get_mut(&key).ok_or(MappingError::NotFound(key))?;
        if update.is_empty() {
            return Ok(self.view(entry));
        }
        self.refuse_declared(entry)?;
        self.change_group(entry, update).await?;
        Ok(self.view(entry))
    }

    /// [`Mappings::update_group`] on an entry the caller holds the lock for:
    /// the one path by which a group changes live, from the API or from the
    /// config file. Whether anything changed.
    pub(super) async fn change_group(&self, entry: &mut Entry, update: GroupUpdate) -> Result<bool, MappingError> {
        let port = entry.spec.source_port;
        if entry.spec.protocol == Protocol::Udp && matches!(update.health_check, Some(Some(_))) {
            return Err(MappingError::Invalid(UDP_NO_HEALTH_CHECK.into()));
        }
        if !entry.spec.use_tunnel {
            return Err(MappingError::Invalid(format!(
                "clients, balance, health_check: the mapping on port {port} is direct; only a tunneled mapping has clients"
            )));
        }
        let mut spec = (*entry.spec).clone();
        if let Some(clients) = update.clients {
            if let Some(why) = invalid_group(&clients) {
                return Err(MappingError::Invalid(why));
            }
            if let Some(name) = clients.iter().find(|name| !self.ctx.hub.knows(name)) {
                return Err(MappingError::NamesUnknownClient(name.to_string()));
            }
            spec.client = clients.first().cloned();
            spec.clients = clients;
        }
        if let Some(balance) = update.balance {
            spec.balance = balance;
        }
        if let Some(check) = update.health_check {
            check_health_check(check.as_ref())?;
            spec.health_check = check;
        }
        if spec == *entry.spec {
            debug!(port, "mapping group update changes nothing");
            return Ok(false);
        }
        self.ctx.store.set_group(&spec).await.map_err(MappingError::store(format!("save the clients of the mapping on port {port}")))?;
        entry.group.configure(&spec);
        let new = info_labels(&spec, &entry.policy.get());
        {
            let mut info = lock(&entry.info);
            if *info != new {
                self.ctx.metrics.relabel_mapping(entry.spec.key(), labels(&info), labels(&new));
                *info = new;
            }
        }
        info!(port, clients = %spec.clients.join(","), balance = spec.balance.as_str(), health_check = spec.health_check.is_some(), "mapping group updated");
        entry.spec = Arc::new(spec);
        Ok(true)
    }

    /// Every mapping's live policy and quota gauge, for the quota check.
    pub async fn policies(&self) -> Vec<crate::server::quotas::MappingPolicy> {
        let entries = self.entries.lock().await;
        entries
            .iter()
            .map(|(key, e)| crate::server::quotas::MappingPolicy {
                key: *key,
                policy: e.policy.clone(),
                quota_used: e.quota_used.clone(),
                quota_bytes: e.quota_bytes.clone(),
            })
            .collect()
    }

    pub async fn remove(&self, key: MappingKey) -> Result<(), MappingError> {
        let mut entries = self.entries.lock().await;
        let entry = entries.get(&key).ok_or(MappingError::NotFound(key))?;
        self.refuse_declared(entry)?;
        self.remove_entry(&mut entries, key).await
    }

    /// Removes the mapping on `port` (which exists: the caller holds the lock
    /// and looked): stored first, then its listener closed and its connections cut.
    pub(super) async fn remove_entry(&self, entries: &mut BTreeMap<MappingKey, Entry>, key: MappingKey) -> Result<(), MappingError> {
        let port = key.port;
        self.ctx.store.remove(key).await.map_err(MappingError::store(format!("remove the mapping on port {key}")))?;
        write(&self.ctx.mapped_ports).remove(&key);
        if let Some(entry) = entries.remove(&key) {
            entry.cancel.cancel();
            // The listener is released when the task ends: wait, so the port can be
            // mapped again the moment this returns.
            let _ = entry.task.await;
            entry.group.remove_series();
            let info = lock(&entry.info).clone();
            self.ctx.metrics.remove_mapping(key, labels(&info));
        }
        info!(port, protocol = %key.protocol, "mapping removed");
        Ok(())
    }

    /// `(port, reason)` for every mapping that is not serving, for `/health`.
    pub async fn unbound(&self) -> Vec<(MappingKey, String)> {
        let entries = self.entries.lock().await;
        entries.iter().filter_map(|(key, e)| lock(&e.bind_error).clone().map(|b| (*key, b))).collect()
    }

    /// `(port, client, reason)` for every tunneled mapping that refuses its
    /// visitors because it would forward to itself through a client on this host.
    pub async fn looping(&self) -> Vec<(MappingKey, String, String)> {
        let entries = self.entries.lock().await;
        entries
            .iter()
            .filter_map(|(port, e)| {
                let (client, why) = self.ctx.tunnel_loop(&e.spec, &e.group.members(), &e.resolved)?;
                Some((*port, client.to_string(), why))
            })
            .collect()
    }

    pub async fn list(&self) -> Vec<MappingView> {
        self.entries.lock().await.values().map(|e| self.view(e)).collect()
    }

    /// Samples every mapping's counters for its health window and exports each
    /// one's health as `tunneld_mapping_health`; the watcher calls it every second.
    pub async fn sample_health(&self) {
        let now = std::time::Instant::now();
        let entries = self.entries.lock().await;
        for (key, entry) in entries.iter() {
            entry.health.sample(now);
            let view = self.view(entry);
            self.ctx.metrics.set_mapping_health(*key, view.health.health.as_str());
        }
    }

    fn view(&self, entry: &Entry) -> MappingView {
        let bind_error = lock(&entry.bind_error).clone();
        // A group waits only when none of its clients is connected.
        let members = entry.group.members();
        let none_connected = entry.spec.use_tunnel && !members.list.iter().any(|m| self.ctx.hub.connected(&m.name));
        let away = none_connected.then(|| members.list.iter().map(|m| m.name.to_string()).collect::<Vec<_>>().join(" or "));
        let client_away = away.as_deref();
        let looping = self.ctx.tunnel_loop(&entry.spec, &members, &entry.resolved).map(|(_, why)| why);
        let status = match (&bind_error, client_away, &looping) {
            (Some(error), _, _) => MappingStatus::Error(error.clone()),
            (None, Some(_), _) => MappingStatus::WaitingForTunnel,
            (None, None, Some(why)) => MappingStatus::Error(format!("refusing visitors: {why}")),
            (None, None, None) => MappingStatus::Active,
        };
        let policy = entry.policy.get();
        let has_quota = policy.quota.is_some();
        let quota_blocked = policy.quota.filter(|_| entry.policy.quota_blocked()).map(|q| {
            format!(
                "its quota of {} bytes per {} is used up ({} bytes): new visitors are refused until the period ends",
                q.bytes,
                match q.period {
                    QuotaPeriod::Day => "day",
                    QuotaPeriod::Month => "month",
                },
                entry.policy.quota_used()
            )
        });
        let health = entry.health.judge(Condition {
            port: entry.spec.source_port,
            bind_error: bind_error.as_deref(),
            client_away,
            quota_blocked,
            looping: looping.as_deref(),
            target: format!("{}:{}", entry.spec.target_host, entry.spec.target_port),
        });
        MappingView {
            spec: (*entry.spec).clone(),
            policy,
            quota_used: has_quota.then(|| entry.policy.quota_used()),
            quota_blocked: has_quota.then(|| entry.policy.quota_blocked()),
            status,
            health,
            members: entry.group.view(&self.ctx.hub),
        }
    }

    /// Every open visitor connection, and the log of ended ones.
    pub(crate) fn connections(&self) -> &Arc<Connections> {
        &self.ctx.live
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
        self.ctx.flush_refusals();
    }

    fn spawn_mapping(
        &self,
        spec: Arc<MappingSpec>,
        policy: Policy,
        listener: Option<Bound>,
        bind_error: Arc<Mutex<Option<String>>>,
        resolved: Arc<ResolvedHere>,
    ) -> Entry {
        let info = info_labels(&spec, &policy);
        let metrics = self.ctx.metrics.add_mapping(spec.key(), labels(&info));
        let policy = LivePolicy::new(policy);
        let quota_used = metrics.quota_used.clone();
        let quota_bytes = metrics.quota_bytes.clone();
        let health = Arc::new(HealthWindow::new(metrics.clone()));
        let cancel = self.ctx.abort.child_token();
        let group = Arc::new(Group::new(&spec, self.ctx.metrics.clone()));
        if spec.use_tunnel {
            let checks = group.clone().run_health_checks(self.ctx.hub.clone(), spec.target_host.clone(), spec.target_port, cancel.clone());
            tokio::spawn(checks);
        }
        let task = tokio::spawn(run_mapping(
            self.ctx.clone(),
            spec.clone(),
            Admission { policy: policy.clone(), resolved: resolved.clone(), health: health.clone(), group: group.clone() },
            listener,
            bind_error.clone(),
            cancel.clone(),
            metrics,
        ));
        Entry { spec, group, policy, quota_used, quota_bytes, health, info: Mutex::new(info), bind_error, resolved, cancel, task }
    }
}

/// `tunneld_mapping_info`'s labels besides the port: target, mode, client (a
/// group's clients joined by commas), description.
fn info_labels(spec: &MappingSpec, policy: &Policy) -> [String; 4] {
    let mode = if spec.use_tunnel { "tunnel" } else { "direct" };
    [
        format!("{}:{}", spec.target_host, spec.target_port),
        mode.into(),
        spec.clients.join(","),
        policy.description.clone().unwrap_or_default(),
    ]
}

fn labels(info: &[String; 4]) -> [&str; 4] {
    [&info[0], &info[1], &info[2], &info[3]]
}
