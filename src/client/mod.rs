//! The client role: dial the server, authenticate, keep a pool of data channels
//! open, and connect each to the target the server names.
//!
//! It reconnects forever with capped exponential backoff and jitter, so a fleet of
//! clients does not stampede a server that comes back.
//!
//! Every connection is TLS (verified by a pinned fingerprint or a CA) unless
//! `client.tls = false`. Data channels are reused: after a clean exchange a channel
//! waits for the next `connect`, so a steady stream of visitors costs no new TCP
//! or TLS handshakes.
//!
//! May import every layer below the roles: `core`, `config`, `systemd`,
//! `telemetry`, `net` and `tunnel` (never `server` or `api`).

mod backoff;
mod diagnosis;
mod dialer;
mod session;
mod status;
mod udp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{ClientConfig, Config, Role};
use crate::net::descriptors::DescriptorBudget;
use crate::net::socket;
use crate::net::splice::Pipes;
use crate::systemd;
use crate::telemetry::{Metrics, Tunnel};
use backoff::Backoff;
use diagnosis::{ConnectFailure, Diagnosis};
use dialer::Dialer;
use status::StatusBoard;

/// A session that lasted this long counts as healthy: the next failure starts the
/// backoff from the beginning again.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Binds the client's own `/metrics` listener, if configured.
pub(crate) async fn bind_metrics(config: &ClientConfig) -> anyhow::Result<Option<TcpListener>> {
    match config.metrics_listen {
        Some(addr) => Ok(Some(socket::listen(addr).with_context(|| format!("cannot bind client.metrics_listen {addr}"))?)),
        None => Ok(None),
    }
}

/// Runs the client until `shutdown`: one session per configured server, all
/// at once, each with its own backoff, pool and heartbeats, so a server that
/// is down or slow to answer never holds up the others. Reloaded
/// configurations change nothing here (the log level is applied by the
/// caller); changed keys are reported as needing a restart.
pub(crate) async fn run(
    config: Config,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<Config>,
) -> anyhow::Result<()> {
    let per_server = config.client.per_server();
    let addresses: Vec<String> = per_server.iter().map(|one| one.server.clone()).collect();
    let board = Arc::new(StatusBoard::new(&config.client.name, &addresses));
    tokio::spawn(report_reloads(config.clone(), reloads, board.clone()));
    let config = config.client;
    let metrics = Arc::new(Metrics::for_client());
    // Every server's dialer first: a trust setting that cannot be used (an
    // unreadable CA) stops the start, as with one server.
    let mut dialers = Vec::with_capacity(per_server.len());
    for one in per_server {
        metrics.add_client(Tunnel::to_server(&config.name, &one.server));
        metrics.add_connect_diagnosis(&one.server);
        dialers.push(Arc::new(Dialer::new(one, metrics.clone())?));
    }
    if let Some(listener) = metrics_listener {
        let router = metrics_router(metrics.clone(), board.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
                warn!(error = %e, "client metrics listener failed");
            }
        });
    }
    // Data channels and the targets they dial, across sessions and servers:
    // however many the servers ask for (a loop through this host asks for
    // ever more), the rest of the open-file limit stays free for the control
    // channels.
    let descriptors = Arc::new(DescriptorBudget::for_this_process());
    info!(
        descriptor_limit = socket::descriptor_limit().unwrap_or(u64::MAX),
        tunnel_descriptors = descriptors.capacity(),
        servers = addresses.len(),
        "data channels and target connections share this many descriptors"
    );
    // Plain data channels splice their chunks through these (see `tunnel::exchange`).
    let pipes = Arc::new(Pipes::new(&descriptors));
    systemd::ready(&board.line());
    let mut sessions = tokio::task::JoinSet::new();
    for (index, dialer) in dialers.into_iter().enumerate() {
        sessions.spawn(serve_server(dialer, index, board.clone(), (descriptors.clone(), pipes.clone()), shutdown.clone()));
    }
    while sessions.join_next().await.is_some() {}
    systemd::stopping();
    Ok(())
}

/// Keeps a session with one server until `shutdown`: reconnects forever, with
/// this server's own backoff and diagnosis.
async fn serve_server(
    dialer: Arc<Dialer>,
    index: usize,
    board: Arc<StatusBoard>,
    (descriptors, pipes): (Arc<DescriptorBudget>, Arc<Pipes>),
    shutdown: CancellationToken,
) {
    let metrics = dialer.metrics.clone();
    let mut backoff = Backoff::new();
    let mut diagnosis = Diagnosis::default();
    let server = dialer.config.server.clone();
    let name = dialer.config.name.clone();
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = session::run(dialer.clone(), (descriptors.clone(), pipes.clone()), || board.connected(index), shutdown.clone()) => r,
        };
        metrics.session_ended(Tunnel::to_server(&name, &server));
        // What is wrong, for the log, STATUS= and /metrics alike.
        let (problem, retry_after) = match &result {
            Ok(reason) => {
                diagnosis.connected();
                info!(server = %server, reason, "tunnel session ended");
                (format!("disconnected from {server}"), None)
            }
            Err(e) => match e.downcast_ref::<ConnectFailure>() {
                Some(failure) => {
                    let report = diagnosis.failed(failure);
                    metrics.connect_failed(&server, report.attempt, report.cause);
                    error!(server = %server, reason = report.cause, error = %report.message, "tunnel session failed");
                    (format!("disconnected from {server}: {}", report.message), report.retry_after)
                }
                None => {
                    diagnosis.connected();
                    error!(server = %server, error = %format!("{e:#}"), "tunnel session failed");
                    (format!("disconnected from {server}: {e:#}"), None)
                }
            },
        };
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        // Never sooner than the server said it would admit this address again.
        let delay = backoff.next_delay().max(retry_after.unwrap_or_default());
        board.down(index, format!("{problem}; reconnecting in {:.1} s", delay.as_secs_f64()));
        info!(server = %server, delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// After a reload, `STATUS=` says so and still where each server stands.
async fn report_reloads(mut running: Config, mut reloads: mpsc::Receiver<Config>, board: Arc<StatusBoard>) {
    while let Some(new) = reloads.recv().await {
        for key in running.restart_only_changes(&new, Role::Client) {
            warn!(key, "changed in the configuration; takes effect on restart");
        }
        running = new;
        systemd::ready(&format!("running (configuration reloaded); {}", board.line()));
    }
}

/// `/metrics`, and `/health`: `tunnel_connected` while a session with any
/// server is up, and `servers`, each server and whether it is connected.
fn metrics_router(metrics: Arc<Metrics>, board: Arc<StatusBoard>) -> axum::Router {
    use axum::routing::get;
    let health = move || async move {
        let servers: Vec<serde_json::Value> = board
            .connections()
            .into_iter()
            .map(|(server, connected)| serde_json::json!({"server": server, "connected": connected}))
            .collect();
        let connected = servers.iter().any(|s| s["connected"] == true);
        axum::Json(serde_json::json!({"status": "ok", "tunnel_connected": connected, "servers": servers}))
    };
    axum::Router::new()
        .route(
            "/metrics",
            get(move || async move { ([(axum::http::header::CONTENT_TYPE, crate::telemetry::content_type())], metrics.render()) }),
        )
        .route("/health", get(health))
}
