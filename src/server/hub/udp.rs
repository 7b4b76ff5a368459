//! Tunneled UDP on the server: each client session's datagram link (see
//! `tunnel::datagram`), asked for when a UDP mapping first needs it, and the
//! UDP sessions that travel on it, each with its id, its bounded queue of
//! replies and its end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use super::registry::TunnelHub;
use super::session::Session;
use crate::core::sync::lock;
use crate::tunnel::datagram::{self, DatagramControl, Frame, LinkSender, SendError};
use crate::tunnel::message::ToClient;

/// Replies from the target that may wait for one session's visitor; more are
/// dropped (`queue_full`).
const SESSION_REPLIES: usize = 256;

/// Why a UDP session could not be opened through a client.
#[derive(Debug, thiserror::Error)]
pub enum UdpOpenError {
    /// The client is not connected, cannot carry UDP, or its link could not
    /// be had: the datagrams are dropped as `no_tunnel`.
    #[error("{0}")]
    NoTunnel(String),
    /// The client could not open the session toward the target.
    #[error("{0}")]
    Refused(String),
}

/// How one session's replies reach it, and its open's answer.
struct Route {
    replies: mpsc::Sender<Bytes>,
    opened: Option<oneshot::Sender<Option<String>>>,
    /// Its mapping's `queue_full` drops.
    queue_full: IntCounter,
}

/// The sessions on one link, by id.
#[derive(Default)]
struct Routes(Mutex<HashMap<u64, Route>>);

impl Routes {
    /// A frame from the client: a reply to its session's queue, or the answer
    /// to an open, or the client's own end of a session.
    fn deliver(&self, frame: Frame) {
        match frame {
            Frame::Datagram { session, payload } => {
                let routes = lock(&self.0);
                if let Some(route) = routes.get(&session) {
                    if let Err(mpsc::error::TrySendError::Full(_)) = route.replies.try_send(payload) {
                        route.queue_full.inc();
                    }
                }
            }
            Frame::Control(DatagramControl::Opened { session, error }) => {
                if let Some(opened) = lock(&self.0).get_mut(&session).and_then(|route| route.opened.take()) {
                    let _ = opened.send(error);
                }
            }
            // Its reply queue closes: the session ends.
            Frame::Control(DatagramControl::Close { session }) => {
                lock(&self.0).remove(&session);
            }
            // The server opens sessions; a client's `udp_open` means nothing.
            Frame::Control(DatagramControl::Open { .. }) => {}
        }
    }
}

/// A client session's datagram link.
pub(super) struct UdpLink {
    sender: LinkSender,
    /// `quic` or `framed`.
    pub(super) transport: &'static str,
    routes: Arc<Routes>,
    next_id: AtomicU64,
}

impl UdpLink {
    pub(super) fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// One UDP mapping session's way through its client: datagrams out, the
/// target's replies back. Dropping it ends the session at the client too.
pub struct TunnelUdpSession {
    link: Arc<UdpLink>,
    id: u64,
    replies: mpsc::Receiver<Bytes>,
}

impl TunnelUdpSession {
    /// Queues one datagram toward the target, without waiting.
    pub(crate) fn try_send(&self, datagram: Bytes) -> Result<(), SendError> {
        self.link.sender.try_datagram(self.id, datagram)
    }

    /// The target's next reply; `None` once the session is over at the client
    /// or the link is gone.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        tokio::select! {
            reply = self.replies.recv() => reply,
            _ = self.link.sender.closed() => None,
        }
    }
}

impl Drop for TunnelUdpSession {
    fn drop(&mut self) {
        let known = lock(&self.link.routes.0).remove(&self.id).is_some();
        if known && self.link.is_open() {
            let sender = self.link.sender.clone();
            let session = self.id;
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = sender.control(DatagramControl::Close { session }).await;
                });
            }
        }
    }
}

