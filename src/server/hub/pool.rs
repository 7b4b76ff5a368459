//! A client's session as visitors use it: its pool of idle data channels, the
//! visitors waiting for one, and the lease under which a channel serves one
//! visitor and comes back.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Client, TunnelHub};
use crate::core::sync::lock;
use crate::net::transport::TunnelStream;
use crate::tunnel::exchange;
use crate::tunnel::frame::ProtocolError;
use crate::tunnel::message::{Connect, ToClient};

/// Idle data channels kept beyond this are closed; the client refills on demand.
const MAX_IDLE_DATA_CHANNELS: usize = 64;

/// Why no data channel could be had for a visitor.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("tunnel client {0} is not connected")]
    NoClient(String),
    #[error("the tunnel client did not provide a data channel in time")]
    Timeout,
    #[error("data channel failed: {0}")]
    Channel(#[from] ProtocolError),
}

/// One authenticated connection of a client.
pub(super) struct Session {
    pub(super) id: u64,
    /// What this session's data channels present.
    pub(super) token: String,
    pub(super) peer: SocketAddr,
    /// Unix seconds.
    pub(super) authenticated_at: f64,
    pub(super) client: Arc<Client>,
    /// Messages for the control channel's writer.
    pub(super) control: mpsc::Sender<ToClient>,
    pub(super) pool: Mutex<Pool>,
    pub(super) cancel: CancellationToken,
}

#[derive(Default)]
pub(super) struct Pool {
    /// Oldest first, with when each became idle.
    pub(super) idle: VecDeque<(TunnelStream, Instant)>,
    pub(super) waiting: VecDeque<oneshot::Sender<TunnelStream>>,
}

/// Where a data channel lent to one visitor goes back after a clean exchange.
pub struct Lease(Arc<Session>);

impl Lease {
    /// Resolves when the channel's client is removed: its exchanges end then.
    pub async fn revoked(&self) {
        self.0.client.removed.cancelled().await
    }

    /// Into the session's pool (or to a waiting visitor); dropped if the session
    /// has ended meanwhile.
    pub fn give_back(self, stream: TunnelStream) {
        if !self.0.cancel.is_cancelled() {
            self.0.offer(stream);
        }
    }
}

impl TunnelHub {
    /// Gets a data channel through `client` — a pooled one if one is idle, else
    /// one requested now — and sends it the `connect` request for `host:port`,
    /// with what `visitor` has already sent as the first chunk in the same write
    /// (returned: how many user bytes went with it). The client's answer is read
    /// by the caller, so the visitor's bytes travel ahead of it.
    pub async fn open(&self, client: &str, host: &str, port: u16, visitor: &TcpStream) -> Result<(TunnelStream, Lease, usize), OpenError> {
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        let connect = Connect::Connect { host: host.to_string(), port };
        let mut opening: Option<(Vec<u8>, usize)> = None;
        let no_client = || OpenError::NoClient(client.to_string());
        // A pooled channel whose client end is already gone fails the write; try
        // another. (One that dies later surfaces as a missing answer.)
        let mut last_error = OpenError::Timeout;
        for _ in 0..4 {
            let session = self.session(client).ok_or_else(no_client)?;
            let mut stream = match tokio::time::timeout_at(deadline, session.acquire(self.settings.pool_idle)).await {
                Ok(Some(stream)) => stream,
                Ok(None) => return Err(no_client()),
                Err(_) => return Err(OpenError::Timeout),
            };
            // Read once a channel is at hand (the visitor had longest to send),
            // and kept for the next channel should this one turn out stale.
            let (wire, sent_ahead) = opening.get_or_insert_with(|| {
                let early = exchange::early_bytes(visitor);
                (exchange::opening(&connect, &early), early.len())
            });
            let sent = async {
                stream.write_all(wire).await?;
                // Under TLS the request is not on its way until flushed.
                stream.flush().await
            };
            match sent.await.map_err(ProtocolError::Io) {
                Ok(()) => return Ok((stream, Lease(session), *sent_ahead)),
                Err(e) => {
                    debug!(error = %e, "stale data channel, trying another");
                    last_error = OpenError::Channel(e);
                }
            }
        }
        Err(last_error)
    }
}

impl Session {
    /// An idle channel, or a wait for the next one the client opens. `None` when
    /// the session died meanwhile.
    pub(super) async fn acquire(&self, max_idle: Duration) -> Option<TunnelStream> {
        let rx = {
            let mut pool = lock(&self.pool);
            // Most recently used first: it is the least likely to have been closed
            // by a middlebox or the client, and it lets the rest age out.
            while let Some((mut channel, since)) = pool.idle.pop_back() {
                if since.elapsed() < max_idle && !channel.is_stale() {
                    return Some(channel);
                }
            }
            let (tx, rx) = oneshot::channel();
            pool.waiting.push_back(tx);
            rx
        };
        // Ask for one more; the client also refills its pool on its own.
        let _ = self.control.try_send(ToClient::OpenDataChannel);
        tokio::select! {
            channel = rx => channel.ok(),
            _ = self.cancel.cancelled() => None,
        }
    }

    /// A new data channel from the client: to the longest-waiting visitor, else
    /// into the idle pool.
    pub(super) fn offer(&self, mut channel: TunnelStream) {
        let mut pool = lock(&self.pool);
        while let Some(waiter) = pool.waiting.pop_front() {
            match waiter.send(channel) {
                Ok(()) => return,
                Err(back) => channel = back,
            }
        }
        if pool.idle.len() < MAX_IDLE_DATA_CHANNELS {
            channel.release_read_ahead();
            pool.idle.push_back((channel, Instant::now()));
        }
    }

    /// Closes channels idle for `max_idle`; the client notices and opens fresh ones.
    pub(super) fn expire_idle(&self, max_idle: Duration) {
        lock(&self.pool).idle.retain(|(_, since)| since.elapsed() < max_idle);
    }
}
