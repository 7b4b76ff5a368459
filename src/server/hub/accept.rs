//! The tunnel port: accepting connections, telling TLS from plain, the server's
//! half of the handshake, and the defences around it — per-source throttling of
//! failures (a token reserved as each connection is admitted), a bound on
//! unauthenticated connections with slots kept for known clients, failures
//! logged in aggregate, flapping names. A refused connection is told it was
//! throttled, and for how long, before it is closed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::defences::FAILURE_LOG_INTERVAL;
use super::registry::TunnelHub;
use super::session::{Client, Pool, Session};
use crate::core::names::invalid_client_name;
use crate::core::secret::tokens_equal;
use crate::core::sync::lock;
use crate::net::metered::MeteredStream;
use crate::net::socket;
use crate::net::tls;
use crate::net::transport::{self, TunnelStream};
use crate::server::throttle::{Charge, Pending};
use crate::telemetry::session_result;
use crate::tunnel::auth;
use crate::tunnel::control::{self, Ended};
use crate::tunnel::frame::{self, ProtocolError};
use crate::tunnel::message::{
    throttled_rejection, version_rejection, Auth, Challenge, Opening, ToClient, ToServer, Verdict, FEATURE_PROXY_HEADER, FEATURE_UDP,
    PROTOCOL_VERSION,
};

/// A connection that has not said who it is within this time is dropped.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel connection failed its handshake: what it is counted as, how it
/// is logged, and whether it is held against its source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    NoHandshake,
    BadFirstFrame,
    NoHello,
    TlsHandshake,
    PlainClientTlsServer,
    TlsClientPlainServer,
    InvalidName,
    BadAuth,
    NoAuth,
    WrongSecret,
    UnknownName,
    LateSession,
    ForgedSession,
    ControlOnDataChannel,
}

impl Failure {
    /// The `result` label of `tunneld_tunnel_sessions_total`.
    fn result(self) -> &'static str {
        match self {
            Failure::TlsHandshake | Failure::PlainClientTlsServer | Failure::TlsClientPlainServer => session_result::TLS_ERROR,
            Failure::WrongSecret | Failure::UnknownName => session_result::AUTH_FAILED,
            _ => session_result::PROTOCOL_ERROR,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Failure::NoHandshake => "no handshake within the timeout",
            Failure::BadFirstFrame => "bad first frame",
            Failure::NoHello => "no hello within the handshake timeout",
            Failure::TlsHandshake => "TLS handshake failed",
            Failure::PlainClientTlsServer => "client speaks plain TCP but this server requires TLS (server.tls = true)",
            Failure::TlsClientPlainServer => "client speaks TLS but this server runs with server.tls = false",
            Failure::InvalidName => "invalid client name in hello",
            Failure::BadAuth => "bad auth frame",
            Failure::NoAuth => "no auth within the handshake timeout",
            Failure::WrongSecret => "authentication failed (wrong secret)",
            Failure::UnknownName => "authentication failed (unknown client name)",
            Failure::LateSession => "data channel for a session that has ended",
            Failure::ForgedSession => "data channel for an unknown session",
            Failure::ControlOnDataChannel => "control hello on a data channel's TLS session (ALPN tunneld-data)",
        }
    }

    /// A data channel naming a session that just ended is a client catching up
    /// after a replacement, not a guess: it is logged in aggregate but does not
    /// count against the address. One naming no session at all (tokens are
    /// random), or an ended one more often than its client could, does.
    fn held_against_source(self) -> bool {
        self != Failure::LateSession
    }
}

/// What a connection presenting a session's token is for.
#[derive(Debug, Clone, Copy)]
enum Channel {
    /// A pooled data channel (`data_hello`).
    Data,
    /// The session's framed datagram link (`datagram_hello`).
    Datagrams,
}

/// Why a connection was refused unheard.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refused {
    /// Its address failed too often; the next attempt is admitted after this.
    Throttled { retry_after: Duration },
    /// Its address holds too many connections that have not authenticated yet.
    Crowded,
}

