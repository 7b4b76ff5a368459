//! Tunneled UDP on the client: the datagram link the server asks for when a
//! UDP mapping first needs this client (see `tunnel::datagram`) — QUIC where
//! it can be had, framed on a data channel where not —, and, per
//! session the server opens on it, a socket of its own toward the target.
//!
//! A session ends when the server says so (its idle timer, or its visitor's
//! session ended), when the link goes, or, as a safety net should the
//! server's word never come, after [`safety_idle`] of silence on this side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntGauge;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::dialer::Dialer;
use crate::core::sync::lock;
use crate::net::descriptors::{DescriptorBudget, Taken};
use crate::net::udp;
use crate::telemetry::Tunnel;
use crate::tunnel::auth;
use crate::tunnel::datagram::{self, DatagramControl, Frame, LinkSender, OnFrame, SendError, MAX_DATAGRAM};
use crate::tunnel::frame;
use crate::tunnel::message::{Opening, QuicOpening, Verdict, PROTOCOL_VERSION};

/// Datagrams from the server that may wait for one session's target socket;
/// more are dropped.
const SESSION_QUEUE: usize = 256;

/// What the link's sessions share.
struct Sessions {
    dialer: Arc<Dialer>,
    descriptors: Arc<DescriptorBudget>,
    /// Each open session's queue toward its target, by the server's id.
    queues: Mutex<HashMap<u64, mpsc::Sender<Bytes>>>,
    /// `tunneld_client_udp_sessions`.
    open: IntGauge,
}

/// Opens the session's datagram link, as the server asked: QUIC on the
/// tunnel port number over UDP when the tunnel is TLS and the server answers
/// there within [`datagram::QUIC_ATTEMPT`], else a framed datagram channel of
/// the tunnel. It lasts until `cancel` (the session's end) or until either
/// side closes it; the server asks again when it next needs one.
pub(super) async fn open_link(dialer: Arc<Dialer>, descriptors: Arc<DescriptorBudget>, token: String, cancel: CancellationToken) {
    let server = dialer.config.server.clone();
    let sessions = Arc::new(Sessions {
        open: dialer.metrics.client_udp_sessions.clone(),
        dialer: dialer.clone(),
        descriptors,
        queues: Mutex::new(HashMap::new()),
    });
    let handler = |sender: &LinkSender| handler(sessions.clone(), sender.clone());
    let mut _endpoint = None;
    let quic = match &dialer.quic {
        Some(quic) => match tokio::time::timeout(datagram::QUIC_ATTEMPT, join_over_quic(&dialer, quic, &token)).await {
            Ok(Ok(joined)) => Some(joined),
            Ok(Err(e)) => {
                let error = format!("{e:#}");
                info!(server = %server, udp_transport = "framed", error, "QUIC to the tunnel port over UDP failed; falling back to framed datagrams");
                None
            }
            Err(_) => {
                let waited_ms = datagram::QUIC_ATTEMPT.as_millis() as u64;
                info!(server = %server, udp_transport = "framed", waited_ms, "no QUIC answer from the tunnel port over UDP (blocked?); falling back to framed datagrams");
                None
            }
        },
        None => None,
    };
    let (link, transport) = match quic {
        Some((endpoint, connection, send, recv)) => {
            _endpoint = Some(endpoint);
            let (sent, received) = dialer.metrics.tunnel_meters(Tunnel::to_server(&dialer.config.name, &server));
            tokio::spawn(crate::net::quic::count_wire(connection.clone(), sent, received));
            (datagram::start(recv, send, Some(connection), handler, &cancel), "quic")
        }
        None => match open_framed(&dialer, token).await {
            Ok(channel) => {
                let (reader, writer) = tokio::io::split(channel);
                (datagram::start(reader, writer, None, handler, &cancel), "framed")
            }
            Err(e) => {
                warn!(server = %server, error = %format!("{e:#}"), "the datagram channel could not be opened; UDP mappings through this client drop their datagrams until it can");
                return;
            }
        },
    };
    info!(server = %server, udp_transport = transport, "the tunnel carries UDP datagrams");
    link.closed().await;
    // Its sessions end with it.
    lock(&sessions.queues).clear();
    debug!(server = %server, udp_transport = transport, "datagram link ended");
}

/// A framed datagram channel: a connection of the tunnel, TLS or plain as the
/// tunnel is, opened with `datagram_hello`.
async fn open_framed(dialer: &Dialer, token: String) -> anyhow::Result<crate::net::transport::TunnelStream> {
    let mut channel = dialer.connect_data().await?;
    let hello = Opening::Datagrams { version: PROTOCOL_VERSION, session: token };
    frame::write_frame(&mut channel, &hello).await?;
    Ok(channel)
}

