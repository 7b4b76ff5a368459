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
use crate::systemd;
use crate::telemetry::Metrics;
use backoff::Backoff;
use diagnosis::{ConnectFailure, Diagnosis};
use dialer::Dialer;

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

/// Runs the client until `shutdown`. Reloaded configurations change nothing
/// here (the log level is applied by the caller); changed keys are reported as
/// needing a restart.
pub(crate) async fn run(
    config: Config,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<Config>,
) -> anyhow::Result<()> {
    tokio::spawn(report_reloads(config.clone(), reloads));
    let config = config.client;
    let metrics = Arc::new(Metrics::new());
    metrics.add_client(&config.name);
    metrics.add_connect_diagnosis();
    if let Some(listener) = metrics_listener {
        let router = metrics_router(metrics.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
                warn!(error = %e, "client metrics listener failed");
            }
        });
    }
    let dialer = Arc::new(Dialer::new(config, metrics.clone())?);
    // Data channels and the targets they dial, across sessions: however many
    // the server asks for (a loop through this host asks for ever more), the
    // rest of the open-file limit stays free for the control channel.
    let descriptors = Arc::new(DescriptorBudget::for_this_process());
    info!(
        descriptor_limit = socket::descriptor_limit().unwrap_or(u64::MAX),
        tunnel_descriptors = descriptors.capacity(),
        "data channels and target connections share this many descriptors"
    );
    systemd::ready(&format!("connecting to {}", dialer.config.server));
    let mut backoff = Backoff::new();
    let mut diagnosis = Diagnosis::default();
    let server = &dialer.config.server;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = session::run(dialer.clone(), descriptors.clone(), shutdown.clone()) => r,
        };
        metrics.session_ended(&dialer.config.name);
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
                    metrics.connect_failed(report.attempt, report.cause);
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
        systemd::status(&format!("{problem}; reconnecting in {:.1} s", delay.as_secs_f64()));
        info!(server = %dialer.config.server, delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    systemd::stopping();
    Ok(())
}

async fn report_reloads(mut running: Config, mut reloads: mpsc::Receiver<Config>) {
    while let Some(new) = reloads.recv().await {
        for key in running.restart_only_changes(&new, Role::Client) {
            warn!(key, "changed in the configuration; takes effect on restart");
        }
        running = new;
        systemd::ready("running (configuration reloaded)");
    }
}

fn metrics_router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::routing::get;
    let health_metrics = metrics.clone();
    axum::Router::new().route("/metrics", get(move || async move { ([(axum::http::header::CONTENT_TYPE, crate::telemetry::content_type())], metrics.render()) })).route(
        "/health",
        get(move || async move { axum::Json(serde_json::json!({"status": "ok", "tunnel_connected": health_metrics.tunnel_connected()})) }),
    )
}
