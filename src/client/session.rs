//! One session with the server: the control channel (handshake, heartbeats,
//! requests for more data channels) and the pool of data channels, each of which
//! waits for a `connect`, dials the target and relays, again and again for as
//! long as exchanges end cleanly — a steady stream of visitors costs no new TCP
//! or TLS handshakes. Channels and targets together stay within the process's
//! descriptor budget: beyond it no channel is opened and no target dialed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::diagnosis::ConnectFailure;
use super::dialer::{Dialer, HANDSHAKE_TIMEOUT};
use super::udp;
use crate::core::failure_log::{FailureLog, Summary};
use crate::core::sync::lock;
use crate::net::descriptors::DescriptorBudget;
use crate::net::relay;
use crate::net::socket;
use crate::net::splice::Pipes;
use crate::net::tls;
use crate::net::transport::TunnelStream;
use crate::telemetry::connect_failure::{AUTH_REFUSED, PROTOCOL_ERROR, REJECTED, SERVER_REQUIRES_TLS, THROTTLED, VERSION_MISMATCH};
use crate::telemetry::{session_result, Meter, Tunnel};
use crate::tunnel::control::{self, Ended};
use crate::tunnel::exchange::{self, Answer};
use crate::tunnel::frame::{self, ProtocolError};
use crate::tunnel::handshake::{self, HandshakeError};
use crate::tunnel::message::{Connect, ConnectResult, Opening, ToClient, ToServer, PROTOCOL_VERSION};

/// Descriptors a data channel holds for its life: its socket, and the second
/// handle on it that its first exchange makes and keeps (see `exchange::relay`).
const DATA_CHANNEL_DESCRIPTORS: u32 = 2;

/// What every data channel of one session needs.
struct SessionCtx {
    dialer: Arc<Dialer>,
    /// Shared by every channel and target of the process.
    descriptors: Arc<DescriptorBudget>,
    /// The pipes a plain channel's exchanges splice through, out of `descriptors`.
    pipes: Arc<Pipes>,
    token: String,
    cancel: CancellationToken,
    /// Channels waiting for a `connect` now.
    idle: AtomicUsize,
    /// Whether a throttled data channel was logged in this session already.
    throttled_logged: AtomicBool,
    /// Targets that could not be reached, for the log: one that is down fails
    /// every visitor, and one line each would bury everything else.
    unreachable: Mutex<FailureLog<String, String>>,
}

/// Unreachable targets beyond a target's first failure are logged as one
/// summary per this interval.
const UNREACHABLE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// One control-channel session, from dial to disconnect. Returns why it ended.
/// `on_connected` runs once the session is authenticated.
pub(super) async fn run(
    dialer: Arc<Dialer>,
    (descriptors, pipes): (Arc<DescriptorBudget>, Arc<Pipes>),
    on_connected: impl FnOnce(),
    shutdown: CancellationToken,
) -> anyhow::Result<&'static str> {
    let config = &dialer.config;
    let metrics = &dialer.metrics;
    let server = &config.server;
    let handshake = async {
        let mut stream = dialer.connect().await?;
        let welcome = handshake::authenticate(&mut stream, &config.name, config.secret.expose(), TunnelStream::binding).await;
        match welcome {
            Ok(welcome) => Ok((stream, welcome)),
            Err(HandshakeError::AuthFailed(reason)) => {
                metrics.count_session(session_result::AUTH_FAILED);
                let name = &config.name;
                Err(ConnectFailure::new(
                    AUTH_REFUSED,
                    format!("server rejected authentication as client \"{name}\": {reason} (check client.name and client.secret)"),
                ))
            }
            Err(HandshakeError::Throttled { reason, retry_after_secs }) => {
                metrics.count_session(session_result::THROTTLED);
                let message = format!("{server}: throttled by the server: {reason}");
                Err(ConnectFailure::throttled(message, Some(Duration::from_secs(retry_after_secs))))
            }
            Err(HandshakeError::Rejected(reason)) => {
                Err(ConnectFailure::new(rejection_reason(&reason), format!("server rejected the connection: {reason}")))
            }
            // A TLS alert record read as a frame's length: a TLS server refusing
            // this plain client unheard (it answers a plain hello in the clear).
            Err(HandshakeError::Protocol(ProtocolError::FrameTooLarge(n))) if n >> 24 == usize::from(tls::TLS_ALERT_BYTE) => {
                metrics.count_session(session_result::THROTTLED);
                let message =
                    format!("{server}: throttled by the server: {} (said with a TLS alert: the server requires TLS)", tls::THROTTLED);
                Err(ConnectFailure::throttled(message, None))
            }
            Err(HandshakeError::Protocol(e)) => {
                Err(ConnectFailure::new(PROTOCOL_ERROR, format!("tunnel handshake with {server} failed: {e}")))
            }
        }
    };
    let timed_out = || ConnectFailure::new(PROTOCOL_ERROR, format!("tunnel handshake with {server} timed out"));
    let (stream, welcome) = tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, handshake).await.map_err(|_| timed_out())??;
    metrics.count_session(session_result::OK);
    metrics.connect_succeeded(server);
    metrics.session_started(Tunnel::to_server(&config.name, server), crate::core::time::unix_now());
    on_connected();
    info!(server = %config.server, client = %config.name, "tunnel session established");

    let ctx = Arc::new(SessionCtx {
        dialer: dialer.clone(),
        descriptors,
        pipes,
        token: welcome.session,
        cancel: shutdown.child_token(),
        idle: AtomicUsize::new(0),
        throttled_logged: AtomicBool::new(false),
        unreachable: Mutex::new(FailureLog::new(UNREACHABLE_LOG_INTERVAL)),
    });
    tokio::spawn(summarise_unreachable(ctx.clone()));
    for _ in 0..config.pool_size {
        spawn_data_channel(ctx.clone());
    }
    let heartbeat = Duration::from_secs(welcome.heartbeat_interval_secs.max(1));
    let on_message = |msg: ToClient| match msg {
        ToClient::OpenDataChannel => spawn_data_channel(ctx.clone()),
        ToClient::OpenDatagrams => {
            let link = udp::open_link(ctx.dialer.clone(), ctx.descriptors.clone(), ctx.token.clone(), ctx.cancel.clone());
            tokio::spawn(link);
        }
        ToClient::Heartbeat { .. } => {}
    };
    let rtt = metrics.round_trips(Tunnel::to_server(&config.name, server));
    let outcome = control::run::<_, ToClient, ToServer>(stream, heartbeat, &rtt, &ctx.cancel, None, on_message, || {}).await;
    // Idle pooled channels belong to this session; active relays finish on their own.
    ctx.cancel.cancel();
    match outcome? {
        Ended::Cancelled => Ok("shutting down"),
        Ended::PeerClosed => Ok("server closed the control channel"),
        Ended::PeerSilent => Ok("server silent for three heartbeat intervals"),
    }
}

