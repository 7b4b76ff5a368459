//! A daemon role as the process runs it: signals, reloads, systemd, and for the
//! server its HTTP API beside the role.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::declared;
use crate::config::{self, Config, Override, Role};
use crate::{api, client, server, systemd};

/// Runs `role` until SIGTERM/SIGINT, applying SIGHUP reloads.
pub(super) async fn run(
    role: Role,
    config: Config,
    file: Option<PathBuf>,
    overrides: Vec<Override>,
    log: systemd::LogHandle,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let (reload_tx, reloads) = mpsc::channel(4);
    let declared_file = declared::server_file(file.as_deref());
    spawn_signal_handlers(shutdown.clone(), reload_tx, role, file, overrides, log)?;
    systemd::spawn_watchdog();
    match role {
        Role::Server => {
            let listeners = server::Listeners::bind(&config).await?;
            run_server(config, declared_file, listeners, shutdown, reloads).await
        }
        Role::Client => {
            let metrics_listener = client::bind_metrics(&config.client).await?;
            client::run(config, metrics_listener, shutdown, reloads).await
        }
    }
}

/// SIGTERM/SIGINT start a graceful stop; SIGHUP re-reads the configuration and,
/// if it is valid, hands it to the running role (an invalid one is logged and the
/// running configuration stays).
fn spawn_signal_handlers(
    shutdown: CancellationToken,
    reload_tx: mpsc::Sender<Config>,
    role: Role,
    file: Option<PathBuf>,
    overrides: Vec<Override>,
    log: systemd::LogHandle,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!(signal = "SIGTERM", "stopping"); break; }
                _ = int.recv() => { info!(signal = "SIGINT", "stopping"); break; }
                _ = hup.recv() => {
                    systemd::reloading();
                    // A bad [[mappings]] entry refuses the whole file, like any bad key.
                    let loaded = config::load_for_reload(file.as_deref(), &overrides, role).and_then(|new| match role {
                        Role::Server => declared::read(&new, declared::server_file(file.as_deref())).map(|_| new),
                        Role::Client => Ok(new),
                    });
                    match loaded {
                        Ok(new) => {
                            systemd::set_log_level(&log, &new.log.level);
                            info!(level = %new.log.level, "configuration reloaded");
                            // The role answers READY=1 once it has applied it.
                            let _ = reload_tx.send(new).await;
                        }
                        Err(e) => {
                            warn!(error = %e, "reload rejected: the new configuration is invalid; keeping the running one");
                            systemd::ready(&format!("running; reload rejected: {e}"));
                        }
                    }
                }
            }
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Applies a reloaded file's `[[mappings]]` and `[[clients]]`; returns the
/// `STATUS=` line. A declaration the server refuses leaves the running set
/// as it was (checked before anything changes) and is logged as an error.
async fn reconcile(role: &server::Server, new: &Config, file: Option<PathBuf>) -> String {
    let declaration = match declared::read(new, file) {
        Ok(declaration) => declaration,
        // Read once already when the reload was accepted; a secret file may
        // have changed since.
        Err(e) => {
            error!(error = %e, "reload: the config file's mappings and clients are refused; keeping the running ones");
            return format!("running; config file's mappings refused: {e}");
        }
    };
    // Removed mappings' series vanish with them: record what they moved first
    // (as /api/mapping/remove does).
    role.recorder.flush_logged().await;
    let result = role.mappings.reconcile(declaration).await;
    role.recorder.flush_logged().await;
    match result {
        Ok(done) => {
            server::report_reconciled(&role.events, &done, "reload").await;
            "running (configuration reloaded)".to_string()
        }
        Err(e) => {
            error!(error = %e, "reload: the config file's mappings and clients are refused; keeping the running ones");
            format!("running; config file's mappings refused: {e}")
        }
    }
}

/// Where the monitor page is, for the ready line: the first thing an operator
/// wants to open.
fn monitor_url(api: std::net::SocketAddr) -> String {
    format!("http://{}/api/stats/monitor", config::reachable_here(api))
}

/// The server role with its HTTP API, until `shutdown`; then the API stops and
/// the role drains.
///
/// Configurations sent on `reloads` (already validated) are applied live where
/// that is safe — today `api.token`; other changed keys are logged as needing a
/// restart.
async fn run_server(
    config: Config,
    declared_file: Option<PathBuf>,
    listeners: server::Listeners,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<Config>,
) -> anyhow::Result<()> {
    let api_addr = listeners.api.local_addr()?;
    let api_port = api_addr.port();
    let api_on_loopback = config::is_loopback(api_addr.ip());
    let tunnel_port = listeners.tunnel.local_addr()?.port();
    let declaration = declared::read(&config, declared_file.clone())?;
    let role = server::start(&config, declaration, listeners.tunnel, api_port, shutdown.clone()).await?;
    let token = Arc::new(RwLock::new(Arc::<str>::from(config.api.token.expose())));
    let api_state = api::AppState {
        mappings: role.mappings.clone(),
        metrics: role.metrics.clone(),
        hub: role.hub.clone(),
        recorder: role.recorder.clone(),
        token: token.clone(),
        shutdown: shutdown.clone(),
        guard: Arc::new(api::guard::Guard::new(&config.api)),
    };
    let api_task = tokio::spawn(api::serve(listeners.api, api_state, shutdown.clone()));

    let monitor = monitor_url(api_addr);
    info!(api = api_port, tunnel = tunnel_port, %monitor, "tunneld server ready");
    systemd::ready(&format!(
        "serving {} mappings ({} waiting for their port); API on port {api_port}, tunnel on port {tunnel_port}; monitor page {monitor}",
        role.restored, role.waiting
    ));

    let mut running = config;
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
                        *crate::core::sync::write(&token) = Arc::from(new.api.token.expose());
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
                let status = reconcile(&role, &new, declared_file.clone()).await;
                running = new;
                systemd::ready(&status);
            }
        }
    }
    systemd::stopping();
    info!("shutting down: closing listeners, draining connections");
    role.stop().await;
    match tokio::time::timeout(Duration::from_secs(5), api_task).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "API server ended with an error"),
        Err(_) => warn!("API server did not stop within 5 s"),
        _ => {}
    }
    info!("stopped");
    Ok(())
}