impl Refused {
    fn log_reason(self) -> &'static str {
        match self {
            Refused::Throttled { .. } => "throttled: too many failed handshakes",
            Refused::Crowded => "throttled: too many unauthenticated connections",
        }
    }

    /// Whole seconds, rounded up, so a client that waits them is admitted.
    fn retry_after_secs(self) -> Option<u64> {
        match self {
            Refused::Throttled { retry_after } => Some((retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1)),
            Refused::Crowded => None,
        }
    }
}

/// One admitted connection: where it comes from and what admission took from
/// its source's failure bucket (settled by its outcome).
#[derive(Debug, Clone, Copy)]
pub(super) struct Attempt {
    pub(super) peer: SocketAddr,
    pub(super) charge: Charge,
}

impl Attempt {
    pub(super) fn source(&self) -> IpAddr {
        self.peer.ip()
    }
}

impl TunnelHub {
    /// Counts a failed handshake against its address and logs it — the first of
    /// an interval at once, the rest as one summary line later.
    pub(super) fn failed(&self, attempt: Attempt, failure: Failure) {
        self.metrics.count_session(failure.result());
        let now = Instant::now();
        let log_now = {
            let mut d = lock(&self.defences);
            if failure.held_against_source() {
                d.throttle.failed(attempt.source(), attempt.charge, now);
            } else {
                d.throttle.refund(attempt.source(), attempt.charge, now);
            }
            d.log.record(attempt.source().to_canonical(), failure.reason(), now)
        };
        if log_now {
            let peer = attempt.peer;
            warn!(%peer, reason = failure.reason(), "tunnel handshake failed; further failures from this address are summarised once a minute");
        }
    }

    /// Whether a new connection from `peer` may start a handshake: not while its
    /// address is throttled or holds too many unauthenticated connections. A
    /// token is reserved from the address's failure bucket as it is admitted.
    pub(super) fn admit(&self, peer: SocketAddr) -> Result<(Attempt, Pending), Refused> {
        let now = Instant::now();
        let refused = {
            let mut d = lock(&self.defences);
            let known = d.known.knows(peer.ip(), now);
            match d.throttle.admit(peer.ip(), known, now) {
                None => Refused::Throttled { retry_after: d.throttle.retry_after(peer.ip(), now) },
                Some(charge) => match self.unauthenticated.enter(peer.ip(), known) {
                    Some(pending) => return Ok((Attempt { peer, charge }, pending)),
                    None => {
                        d.throttle.refund(peer.ip(), charge, now);
                        Refused::Crowded
                    }
                },
            }
        };
        self.metrics.count_session(session_result::THROTTLED);
        if lock(&self.defences).log.record(peer.ip().to_canonical(), refused.log_reason(), now) {
            warn!(%peer, reason = refused.log_reason(), "tunnel connection refused; further refusals from this address are summarised once a minute");
        }
        Err(refused)
    }

