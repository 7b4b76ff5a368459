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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{ClientConfig, Config, Role};
use crate::net::metered::MeteredStream;
use crate::net::relay;
use crate::net::socket;
use crate::net::transport::TunnelStream;
use crate::systemd;
use crate::telemetry::{session_result, Meter, Metrics};
use crate::tunnel::exchange::{self, Answer};
use crate::tunnel::protocol::{self, Message, PROTOCOL_VERSION};

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A session that lasted this long counts as healthy: the next failure starts the
/// backoff from the beginning again.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Binds the client's own `/metrics` listener, if configured.
pub async fn bind_metrics(config: &ClientConfig) -> anyhow::Result<Option<TcpListener>> {
    match config.metrics_listen {
        Some(addr) => Ok(Some(socket::listen(addr).with_context(|| format!("cannot bind client.metrics_listen {addr}"))?)),
        None => Ok(None),
    }
}

/// Runs the client until `shutdown`. Reloaded configurations change nothing
/// here (the log level is applied by the caller); changed keys are reported as
/// needing a restart.
pub async fn run(
    config: Config,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<Config>,
) -> anyhow::Result<()> {
    tokio::spawn(report_reloads(config.clone(), reloads));
    let config = config.client;
    let metrics = Arc::new(Metrics::new());
    metrics.add_client(&config.name);
    if let Some(listener) = metrics_listener {
        let router = metrics_router(metrics.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
                warn!(error = %e, "client metrics listener failed");
            }
        });
    }
    let tls = match config.tls {
        true => Some(crate::net::tls::connector(&config)?),
        false => {
            warn!("client.tls = false: the tunnel is NOT encrypted and the server is not authenticated; use only on a trusted network");
            None
        }
    };
    systemd::ready(&format!("connecting to {}", config.server));
    let dialer = Arc::new(Dialer { config, metrics: metrics.clone(), tls });
    let mut backoff = Backoff::new();
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = run_session(dialer.clone(), shutdown.clone()) => r,
        };
        metrics.session_ended(&dialer.config.name);
        match result {
            Ok(reason) => info!(server = %dialer.config.server, reason, "tunnel session ended"),
            Err(e) => error!(server = %dialer.config.server, error = %format!("{e:#}"), "tunnel session failed"),
        }
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        systemd::status(&format!("disconnected from {}; reconnecting in {:.1} s", dialer.config.server, delay.as_secs_f64()));
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
    axum::Router::new().route("/metrics", get(move || async move { crate::api::metrics_response(&metrics) })).route(
        "/health",
        get(move || async move { axum::Json(serde_json::json!({"status": "ok", "tunnel_connected": health_metrics.tunnel_connected()})) }),
    )
}

/// Opens tunnel connections: TCP, counted on the wire, then TLS when on.
struct Dialer {
    config: ClientConfig,
    metrics: Arc<Metrics>,
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

impl Dialer {
    async fn connect(&self) -> anyhow::Result<TunnelStream> {
        let server = &self.config.server;
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(server))
            .await
            .map_err(|_| anyhow!("connecting to {server} timed out"))?
            .with_context(|| format!("cannot connect to {server}"))?;
        socket::tune(&tcp);
        let (sent, received) = self.metrics.tunnel_meters(&self.config.name);
        let metered = MeteredStream::new(tcp, sent, received);
        let Some((connector, name)) = &self.tls else {
            return Ok(TunnelStream::Plain(Box::new(metered)));
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name.clone(), metered.reading_ahead())).await {
            Ok(Ok(tls)) => Ok(TunnelStream::Tls(Box::new(tls.into()))),
            Ok(Err(e)) => {
                self.metrics.count_session(session_result::TLS_ERROR);
                bail!("TLS with {server}: {}", crate::net::tls::explain_client_error(&e, &self.config))
            }
            Err(_) => bail!("TLS handshake with {server} timed out"),
        }
    }
}

