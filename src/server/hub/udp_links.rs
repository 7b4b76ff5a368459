//! The hub's side of tunneled UDP: asking a client session for its datagram
//! link when a UDP mapping first needs one, attaching the link the client
//! opens (QUIC or framed), and opening UDP sessions on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use super::registry::TunnelHub;
use super::session::Session;
use super::udp::{Route, Routes, TunnelUdpSession, UdpLink, UdpOpenError, SESSION_REPLIES};
use crate::core::sync::lock;
use crate::telemetry::MappingMetrics;
use crate::tunnel::datagram::{self, DatagramControl};
use crate::tunnel::message::ToClient;

impl TunnelHub {
    /// Opens a UDP session through `client` toward `host:port`: its link
    /// first (asked for now if the session has none), then the client's
    /// answer that it has a socket toward the target. The client ends the
    /// session on its own after well over `idle` of silence, should the
    /// server's word that it ended never come. Replies dropped for want of room
    /// count in `mapping`'s `queue_full` drops.
    pub async fn open_udp(
        &self,
        client: &str,
        host: &str,
        port: u16,
        idle: Duration,
        mapping: MappingMetrics,
    ) -> Result<TunnelUdpSession, UdpOpenError> {
        let session = self.session(client).ok_or_else(|| UdpOpenError::NoTunnel(format!("tunnel client {client} is not connected")))?;
        if !session.speaks_udp {
            return Err(UdpOpenError::NoTunnel(format!("tunnel client {client} is too old to carry UDP datagrams: upgrade it")));
        }
        let link = self.udp_link(&session).await?;
        let id = link.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (replies_tx, replies) = mpsc::channel(SESSION_REPLIES);
        let (opened_tx, opened) = oneshot::channel();
        lock(&link.routes.0).insert(id, Route { replies: replies_tx, opened: Some(opened_tx), mapping });
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