/// A rejection before authentication, by its words (the server's, or a
/// version-1 server's as `explain_rejection` renders them).
fn rejection_reason(words: &str) -> &'static str {
    if words.contains("protocol version") {
        VERSION_MISMATCH
    } else if words.contains("requires TLS") {
        SERVER_REQUIRES_TLS
    } else if words == tls::THROTTLED || words.contains("refused") {
        THROTTLED
    } else {
        REJECTED
    }
}

fn spawn_data_channel(ctx: Arc<SessionCtx>) {
    if ctx.cancel.is_cancelled() {
        return;
    }
    // Held for the channel's life; the server asks again when it needs one.
    let Some(held) = ctx.descriptors.try_take(DATA_CHANNEL_DESCRIPTORS) else {
        refused(&ctx, "no new data channel");
        return;
    };
    tokio::spawn(async move {
        let opened = data_channel(&ctx).await;
        drop(held);
        match opened {
            // An established channel that closed (idle timeout, the server's pool
            // trimmed, a failed exchange): keep the pool at its size.
            Ok(()) => {
                if ctx.idle.load(Ordering::Relaxed) < ctx.dialer.config.pool_size {
                    spawn_data_channel(ctx);
                }
            }
            // Not replaced: the control session notices a server that is gone.
            Err(e) if is_throttled(&e) && !ctx.throttled_logged.swap(true, Ordering::Relaxed) => {
                warn!(server = %ctx.dialer.config.server, error = %format!("{e:#}"), "data channel refused; visitors wait until the server admits this address again (logged once per session)")
            }
            Err(e) => debug!(server = %ctx.dialer.config.server, error = %format!("{e:#}"), "data channel could not be opened"),
        }
    });
}

fn is_throttled(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ConnectFailure>().is_some_and(|f| f.reason == THROTTLED)
}

