//! The server role: the tunnel hub that clients dial, the mappings and what
//! happens to each visitor, quotas and the events watcher, started on listeners
//! the caller has already bound (so tests can use port 0) and stopped by a
//! shutdown token.
//!
//! May import every layer below the roles: `core`, `config`, `telemetry`,
//! `net`, `tunnel`, `policy`, `store`, `history`, `events`, `systemd`.

pub(crate) mod connections;
pub(crate) mod hub;
pub(crate) mod mappings;
pub(crate) mod quotas;
pub(crate) mod throttle;
pub(crate) mod watcher;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::core::secret::Secret;
use crate::events::Events;
use crate::net::socket;

use crate::history::{self, Recorder};
use crate::store::connection_log::LogBounds;
use crate::store::Store;
use crate::systemd;
use crate::telemetry::Metrics;
use connections::Connections;
use hub::{HubSettings, TunnelHub};
use mappings::{Declaration, MappingError, Mappings, Reconciled, Settings};

/// The config file's `[[mappings]]`/`[[clients]]` cannot be served as they
/// are (one would forward to itself, say): at start the daemon exits as for
/// any bad configuration.
#[derive(Debug, thiserror::Error)]
#[error("the config file's declarations cannot be served: {0}")]
pub(crate) struct DeclarationRefused(pub MappingError);

/// The server's two fixed listeners.
pub(crate) struct Listeners {
    pub api: TcpListener,
    pub tunnel: TcpListener,
}

impl Listeners {
    /// Binds both from the config, with the address in any error.
    pub(crate) async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let api = socket::listen(config.api.listen).with_context(|| format!("cannot bind api.listen {}", config.api.listen))?;
        let tunnel = socket::listen(config.server.tunnel_listen)
            .with_context(|| format!("cannot bind server.tunnel_listen {}", config.server.tunnel_listen))?;
        Ok(Listeners { api, tunnel })
    }
}

/// A running server role: what the API serves from, and the tasks that
/// [`Server::stop`] drains.
pub(crate) struct Server {
    pub mappings: Arc<Mappings>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<TunnelHub>,
    pub recorder: Arc<Recorder>,
    /// Mappings serving when [`start`] returned, and those waiting for their port.
    pub restored: usize,
    pub waiting: usize,
    /// Where events go (the reconciles of later reloads report there too).
    pub events: Arc<Events>,
    tunnel_task: JoinHandle<()>,
    recorder_task: JoinHandle<()>,
    grace: Duration,
}

/// Starts the server role on a bound tunnel listener: state, history, the
/// tunnel hub, the stored mappings, the events watcher. It runs until
/// `shutdown` is cancelled; then [`Server::stop`] drains it. `reserved_ports`
/// (the API's) are never mappable.
/// `declaration` (the config file's mappings and clients) is reconciled with
/// the stored ones before the tunnel port serves, so a declared client is
/// known from the first handshake.
pub(crate) async fn start(
    config: &Config,
    declaration: Declaration,
    tunnel: TcpListener,
    api_port: u16,
    shutdown: CancellationToken,
) -> anyhow::Result<Server> {
    let state_dir = config::state_dir(&config.server);
    let store = Store::open(&state_dir)?;
    let secret = match config.server.secret.clone() {
        s if !s.is_empty() => s,
        _ => load_or_generate_secret(&state_dir)?,
    };

    let metrics = Arc::new(Metrics::new());
    // Validated when the configuration was loaded.
    let history_settings = config.history.settings()?;
    let recorder = Arc::new(
        Recorder::new(store.clone(), metrics.clone(), history_settings, history::system_clock())
            .await
            .context("cannot read the stored traffic history")?,
    );
    let heartbeat = Duration::from_secs(config.server.heartbeat_interval_secs);
    let connect_timeout = Duration::from_secs(config.server.connect_timeout_secs);
    let tunnel_addr = tunnel.local_addr()?;
    let tls = tunnel_tls(config, &state_dir, tunnel_addr)?;
    // The same certificate on the tunnel port number over UDP, for UDP
    // mappings' datagrams; without it clients fall back to framed datagrams.
    let quic = tls.as_ref().and_then(|tls| match crate::net::quic::server(tls, tunnel_addr) {
        Ok(endpoint) => Some(endpoint),
        Err(e) => {
            warn!(port = tunnel_addr.port(), error = %format!("{e:#}"), "no QUIC on the tunnel port over UDP; clients carry UDP mappings' datagrams framed");
            None
        }
    });
    let tls = tls.map(crate::net::tls::ServerTls::new);
    let pool_idle = Duration::from_secs(config.server.pool_idle_secs);
    let stored_clients = store.clients().await.context("cannot read the stored tunnel clients")?;
    let clients = stored_clients.iter().map(|c| (c.name.clone(), c.secret.clone()));
    let hub = TunnelHub::new(secret, clients, metrics.clone(), HubSettings { heartbeat, connect_timeout, tls, pool_idle });
    let last_id = store.last_connection_id().await.context("cannot read the connection log")?;
    let log = history_settings.connection_log.then(|| {
        let bounds = LogBounds {
            retention_secs: history_settings.connection_log_retention_secs,
            max_rows: history_settings.connection_log_max_rows,
        };
        history::connection_log::spawn_writer(store.clone(), bounds, metrics.clone())
    });
    let connections = Connections::new(last_id, log);
    let mappings = Arc::new(Mappings::new(
        store,
        metrics.clone(),
        hub.clone(),
        Settings {
            bind_addr: config.server.bind_addr,
            reserved_ports: vec![(api_port, "API"), (tunnel_addr.port(), "tunnel")],
            connect_timeout,
            max_connections: config.server.max_connections_per_mapping,
            idle_timeout: Duration::from_secs(config.server.idle_timeout_secs),
            udp_session_idle: Duration::from_secs(config.server.udp_session_idle_secs),
            max_udp_sessions: config.server.max_udp_sessions_per_mapping,
            max_udp_datagram: config.server.max_udp_datagram_bytes,
        },
        connections,
    ));

    mappings.remember_declared_clients(&stored_clients);
    let events = Events::new(recorder.store().clone(), metrics.clone(), &config.alerts.webhook_url, shutdown.clone());

    systemd::status("restoring mappings");
    let (restored, waiting) = mappings.restore().await.context("cannot read stored mappings")?;
    info!(restored, failed = waiting, state_dir = %state_dir.display(), "mappings restored");
    systemd::status("reconciling the config file's mappings and clients");
    let reconciled = mappings.reconcile(declaration).await.map_err(|e| match e {
        MappingError::Store { .. } => anyhow::Error::new(e),
        e => anyhow::Error::new(DeclarationRefused(e)),
    })?;
    report_reconciled(&events, &reconciled, "start").await;

    // Subscribed before the tunnel port serves: no client's arrival is missed.
    let presence = hub.presence();
    let tunnel_task = tokio::spawn(hub.clone().serve(tunnel, shutdown.clone()));
    if let Some(endpoint) = quic {
        tokio::spawn(hub.clone().serve_quic(endpoint, shutdown.clone()));
    }
    let recorder_task = tokio::spawn(recorder.clone().run(shutdown.clone()));
    let watcher =
        watcher::Watcher { mappings: mappings.clone(), hub: hub.clone(), presence, recorder: recorder.clone(), events: events.clone() };
    tokio::spawn(watcher.run(shutdown));
    Ok(Server {
        mappings,
        metrics,
        hub,
        recorder,
        restored,
        waiting,
        events,
        tunnel_task,
        recorder_task,
        grace: Duration::from_secs(config.server.shutdown_grace_secs),
    })
}

