//! Tunneled UDP on the server: a client session's datagram link (see
//! `tunnel::datagram`) and the UDP sessions that travel on it, each with its
//! id, its bounded queue of replies and its end. How the hub asks a client for
//! its link and opens sessions on it is in `udp_links`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::core::sync::lock;
use crate::telemetry::MappingMetrics;
use crate::tunnel::datagram::{DatagramControl, Frame, LinkSender, SendError};

/// Replies from the target that may wait for one session's visitor; more are
/// dropped (`queue_full`).
pub(super) const SESSION_REPLIES: usize = 256;

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
pub(super) struct Route {
    pub(super) replies: mpsc::Sender<Bytes>,
    pub(super) opened: Option<oneshot::Sender<Option<String>>>,
    /// Its mapping's series, where replies dropped for want of room count
    /// (`queue_full`).
    pub(super) mapping: MappingMetrics,
}

/// The sessions on one link, by id.
#[derive(Default)]
pub(super) struct Routes(pub(super) Mutex<HashMap<u64, Route>>);

impl Routes {
    /// A frame from the client: a reply to its session's queue, or the answer
    /// to an open, or the client's own end of a session.
    pub(super) fn deliver(&self, frame: Frame) {
        match frame {
            Frame::Datagram { session, payload } => {
                let routes = lock(&self.0);
                if let Some(route) = routes.get(&session) {
                    if let Err(mpsc::error::TrySendError::Full(_)) = route.replies.try_send(payload) {
                        route.mapping.udp.dropped_queue_full.inc();
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
    pub(super) sender: LinkSender,
    /// `quic` or `framed`.
    pub(super) transport: &'static str,
    pub(super) routes: Arc<Routes>,
    pub(super) next_id: AtomicU64,
}

impl UdpLink {
    pub(super) fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// One UDP mapping session's way through its client: datagrams out, the
/// target's replies back. Dropping it ends the session at the client too.
pub struct TunnelUdpSession {
    pub(super) link: Arc<UdpLink>,
    pub(super) id: u64,
    pub(super) replies: mpsc::Receiver<Bytes>,
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