/// Logs, once per interval, how many more visitors' targets could not be
/// reached, per target, until the session ends (then its last channel's drop
/// logs what the interval counted so far).
async fn summarise_unreachable(ctx: Arc<SessionCtx>) {
    let mut tick = tokio::time::interval(UNREACHABLE_LOG_INTERVAL / 4);
    loop {
        tokio::select! {
            _ = ctx.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let summaries = lock(&ctx.unreachable).drain(Instant::now());
        log_unreachable(&ctx.dialer.config.server, summaries);
    }
}

fn log_unreachable(server: &str, summaries: Vec<Summary<String, String>>) {
    for s in summaries {
        let interval_secs = UNREACHABLE_LOG_INTERVAL.as_secs();
        warn!(server, target = %s.key, count = s.count, last_error = %s.last, interval_secs, "more visitors' targets could not be reached");
    }
}

impl Drop for SessionCtx {
    /// The session and all its channels are gone (or the process is stopping):
    /// no count is lost with it.
    fn drop(&mut self) {
        log_unreachable(&self.dialer.config.server, lock(&self.unreachable).flush(Instant::now()));
    }
}

/// Logs a refusal for the descriptor budget: the first of an interval at WARN,
/// the rest at debug.
fn refused(ctx: &SessionCtx, what: &'static str) {
    let budget = ctx.descriptors.capacity();
    match ctx.descriptors.refused() {
        Some(not_logged) => warn!(
            server = %ctx.dialer.config.server,
            refused = what,
            tunnel_descriptors = budget,
            refused_not_logged = not_logged,
            "data channels and targets hold all the descriptors kept for them (a loop, or a flood?); further refusals are counted and logged at most every 10 s"
        ),
        None => debug!(refused = what, tunnel_descriptors = budget, "descriptor budget reached"),
    }
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
    let mut channel = ctx.dialer.connect_data().await?;
    let hello = Opening::Data { version: PROTOCOL_VERSION, session: ctx.token.clone() };
    frame::write_frame(&mut channel, &hello).await?;
    let idle_limit = Duration::from_secs(config.pool_idle_secs);
    let idle_timeout = Duration::from_secs(config.idle_timeout_secs);
    let quiet = Meter::default();
    loop {
        let mark = IdleMark::new(&ctx.idle);
        let request = tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(idle_limit) => return Ok(()),
            r = frame::read_frame::<Connect, _>(&mut channel) => r,
        };
        let (Connect::Connect { host, port, proxy_header }, _) = match request {
            Ok(request) => request,
            // Not a `connect`: on a plain tunnel, a refusal such as being
            // throttled. Not replaced, so a refusing server is not hammered.
            Err(e @ ProtocolError::Malformed(_)) => bail!("the server sent a data channel something other than a connect request: {e}"),
            // The server closed it (idle timeout, pool trimmed).
            Err(_) => return Ok(()),
        };
        if mark.taken() == 0 {
            // The last idle one is taken: have another ready for the next visitor.
            spawn_data_channel(ctx.clone());
        }
        let Some(held) = ctx.descriptors.try_take(1) else {
            refused(ctx, "target not dialed");
            let error = format!(
                "{host}:{port}: not dialed: this client's data channels and targets hold all {} descriptors kept for them (a loop, or a flood?)",
                ctx.descriptors.capacity()
            );
            // Not reusable: the visitor's first bytes may be on their way.
            let _ = frame::write_frame(&mut channel, &ConnectResult::ConnectResult { error: Some(error) }).await;
            channel.close_gracefully();
            return Ok(());
        };
        let timeout = Duration::from_secs(config.connect_timeout_secs);
        // The PROXY header goes first, outside any count: it is not user traffic.
        let dialed = match socket::connect(&host, port, timeout).await {
            Ok(mut target) => match proxy_header {
                Some(header) => target.write_all(&header.encode()).await.map(|()| target),
                None => Ok(target),
            },
            Err(e) => Err(e),
        };
        let target = match dialed {
            Ok(target) => target,
            Err(e) => {
                let target = format!("{host}:{port}");
                if lock(&ctx.unreachable).record(target.clone(), e.to_string(), Instant::now()) {
                    warn!(server = %config.server, %target, error = %e, "cannot reach target; further failures for this target are summarised once a minute");
                } else {
                    debug!(%target, error = %e, "cannot reach target");
                }
                let reply = ConnectResult::ConnectResult { error: Some(format!("{host}:{port}: {e}")) };
                // The server may already have sent the visitor's first bytes: this
                // channel is not reusable; answer and close it.
                let _ = frame::write_frame(&mut channel, &reply).await;
                channel.close_gracefully();
                return Ok(());
            }
        };
        if frame::write_frame(&mut channel, &ConnectResult::ConnectResult { error: None }).await.is_err() {
            return Ok(());
        }
        // Armed until the exchange ends cleanly: should this process die, the
        // target sees a reset, not an EOF that looks like a complete request.
        relay::arm(&target);
        // Looked up only for the debug log: a syscall per visitor otherwise.
        let peer = tracing::enabled!(tracing::Level::DEBUG).then(|| target.peer_addr().ok()).flatten();
        let pipes = exchange::splicing(&channel, &ctx.pipes);
        let relayed = exchange::relay(channel, &target, &quiet, &quiet, Answer::None, idle_timeout, pipes).await;
        drop((target, held));
        match relayed {
            Ok((back, sent, received)) => {
                debug!(peer = peer.map(display), sent, received, "tunneled connection finished");
                channel = back;
            }
            Err(e) => {
                debug!(peer = peer.map(display), error = %e, "tunneled connection ended with an error");
                return Ok(());
            }
        }
    }
}