    /// Tells a refused connection why, then closes it, without waiting for
    /// anything. On a TLS port: a fatal access_denied alert (a TLS client
    /// reports it as a refusal), then a plain `rejected` frame with the
    /// seconds, which a tunneld client reads after the alert; on a plain port,
    /// the frame. A few dozen bytes, once per connection the peer had to open:
    /// nothing worth reflecting.
    fn tell_refused(&self, stream: TcpStream, refused: Refused) {
        let retry_after_secs = refused.retry_after_secs();
        let frame = frame::encode_frame(&Challenge::Rejected { reason: throttled_rejection(retry_after_secs), retry_after_secs });
        let answer = match self.settings.tls {
            Some(_) => [&tls::THROTTLED_ALERT[..], &frame].concat(),
            None => frame,
        };
        // A fresh socket's send buffer has room for a few dozen bytes.
        let _ = stream.try_write(&answer);
        // What the peer sent already is read away, so closing sends a FIN after
        // the answer rather than a reset that could discard it.
        let mut sink = [0u8; 2048];
        for _ in 0..4 {
            match stream.try_read(&mut sink) {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
    }

    /// Logs, once per interval, how many failures each source had beyond the one
    /// logged when it started; at shutdown, what the interval counted so far.
    async fn summarise_failures(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FAILURE_LOG_INTERVAL / 4);
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tick.tick() => false,
            };
            let summaries = {
                let mut d = lock(&self.defences);
                if stopping {
                    d.log.flush(Instant::now())
                } else {
                    d.log.drain(Instant::now())
                }
            };
            for s in summaries {
                warn!(source = %s.key, count = s.count, last_reason = s.last, interval_secs = FAILURE_LOG_INTERVAL.as_secs(), "more failed or refused tunnel handshakes from this address");
            }
            if stopping {
                return;
            }
        }
    }

    /// Accepts tunnel connections until `shutdown`; each is handled on its own task
    /// so a slow or hostile peer never holds up another.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        tokio::spawn(self.clone().summarise_failures(shutdown.clone()));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = socket::accept(&listener, || self.metrics.count_session(session_result::THROTTLED)) => accepted,
            };
            let (attempt, pending) = match self.admit(peer) {
                Ok(admitted) => admitted,
                Err(refused) => {
                    self.tell_refused(stream, refused);
                    continue;
                }
            };
            socket::tune(&stream);
            let hub = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.handle_connection(stream, attempt, pending, shutdown).await {
                    debug!(%peer, error = %e, "tunnel connection ended");
                }
            });
        }
        for session in self.all_clients().iter().filter_map(|c| c.current()) {
            session.cancel.cancel();
        }
    }

    async fn handle_connection(
        self: Arc<Self>,
        stream: TcpStream,
        attempt: Attempt,
        pending: Pending,
        shutdown: CancellationToken,
    ) -> Result<(), ProtocolError> {
        let Some(mut stream) = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.secure(stream, attempt)).await.unwrap_or_else(|_| {
            self.failed(attempt, Failure::NoHandshake);
            None
        }) else {
            return Ok(());
        };
        let opening = match tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read_frame::<Opening, _>(&mut stream)).await {
            Ok(Ok((opening, _))) => opening,
            Ok(Err(e)) => {
                self.failed(attempt, Failure::BadFirstFrame);
                return Err(e);
            }
            Err(_) => {
                self.failed(attempt, Failure::NoHello);
                return Ok(());
            }
        };
        match opening {
            opening if opening.version() != PROTOCOL_VERSION => self.reject_version(&mut stream, attempt, opening.version()).await,
            Opening::Control { .. } if !stream.can_carry_control() => {
                // Its auth could not be bound to this TLS session (no exporter):
                // refused, never authenticated unbound.
                self.failed(attempt, Failure::ControlOnDataChannel);
                let reason = format!(
                    "a control connection must not offer the ALPN protocol {:?} (data channels only)",
                    String::from_utf8_lossy(crate::net::tls_channel::DATA_ALPN)
                );
                frame::write_frame(&mut stream, &Challenge::Rejected { reason, retry_after_secs: None }).await?;
                Ok(())
            }
            Opening::Control { client, features, .. } => {
                let writes_proxy_headers = features.iter().any(|f| f == FEATURE_PROXY_HEADER);
                let speaks_udp = features.iter().any(|f| f == FEATURE_UDP);
                self.control_channel(stream, attempt, &client, (writes_proxy_headers, speaks_udp), pending, shutdown).await
            }
            Opening::Data { session, .. } => {
                drop(pending);
                self.data_channel(stream, attempt, &session, Channel::Data);
                Ok(())
            }
            Opening::Datagrams { session, .. } => {
                drop(pending);
                self.data_channel(stream, attempt, &session, Channel::Datagrams);
                Ok(())
            }
        }
    }

    /// Another protocol version is no guess: the reserved token goes back.
    async fn reject_version(&self, stream: &mut TunnelStream, attempt: Attempt, version: u32) -> Result<(), ProtocolError> {
        let peer = attempt.peer;
        warn!(%peer, version, "client rejected: protocol version mismatch");
        lock(&self.defences).throttle.refund(attempt.source(), attempt.charge, Instant::now());
        self.metrics.count_session(session_result::VERSION_MISMATCH);
        frame::write_frame(stream, &Challenge::Rejected { reason: version_rejection(version), retry_after_secs: None }).await?;
        Ok(())
    }

    /// The connection as this server speaks it: TLS (handshake done) or plain.
    /// A peer on the other side of a TLS/plain mismatch is told so and dropped.
    async fn secure(&self, stream: TcpStream, attempt: Attempt) -> Option<TunnelStream> {
        let peer = attempt.peer;
        let mut first = [0u8; 1];
        let peeked = stream.peek(&mut first).await.ok()?;
        let speaks_tls = peeked == 1 && first[0] == tls::TLS_HANDSHAKE_BYTE;
        // Counted as a client's once it has authenticated (see `attribute`).
        let mut metered = MeteredStream::unattributed(stream);
        match (&self.settings.tls, speaks_tls) {
            (Some(tls), true) => match transport::accept_tls(tls, metered).await {
                Ok(stream) => Some(stream),
                Err(e) => {
                    debug!(%peer, error = %e, "TLS handshake with a tunnel client failed");
                    self.failed(attempt, Failure::TlsHandshake);
                    None
                }
            },
            (None, false) => Some(TunnelStream::Plain(Box::new(metered.reading_small_reads_ahead()))),
            (Some(_), false) => {
                // A version-1 client, a client with `tls = false`, or garbage: read
                // its hello in the clear to tell which, and answer in the clear.
                let mut plain = TunnelStream::Plain(Box::new(metered));
                match frame::read_frame::<Opening, _>(&mut plain).await {
                    Ok((opening, _)) if opening.version() != PROTOCOL_VERSION => {
                        let _ = self.reject_version(&mut plain, attempt, opening.version()).await;
                    }
                    Ok(_) => {
                        self.failed(attempt, Failure::PlainClientTlsServer);
                        let reason = "this server requires TLS (server.tls = true): remove `tls = false` from the client's \
                                      configuration and pin the server's fingerprint"
                            .to_string();
                        let _ = frame::write_frame(&mut plain, &Challenge::Rejected { reason, retry_after_secs: None }).await;
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "bad first frame");
                        self.failed(attempt, Failure::BadFirstFrame);
                    }
                }
                None
            }
            (None, true) => {
                self.failed(attempt, Failure::TlsClientPlainServer);
                // A plaintext fatal alert: the client reports "server has TLS off".
                let _ = metered.write_all(&tls::PLAIN_SERVER_ALERT).await;
                None
            }
        }
    }

    /// The server's half of the handshake, then the session's control loop.
    async fn control_channel(
        self: Arc<Self>,
        mut stream: TunnelStream,
        attempt: Attempt,
        name: &str,
        (writes_proxy_headers, speaks_udp): (bool, bool),
        pending: Pending,
        shutdown: CancellationToken,
    ) -> Result<(), ProtocolError> {
        let peer = attempt.peer;
        if invalid_client_name(name).is_some() {
            self.failed(attempt, Failure::InvalidName);
            let reason = "invalid client name: 1 to 64 characters of a-z, 0-9, '_' and '-', beginning with a letter or digit".to_string();
            frame::write_frame(&mut stream, &Challenge::Rejected { reason, retry_after_secs: None }).await?;
            return Ok(());
        }
        // An unknown name is challenged like a known one and refused with the same
        // words as a wrong secret, so names cannot be probed.
        let client = self.client(name);
        let nonce = auth::new_nonce();
        frame::write_frame(&mut stream, &Challenge::Challenge { nonce: nonce.clone() }).await?;
        let answer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read_frame::<Auth, _>(&mut stream)).await {
            Ok(Ok((Auth::Auth { mac }, _))) => mac,
            Ok(Err(e)) => {
                self.failed(attempt, Failure::BadAuth);
                return Err(e);
            }
            Err(_) => {
                self.failed(attempt, Failure::NoAuth);
                return Ok(());
            }
        };
        let binding = stream.binding();
        let Some(client) = client.filter(|c| auth::verify(c.secret.expose(), &nonce, &binding, &answer)) else {
            let failure = if self.knows(name) { Failure::WrongSecret } else { Failure::UnknownName };
            debug!(%peer, client = name, reason = failure.reason(), "tunnel client refused");
            self.failed(attempt, failure);
            let reason = "authentication failed: unknown client name or wrong secret".to_string();
            frame::write_frame(&mut stream, &Verdict::Rejected { reason }).await?;
            return Ok(());
        };
        drop(pending);
        {
            let mut d = lock(&self.defences);
            d.throttle.succeeded(peer.ip());
            d.known.remember(peer.ip(), Instant::now());
        }
        let (sent, received) = self.metrics.tunnel_meters(&client.name);
        stream.attribute(sent, received);

        let (control_tx, mut control_rx) = mpsc::channel::<ToClient>(64);
        let session = Arc::new(Session {
            id: rand::random(),
            token: auth::new_nonce(),
            peer,
            on_this_host: socket::is_local_address(peer.ip()),
            authenticated_at: crate::core::time::unix_now(),
            client: client.clone(),
            writes_proxy_headers,
            speaks_udp,
            udp: tokio::sync::watch::channel(None).0,
            udp_requested: std::sync::atomic::AtomicBool::new(false),
            control: control_tx,
            pool: std::sync::Mutex::new(Pool::default()),
            cancel: shutdown.child_token(),
            ended: CancellationToken::new(),
            server_stopping: shutdown,
        });
        let heartbeat = self.settings.heartbeat;
        let welcome = Verdict::Welcome { session: session.token.clone(), heartbeat_interval_secs: heartbeat.as_secs().max(1) };
        // Findable before its token is out: the client opens data channels the
        // moment it reads the welcome, and on a busy host they can arrive before
        // this task runs again; a token not yet installed would be a forgery.
        self.install(session.clone());
        if let Err(e) = frame::write_frame(&mut stream, &welcome).await {
            self.uninstall(&session);
            return Err(e);
        }
        info!(%peer, client = %client.name, session = session.id, "tunnel client authenticated");

        let pool_idle = self.settings.pool_idle;
        let expire_idle = || session.expire_idle(pool_idle);
        let rtt = self.metrics.round_trips(&client.name);
        let outcome =
            control::run::<_, ToServer, ToClient>(stream, heartbeat, &rtt, &session.cancel, Some(&mut control_rx), |_| {}, expire_idle)
                .await;
        let outcome = outcome.map(|ended| match ended {
            Ended::Cancelled if client.removed.is_cancelled() => "client removed",
            Ended::Cancelled => "replaced or shutting down",
            Ended::PeerClosed => "client closed the control channel",
            Ended::PeerSilent => "client silent for three heartbeat intervals",
        });
        match &outcome {
            Ok(reason) => info!(%peer, client = %client.name, session = session.id, reason, "tunnel session ended"),
            Err(e) => warn!(%peer, client = %client.name, session = session.id, error = %e, "tunnel session ended"),
        }
        if !session.server_stopping.is_cancelled() {
            // A shutdown drains its visitors; any other end leaves them nothing to drain through.
            session.ended.cancel();
        }
        self.uninstall(&session);
        outcome.map(|_| ())
    }

    /// A data channel presents its session's token; the session tells whose it
    /// is. A live session's channel gets its reserved token back and keeps its
    /// address known; a recently ended one's is a replaced client catching up;
    /// any other token is a guess. A pooled channel goes into the session's
    /// pool, a datagram channel becomes its datagram link.
    fn data_channel(self: &Arc<Self>, mut stream: TunnelStream, attempt: Attempt, token: &str, kind: Channel) {
        let clients: Vec<Arc<Client>> = self.all_clients();
        let now = Instant::now();
        match clients.iter().filter_map(|c| c.current()).find(|s| tokens_equal(&s.token, token)) {
            Some(session) => {
                {
                    let mut d = lock(&self.defences);
                    d.throttle.refund(attempt.source(), attempt.charge, now);
                    d.known.remember(attempt.source(), now);
                }
                let (sent, received) = self.metrics.tunnel_meters(&session.client.name);
                stream.attribute(sent, received);
                match kind {
                    Channel::Data => session.offer(stream),
                    Channel::Datagrams => {
                        let (reader, writer) = tokio::io::split(stream);
                        self.attach_udp(&session, reader, writer, None);
                    }
                }
            }
            None => {
                let late = lock(&self.defences).ended.late(token, now);
                self.failed(attempt, if late { Failure::LateSession } else { Failure::ForgedSession })
            }
        }
    }
}