/// A QUIC connection to the tunnel port over UDP, proven to be this client's
/// for the session `token` names (`quic_hello`), with its stream.
async fn join_over_quic(
    dialer: &Dialer,
    quic: &crate::net::quic::Dialer,
    token: &str,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let config = &dialer.config;
    let (endpoint, connection) = quic.connect(&config.server).await?;
    let binding =
        crate::net::quic::binding(&connection).ok_or_else(|| anyhow::anyhow!("the QUIC connection exports no keying material"))?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let mac = auth::sign(config.secret.expose(), token, &binding);
    let hello = QuicOpening::Hello { version: PROTOCOL_VERSION, client: config.name.clone(), session: token.to_string(), mac };
    frame::write_frame(&mut send, &hello).await?;
    match frame::read_frame::<Verdict, _>(&mut recv).await?.0 {
        Verdict::Welcome { .. } => Ok((endpoint, connection, send, recv)),
        Verdict::Rejected { reason } => Err(anyhow::anyhow!("the server refused the QUIC connection: {reason}")),
    }
}

/// What the client does with each frame from the server.
fn handler(sessions: Arc<Sessions>, link: LinkSender) -> OnFrame {
    Arc::new(move |frame| match frame {
        Frame::Datagram { session, payload } => {
            // A full queue, or a session already over: dropped.
            if let Some(queue) = lock(&sessions.queues).get(&session) {
                let _ = queue.try_send(payload);
            }
        }
        Frame::Control(DatagramControl::Open { session, host, port, idle_secs }) => {
            let (queue, datagrams) = mpsc::channel(SESSION_QUEUE);
            lock(&sessions.queues).insert(session, queue);
            let idle = safety_idle(Duration::from_secs(idle_secs));
            tokio::spawn(run_session(sessions.clone(), link.clone(), session, host, port, idle, datagrams));
        }
        // Its queue closes: the session's task ends.
        Frame::Control(DatagramControl::Close { session }) => {
            lock(&sessions.queues).remove(&session);
        }
        Frame::Control(DatagramControl::Opened { .. }) => {}
    })
}

/// How long this side keeps a silent session: well beyond the server's own
/// idle end, which it announces, so this one only ever ends sessions whose
/// end was lost.
fn safety_idle(server_idle: Duration) -> Duration {
    server_idle * 2 + Duration::from_secs(5)
}

/// One session: datagrams from the server to the target, the target's back
/// tagged with the session's id.
async fn run_session(
    sessions: Arc<Sessions>,
    link: LinkSender,
    id: u64,
    host: String,
    port: u16,
    idle: Duration,
    mut datagrams: mpsc::Receiver<Bytes>,
) {
    let opened = open_target(&sessions, &host, port).await;
    let answer = DatagramControl::Opened { session: id, error: opened.as_ref().err().cloned() };
    let sent = link.control(answer).await;
    let (socket, _held) = match (opened, sent) {
        (Ok(opened), Ok(())) => opened,
        (Err(e), _) => {
            debug!(target = %format!("{host}:{port}"), error = %e, "UDP session not opened");
            lock(&sessions.queues).remove(&id);
            return;
        }
        (_, Err(_)) => return,
    };
    sessions.open.inc();
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = link.closed() => break,
            _ = &mut deadline => {
                debug!(session = id, "UDP session silent beyond the server's idle end; ending it here");
                lock(&sessions.queues).remove(&id);
                let _ = link.control(DatagramControl::Close { session: id }).await;
                break;
            }
            datagram = datagrams.recv() => {
                // The server ended it.
                let Some(datagram) = datagram else { break };
                deadline.as_mut().reset(Instant::now() + idle);
                if let Err(e) = socket.send(&datagram).await {
                    debug!(session = id, error = %e, "datagram not taken by the target");
                }
            }
            reply = udp::next(&socket, MAX_DATAGRAM) => match reply {
                Ok(Some(reply)) => {
                    deadline.as_mut().reset(Instant::now() + idle);
                    // A full link drops it, as the wire would.
                    if link.try_datagram(id, Bytes::from(reply)) == Err(SendError::Closed) {
                        break;
                    }
                }
                Ok(None) => {}
                // The target refused one (ICMP); it may come back.
                Err(e) => debug!(session = id, error = %e, "the target did not take a datagram"),
            },
        }
    }
    sessions.open.dec();
}

/// A socket toward the target, and the descriptor it holds from the budget.
async fn open_target(sessions: &Sessions, host: &str, port: u16) -> Result<(tokio::net::UdpSocket, Taken), String> {
    let Some(held) = sessions.descriptors.try_take(1) else {
        return Err(format!(
            "{host}:{port}: not opened: this client's data channels and targets hold all {} descriptors kept for them",
            sessions.descriptors.capacity()
        ));
    };
    let timeout = Duration::from_secs(sessions.dialer.config.connect_timeout_secs);
    match udp::connect(host, port, timeout).await {
        Ok(socket) => Ok((socket, held)),
        Err(e) => Err(format!("{host}:{port}: {e}")),
    }
}