impl Server {
    /// After `shutdown` was cancelled: the tunnel listener closes, open
    /// connections get `server.shutdown_grace_secs` to finish, and the history
    /// takes its final flush.
    pub(crate) async fn stop(self) {
        let _ = self.tunnel_task.await;
        self.mappings.shutdown(self.grace).await;
        // Every connection has ended and queued its record: write them all.
        self.mappings.connections().close_log().await;
        // After the drain, so the bytes of connections that finished in the grace
        // period are in the history too.
        let _ = self.recorder_task.await;
        match self.recorder.flush().await {
            Ok(_) => info!("traffic history flushed"),
            Err(e) => warn!(error = %e, "final traffic history flush failed; up to one interval of traffic is not recorded"),
        }
    }
}

/// Logs what a reconcile of the config file's declarations did (`when`:
/// "start", "reload") and, when it changed anything, records it as an event.
pub(crate) async fn report_reconciled(events: &Events, reconciled: &Reconciled, when: &str) {
    info!(when, result = %reconciled, "config file's mappings and clients reconciled");
    if reconciled.changed_anything() {
        let message = format!("config file reconciled at {when}: {reconciled}");
        events.emit(crate::store::events::EventKind::ConfigReconciled, None, None, message).await;
    }
}

/// The tunnel port's TLS configuration (`None` with `server.tls = false`), and the
/// start-up line that tells the operator exactly how to start a client.
fn tunnel_tls(config: &Config, state_dir: &Path, tunnel: std::net::SocketAddr) -> anyhow::Result<Option<rustls::ServerConfig>> {
    let host = if tunnel.ip().is_unspecified() { this_host() } else { tunnel.ip().to_string() };
    // The secret goes in a file on the client's host (never on its command line,
    // where `ps` shows it): say which secret belongs there.
    let secret_ref = if config.server.secret.is_empty() {
        format!("FILE (FILE: a copy of {})", state_dir.join("secret").display())
    } else {
        "FILE (FILE: holding server.secret)".to_string()
    };
    if !config.server.tls {
        warn!("server.tls = false: the tunnel is NOT encrypted and the server is not authenticated; use only on a trusted network");
        let command = format!("tunneld client --server {host}:{} --secret-file {secret_ref}, with client.tls = false", tunnel.port());
        info!(client_command = %command, "start a client with");
        return Ok(None);
    }
    let identity = crate::net::tls::load_or_generate(&config.server, state_dir)?;
    let fingerprint = identity.fingerprint();
    let command = format!("tunneld client --server {host}:{} --fingerprint {fingerprint} --secret-file {secret_ref}", tunnel.port());
    info!(%fingerprint, cert = %identity.cert_path.display(), "tunnel TLS certificate");
    info!(client_command = %command, "start a client with");
    Ok(Some(crate::net::tls::server_config(identity)?))
}

/// This machine's host name for the client command line (the tunnel listens on
/// all addresses, so any name the clients can resolve works).
fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "SERVER_HOST".into())
}

/// The secret a server without a configured one uses: created once (0600) and
/// reused, so clients keep working across restarts.
fn load_or_generate_secret(state_dir: &Path) -> anyhow::Result<Secret> {
    let path = state_dir.join("secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => {
            info!(path = %path.display(), "using the tunnel secret stored in the state dir");
            return Ok(Secret::new(s.trim()));
        }
        Ok(_) => anyhow::bail!("secret file {} is empty; delete it to generate a new one", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // One line, as a text file should end (`cat` leaves the prompt on its own
    // line); reading trims it, so files written without it still work.
    file.write_all(format!("{secret}\n").as_bytes())?;
    file.sync_all()?;
    warn!(path = %path.display(), "no server.secret configured: generated one; give its contents to your clients (client.secret)");
    Ok(Secret::new(secret))
}