/// What every data channel of one session needs.
struct SessionCtx {
    dialer: Arc<Dialer>,
    token: String,
    cancel: CancellationToken,
    /// Channels waiting for a `connect` now.
    idle: AtomicUsize,
}

/// One control-channel session, from dial to disconnect. Returns why it ended.
async fn run_session(dialer: Arc<Dialer>, shutdown: CancellationToken) -> anyhow::Result<&'static str> {
    let config = &dialer.config;
    let metrics = &dialer.metrics;
    let handshake = async {
        let mut stream = dialer.connect().await?;
        protocol::write_frame(&mut stream, &Message::Hello { version: PROTOCOL_VERSION, client: config.name.clone() }).await?;
        let nonce = match protocol::read_frame(&mut stream).await?.0 {
            Message::Challenge { nonce } => nonce,
            Message::Rejected { reason } => bail!("server rejected the connection: {}", protocol::explain_rejection(&reason)),
            other => bail!("unexpected {} during handshake", other.kind()),
        };
        let mac = protocol::sign(&config.secret, &nonce, &stream.binding());
        protocol::write_frame(&mut stream, &Message::Auth { mac }).await?;
        match protocol::read_frame(&mut stream).await?.0 {
            Message::Welcome { session, heartbeat_interval_secs } => Ok((stream, session, heartbeat_interval_secs)),
            Message::Rejected { reason } => {
                metrics.count_session(session_result::AUTH_FAILED);
                bail!("server rejected authentication as client {:?}: {reason} (check client.name and client.secret)", config.name)
            }
            other => bail!("unexpected {} during handshake", other.kind()),
        }
    };
    let (stream, token, heartbeat_secs) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, handshake).await.map_err(|_| anyhow!("handshake timed out"))??;
    metrics.count_session(session_result::OK);
    metrics.session_started(&config.name, crate::core::time::unix_now());
    systemd::status(&format!("connected to {} as {}", config.server, config.name));
    info!(server = %config.server, client = %config.name, "tunnel session established");

    let ctx = Arc::new(SessionCtx { dialer: dialer.clone(), token, cancel: shutdown.child_token(), idle: AtomicUsize::new(0) });
    for _ in 0..config.pool_size {
        spawn_data_channel(ctx.clone());
    }
    let heartbeat = Duration::from_secs(heartbeat_secs.max(1));
    let (mut frames, mut writer) = protocol::control_channel(stream);
    let mut tick = tokio::time::interval(heartbeat);
    let mut last_heard = Instant::now();
    let outcome = loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => break Ok("shutting down"),
            frame = frames.next() => match frame {
                Some(Ok(bytes)) => match Message::decode(&bytes) {
                    Ok(Message::Heartbeat) => last_heard = Instant::now(),
                    Ok(Message::OpenDataChannel) => {
                        last_heard = Instant::now();
                        spawn_data_channel(ctx.clone());
                    }
                    Ok(other) => break Err(anyhow!("unexpected {} on the control channel", other.kind())),
                    Err(e) => break Err(anyhow::Error::from(e)),
                },
                Some(Err(e)) => break Err(anyhow::Error::from(e)),
                None => break Ok("server closed the control channel"),
            },
            _ = tick.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    break Ok("server silent for three heartbeat intervals");
                }
                if let Err(e) = protocol::write_frame(&mut writer, &Message::Heartbeat).await {
                    break Err(anyhow::Error::from(e));
                }
            }
        }
    };
    // Idle pooled channels belong to this session; active relays finish on their own.
    ctx.cancel.cancel();
    outcome
}

fn spawn_data_channel(ctx: Arc<SessionCtx>) {
    if ctx.cancel.is_cancelled() {
        return;
    }
    tokio::spawn(async move {
        match data_channel(&ctx).await {
            // An established channel that closed (idle timeout, the server's pool
            // trimmed, a failed exchange): keep the pool at its size.
            Ok(()) => {
                if ctx.idle.load(Ordering::Relaxed) < ctx.dialer.config.pool_size {
                    spawn_data_channel(ctx);
                }
            }
            // Not replaced: the control session notices a server that is gone.
            Err(e) => debug!(error = %format!("{e:#}"), "data channel could not be opened"),
        }
    });
}

