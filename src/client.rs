//! The client role: dial the server, authenticate, keep a pool of data channels
//! open, and connect each to the target the server names.
//!
//! It reconnects forever with capped exponential backoff and jitter, so a fleet of
//! clients does not stampede a server that comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{ClientConfig, Config, Role};
use crate::forward;
use crate::metered::MeteredStream;
use crate::metrics::{session_result, Metrics};
use crate::protocol::{self, Message, PROTOCOL_VERSION};
use crate::systemd;

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
        Some(addr) => Ok(Some(forward::listen(addr).with_context(|| format!("cannot bind client.metrics_listen {addr}"))?)),
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
    if let Some(listener) = metrics_listener {
        let router = metrics_router(metrics.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
                warn!(error = %e, "client metrics listener failed");
            }
        });
    }
    systemd::ready(&format!("connecting to {}", config.server));
    let config = Arc::new(config);
    let mut backoff = Backoff::new();
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = run_session(config.clone(), metrics.clone(), shutdown.clone()) => r,
        };
        metrics.session_ended();
        match result {
            Ok(reason) => info!(server = %config.server, reason, "tunnel session ended"),
            Err(e) => error!(server = %config.server, error = %format!("{e:#}"), "tunnel session failed"),
        }
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        systemd::status(&format!("disconnected from {}; reconnecting in {:.1} s", config.server, delay.as_secs_f64()));
        info!(server = %config.server, delay_ms = delay.as_millis() as u64, "reconnecting");
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

/// What every data channel of one session needs.
struct SessionCtx {
    config: Arc<ClientConfig>,
    metrics: Arc<Metrics>,
    token: String,
    cancel: CancellationToken,
}

async fn dial(server: &str) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| anyhow!("connecting to {server} timed out"))?
        .with_context(|| format!("cannot connect to {server}"))?;
    forward::tune(&stream);
    Ok(stream)
}

/// One control-channel session, from dial to disconnect. Returns why it ended.
async fn run_session(config: Arc<ClientConfig>, metrics: Arc<Metrics>, shutdown: CancellationToken) -> anyhow::Result<&'static str> {
    let (sent, received) = metrics.tunnel_meters();
    let mut stream = MeteredStream::new(dial(&config.server).await?, sent, received);
    let handshake = async {
        protocol::write_frame(&mut stream, &Message::Hello { version: PROTOCOL_VERSION }).await?;
        let nonce = match protocol::read_frame(&mut stream).await?.0 {
            Message::Challenge { nonce } => nonce,
            Message::Rejected { reason } => bail!("server rejected the connection: {reason}"),
            other => bail!("unexpected {} during handshake", other.kind()),
        };
        protocol::write_frame(&mut stream, &Message::Auth { mac: protocol::sign(&config.secret, &nonce) }).await?;
        match protocol::read_frame(&mut stream).await?.0 {
            Message::Welcome { session, heartbeat_interval_secs } => Ok((session, heartbeat_interval_secs)),
            Message::Rejected { reason } => {
                metrics.count_session(session_result::AUTH_FAILED);
                bail!("server rejected authentication: {reason} (check client.secret)")
            }
            other => bail!("unexpected {} during handshake", other.kind()),
        }
    };
    let (token, heartbeat_secs) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await.map_err(|_| anyhow!("handshake timed out"))??;
    metrics.count_session(session_result::OK);
    metrics.session_started();
    systemd::status(&format!("connected to {}", config.server));
    info!(server = %config.server, "tunnel session established");

    let ctx = Arc::new(SessionCtx { config: config.clone(), metrics: metrics.clone(), token, cancel: shutdown.child_token() });
    for _ in 0..config.pool_size {
        spawn_data_channel(ctx.clone());
    }
    let heartbeat = Duration::from_secs(heartbeat_secs.max(1));
    let mut framed = Framed::new(stream, protocol::codec());
    let mut tick = tokio::time::interval(heartbeat);
    let mut last_heard = Instant::now();
    let outcome = loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => break Ok("shutting down"),
            frame = framed.next() => match frame {
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
                if let Err(e) = framed.send(Message::Heartbeat.to_bytes()).await {
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
        if let Err(e) = data_channel(ctx).await {
            debug!(error = %format!("{e:#}"), "data channel ended");
        }
    });
}

/// One pooled data channel: wait for the server to name a target, dial it, relay.
async fn data_channel(ctx: Arc<SessionCtx>) -> anyhow::Result<()> {
    let (tunnel_sent, tunnel_received) = ctx.metrics.tunnel_meters();
    let mut channel = dial(&ctx.config.server).await?;
    // Armed for its whole life: should this process die, the server sees a reset
    // and its visitor learns the transfer was cut, instead of a clean EOF.
    forward::arm(&channel);
    let hello = Message::DataHello { version: PROTOCOL_VERSION, session: ctx.token.clone() };
    tunnel_sent.record(protocol::write_frame(&mut channel, &hello).await? as u64);
    let (request, n) = tokio::select! {
        _ = ctx.cancel.cancelled() => return Ok(()),
        r = protocol::read_frame(&mut channel) => r?,
    };
    tunnel_received.record(n as u64);
    let Message::Connect { host, port } = request else {
        bail!("unexpected {} on a data channel", request.kind());
    };
    let timeout = Duration::from_secs(ctx.config.connect_timeout_secs);
    let target = forward::connect(&host, port, timeout).await;
    let reply = Message::ConnectResult { error: target.as_ref().err().map(|e| format!("{host}:{port}: {e}")) };
    let written = protocol::write_frame(&mut channel, &reply).await;
    // This channel is taken: keep the pool at its size. Opened only now, so that
    // dialing it does not compete with the visitor's own connection setup.
    spawn_data_channel(ctx.clone());
    tunnel_sent.record(written? as u64);
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            warn!(target = %format!("{host}:{port}"), error = %e, "cannot reach target");
            // A clean end of the exchange: the answer must arrive, not a reset.
            forward::disarm(&channel);
            return Ok(());
        }
    };
    forward::arm(&target);
    let peer: Option<SocketAddr> = target.peer_addr().ok();
    let (from_server, to_server) = (tunnel_received, tunnel_sent);
    // Ends with the data channel: a reset from the server (visitor gone, mapping
    // removed) drops the target too, even while it is not reading.
    let idle = Duration::from_secs(ctx.config.idle_timeout_secs);
    let result = forward::relay(&channel, &target, &from_server, &to_server, idle).await;
    debug!(?peer, result = ?result, "tunneled connection finished");
    Ok(())
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
