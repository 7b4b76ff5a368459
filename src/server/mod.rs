//! The server role: tunnel acceptor, mapping listeners and the HTTP API, run from
//! listeners the caller has already bound (so tests can use port 0) until a
//! shutdown token fires.

pub mod mappings;
pub mod throttle;
pub mod tunnel;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{self, Config, Role};
use crate::forward;
use crate::history::{self, Recorder};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::systemd;
use mappings::{Mappings, Settings};
use tunnel::{HubSettings, TunnelHub};

/// The server's two fixed listeners.
pub struct Listeners {
    pub api: TcpListener,
    pub tunnel: TcpListener,
}

impl Listeners {
    /// Binds both from the config, with the address in any error.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let api = forward::listen(config.api.listen).with_context(|| format!("cannot bind api.listen {}", config.api.listen))?;
        let tunnel = forward::listen(config.server.tunnel_listen)
            .with_context(|| format!("cannot bind server.tunnel_listen {}", config.server.tunnel_listen))?;
        Ok(Listeners { api, tunnel })
    }
}

/// Runs the server until `shutdown` is cancelled, then drains: listeners close,
/// open connections get `server.shutdown_grace_secs` to finish.
///
/// Configurations sent on `reloads` (already validated) are applied live where
/// that is safe — today `api.token`; other changed keys are logged as needing a
/// restart.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<Config>,
) -> anyhow::Result<()> {
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
    let tunnel_addr = listeners.tunnel.local_addr()?;
    let tls = tunnel_tls(&config, &state_dir, tunnel_addr)?;
    let pool_idle = Duration::from_secs(config.server.pool_idle_secs);
    let clients = store.clients().await.context("cannot read the stored tunnel clients")?;
    let clients = clients.into_iter().map(|c| (c.name, c.secret));
    let hub = TunnelHub::new(secret, clients, metrics.clone(), HubSettings { heartbeat, connect_timeout, tls, pool_idle });
    let api_addr = listeners.api.local_addr()?;
    let api_port = api_addr.port();
    let api_on_loopback = config::is_loopback(api_addr.ip());
    let tunnel_port = tunnel_addr.port();
    let mappings = Arc::new(Mappings::new(
        store,
        metrics.clone(),
        hub.clone(),
        Settings {
            bind_addr: config.server.bind_addr,
            reserved_ports: vec![(api_port, "API"), (tunnel_port, "tunnel")],
            connect_timeout,
            max_connections: config.server.max_connections_per_mapping,
            idle_timeout: Duration::from_secs(config.server.idle_timeout_secs),
        },
    ));

    systemd::status("restoring mappings");
    let (restored, failed) = mappings.restore().await.context("cannot read stored mappings")?;
    info!(restored, failed, state_dir = %state_dir.display(), "mappings restored");

    let tunnel_task = tokio::spawn(hub.clone().serve(listeners.tunnel, shutdown.clone()));
    let recorder_task = tokio::spawn(recorder.clone().run(shutdown.clone()));
    let events = crate::alerts::Events::new(recorder.store().clone(), metrics.clone(), &config.alerts.webhook_url, shutdown.clone());
    let watcher = crate::alerts::Watcher { mappings: mappings.clone(), hub: hub.clone(), recorder: recorder.clone(), events };
    tokio::spawn(watcher.run(shutdown.clone()));
    let token = Arc::new(RwLock::new(Arc::<str>::from(config.api.token.as_str())));
    let api_state = crate::api::AppState {
        mappings: mappings.clone(),
        metrics: metrics.clone(),
        hub: hub.clone(),
        recorder: recorder.clone(),
        token: token.clone(),
        shutdown: shutdown.clone(),
        guard: Arc::new(crate::api::guard::Guard::new(&config.api)),
    };
    let api_task = tokio::spawn(crate::api::serve(listeners.api, api_state, shutdown.clone()));

    info!(api = api_port, tunnel = tunnel_port, "tunneld server ready");
    systemd::ready(&format!(
        "serving {restored} mappings ({failed} waiting for their port); API on port {api_port}, tunnel on port {tunnel_port}"
    ));

    let mut running = config.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(new) = reloads.recv() => {
                if new.api.token != running.api.token {
                    // The new file was validated against its own api.listen, but the
                    // listener bound now is the old one: never drop the token there.
                    if new.api.token.is_empty() && !api_on_loopback {
                        warn!("reload would remove api.token while the API listens beyond loopback; keeping the token");
                    } else {
                        if let Ok(mut t) = token.write() {
                            *t = Arc::from(new.api.token.as_str());
                        }
                        if new.api.token.is_empty() {
                            warn!("reload removed api.token: the API no longer asks for authentication");
                        } else {
                            info!("api.token changed: applied");
                        }
                    }
                }
                for key in running.restart_only_changes(&new, Role::Server) {
                    warn!(key, "changed in the configuration; takes effect on restart");
                }
                running = new;
                systemd::ready("running (configuration reloaded)");
            }
        }
    }
    systemd::stopping();
    info!("shutting down: closing listeners, draining connections");
    let _ = tunnel_task.await;
    mappings.shutdown(Duration::from_secs(config.server.shutdown_grace_secs)).await;
    // After the drain, so the bytes of connections that finished in the grace
    // period are in the history too.
    let _ = recorder_task.await;
    match recorder.flush().await {
        Ok(_) => info!("traffic history flushed"),
        Err(e) => warn!(error = %e, "final traffic history flush failed; up to one interval of traffic is not recorded"),
    }
    match tokio::time::timeout(Duration::from_secs(5), api_task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "API server ended with an error"),
        Err(_) => warn!("API server did not stop within 5 s"),
        _ => {}
    }
    info!("stopped");
    Ok(())
}

/// The tunnel port's TLS acceptor (`None` with `server.tls = false`), and the
/// start-up line that tells the operator exactly how to start a client.
fn tunnel_tls(config: &Config, state_dir: &Path, tunnel: std::net::SocketAddr) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    let host = if tunnel.ip().is_unspecified() { this_host() } else { tunnel.ip().to_string() };
    let secret_ref = if config.server.secret.is_empty() {
        format!("\"$(cat {})\"", state_dir.join("secret").display())
    } else {
        "<server.secret>".to_string()
    };
    if !config.server.tls {
        warn!("server.tls = false: the tunnel is NOT encrypted and the server is not authenticated; use only on a trusted network");
        let command = format!("tunneld client --server {host}:{} --secret {secret_ref} (with client.tls = false)", tunnel.port());
        info!(client_command = %command, "start a client with");
        return Ok(None);
    }
    let identity = crate::tls::load_or_generate(&config.server, state_dir)?;
    let fingerprint = identity.fingerprint();
    let command = format!("tunneld client --server {host}:{} --fingerprint {fingerprint} --secret {secret_ref}", tunnel.port());
    info!(%fingerprint, cert = %identity.cert_path.display(), "tunnel TLS certificate");
    info!(client_command = %command, "start a client with");
    Ok(Some(crate::tls::acceptor(identity)?))
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
fn load_or_generate_secret(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("secret");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => {
            info!(path = %path.display(), "using the tunnel secret stored in the state dir");
            return Ok(s.trim().to_string());
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
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    warn!(path = %path.display(), "no server.secret configured: generated one; give its contents to your clients (client.secret)");
    Ok(secret)
}