/// Marks one channel idle for as long as it lives.
struct IdleMark<'a>(&'a AtomicUsize);

impl<'a> IdleMark<'a> {
    fn new(count: &'a AtomicUsize) -> IdleMark<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        IdleMark(count)
    }

    /// Unmarks and returns how many other channels are still idle.
    fn taken(self) -> usize {
        let left = self.0.fetch_sub(1, Ordering::Relaxed) - 1;
        std::mem::forget(self);
        left
    }
}

impl Drop for IdleMark<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One pooled data channel: wait for the server to name a target, dial it, relay;
/// again, for as long as exchanges end cleanly. `Err` only when it could not be
/// opened at all.
async fn data_channel(ctx: &Arc<SessionCtx>) -> anyhow::Result<()> {
    let config = &ctx.dialer.config;
    let mut channel = ctx.dialer.connect().await?;
    let hello = Message::DataHello { version: PROTOCOL_VERSION, session: ctx.token.clone() };
    protocol::write_frame(&mut channel, &hello).await?;
    let idle_limit = Duration::from_secs(config.pool_idle_secs);
    let idle_timeout = Duration::from_secs(config.idle_timeout_secs);
    let quiet = Meter::new(Vec::new(), Vec::new());
    loop {
        let mark = IdleMark::new(&ctx.idle);
        let request = tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(idle_limit) => return Ok(()),
            r = protocol::read_frame(&mut channel) => r,
        };
        let Ok((Message::Connect { host, port }, _)) = request else {
            // The server closed it (idle timeout, pool trimmed) or sent nonsense.
            return Ok(());
        };
        if mark.taken() == 0 {
            // The last idle one is taken: have another ready for the next visitor.
            spawn_data_channel(ctx.clone());
        }
        let timeout = Duration::from_secs(config.connect_timeout_secs);
        let target = match socket::connect(&host, port, timeout).await {
            Ok(target) => target,
            Err(e) => {
                warn!(target = %format!("{host}:{port}"), error = %e, "cannot reach target");
                let reply = Message::ConnectResult { error: Some(format!("{host}:{port}: {e}")) };
                // The server may already have sent the visitor's first bytes: this
                // channel is not reusable; answer and close it.
                let _ = protocol::write_frame(&mut channel, &reply).await;
                return Ok(());
            }
        };
        if protocol::write_frame(&mut channel, &Message::ConnectResult { error: None }).await.is_err() {
            return Ok(());
        }
        // Armed until the exchange ends cleanly: should this process die, the
        // target sees a reset, not an EOF that looks like a complete request.
        relay::arm(&target);
        // Looked up only for the debug log: a syscall per visitor otherwise.
        let peer = tracing::enabled!(tracing::Level::DEBUG).then(|| target.peer_addr().ok()).flatten();
        match exchange::relay(channel, &target, &quiet, &quiet, Answer::None, idle_timeout).await {
            Ok((back, sent, received)) => {
                debug!(?peer, sent, received, "tunneled connection finished");
                channel = back;
            }
            Err(e) => {
                debug!(?peer, error = %e, "tunneled connection ended with an error");
                return Ok(());
            }
        }
    }
}

/// Exponential backoff with jitter, capped.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { attempt: 0 }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_delay(&mut self) -> Duration {
        let exp = BACKOFF_START.saturating_mul(1u32 << self.attempt.min(16)).min(BACKOFF_CAP);
        self.attempt = self.attempt.saturating_add(1);
        // Full range 50–100 % of the step: spreads reconnects, never collapses to 0.
        exp.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= BACKOFF_START / 2 && first <= BACKOFF_START);
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            last = b.next_delay();
            assert!(last <= BACKOFF_CAP);
        }
        assert!(last >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_START);
    }
}