impl TunnelHub {
    /// Opens a UDP session through `client` toward `host:port`: its link
    /// first (asked for now if the session has none), then the client's
    /// answer that it has a socket toward the target. The client ends the
    /// session on its own after well over `idle` of silence, should the
    /// server's word that it ended never come. `queue_full` counts replies
    /// dropped for want of room.
    pub async fn open_udp(
        &self,
        client: &str,
        host: &str,
        port: u16,
        idle: Duration,
        queue_full: IntCounter,
    ) -> Result<TunnelUdpSession, UdpOpenError> {
        let session = self.session(client).ok_or_else(|| UdpOpenError::NoTunnel(format!("tunnel client {client} is not connected")))?;
        if !session.speaks_udp {
            return Err(UdpOpenError::NoTunnel(format!("tunnel client {client} is too old to carry UDP datagrams: upgrade it")));
        }
        let link = self.udp_link(&session).await?;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (replies_tx, replies) = mpsc::channel(SESSION_REPLIES);
        let (opened_tx, opened) = oneshot::channel();
        lock(&link.routes.0).insert(id, Route { replies: replies_tx, opened: Some(opened_tx), queue_full });
        // From here its drop ends the session, however this goes.
        let tunneled = TunnelUdpSession { link: link.clone(), id, replies };
        let lost = || UdpOpenError::NoTunnel(format!("the datagram link of tunnel client {client} ended"));
        let open = DatagramControl::Open { session: id, host: host.to_string(), port, idle_secs: idle.as_secs().max(1) };
        link.sender.control(open).await.map_err(|_| lost())?;
        let answer = tokio::select! {
            answer = tokio::time::timeout(self.settings.connect_timeout, opened) => answer,
            _ = link.sender.closed() => return Err(lost()),
        };
        match answer {
            Ok(Ok(None)) => Ok(tunneled),
            Ok(Ok(Some(e))) => Err(UdpOpenError::Refused(format!("the tunnel client could not reach the target: {e}"))),
            Ok(Err(_)) => Err(lost()),
            Err(_) => Err(UdpOpenError::Refused("the tunnel client did not answer the session's open in time".into())),
        }
    }

    /// The session's datagram link, asked of the client if it has none: it
    /// tries QUIC, then a framed channel.
    async fn udp_link(&self, session: &Session) -> Result<Arc<UdpLink>, UdpOpenError> {
        let mut links = session.udp.subscribe();
        if let Some(link) = links.borrow().as_ref().filter(|l| l.is_open()) {
            return Ok(link.clone());
        }
        if !session.udp_requested.swap(true, Ordering::SeqCst) {
            let _ = session.control.try_send(ToClient::OpenDatagrams);
        }
        let wait = self.settings.connect_timeout + datagram::QUIC_ATTEMPT;
        let linked = tokio::select! {
            linked = tokio::time::timeout(wait, links.wait_for(|l| l.as_ref().is_some_and(|l| l.is_open()))) => {
                linked.ok().and_then(|l| l.ok().and_then(|l| l.clone()))
            }
            _ = session.cancel.cancelled() => None,
        };
        linked.ok_or_else(|| {
            // The next datagram asks again.
            session.udp_requested.store(false, Ordering::SeqCst);
            UdpOpenError::NoTunnel(format!("tunnel client {} opened no datagram link in time", session.client.name))
        })
    }

    /// Makes `reader`/`writer` (with `quic`'s datagram lane, if given) the
    /// datagram link of `session`, replacing any before it, until it or the
    /// session ends.
    pub(super) fn attach_udp<R, W>(self: &Arc<Self>, session: &Arc<Session>, reader: R, writer: W, quic: Option<quinn::Connection>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let transport = if quic.is_some() { "quic" } else { "framed" };
        if let Some(connection) = &quic {
            let (sent, received) = self.metrics.tunnel_meters(&session.client.name);
            tokio::spawn(crate::net::quic::count_wire(connection.clone(), sent, received));
        }
        let routes = Arc::new(Routes::default());
        let deliver = routes.clone();
        let sender = datagram::start(reader, writer, quic, |_| Arc::new(move |frame| deliver.deliver(frame)), &session.cancel);
        let link = Arc::new(UdpLink { sender, transport, routes, next_id: AtomicU64::new(0) });
        if let Some(old) = session.udp.send_replace(Some(link.clone())) {
            old.sender.close();
        }
        let name = session.client.name.clone();
        self.metrics.set_udp_transport(&name, Some(transport));
        info!(client = %name, peer = %session.peer, session = session.id, udp_transport = transport, "the tunnel carries UDP datagrams");
        let hub = self.clone();
        let session = session.clone();
        tokio::spawn(async move {
            link.sender.closed().await;
            lock(&link.routes.0).clear();
            let current = session.udp.borrow().as_ref().is_some_and(|l| Arc::ptr_eq(l, &link));
            if current {
                session.udp.send_replace(None);
                session.udp_requested.store(false, Ordering::SeqCst);
                if !hub.session(&name).is_some_and(|s| s.id != session.id) {
                    hub.metrics.set_udp_transport(&name, None);
                }
            }
            debug!(client = %name, session = session.id, udp_transport = link.transport, "datagram link ended");
        });
    }
}
