//! A named client and its live session as visitors use it: the pool of idle data
//! channels, the visitors waiting for one, and the lease under which a channel
//! serves one visitor and comes back.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::core::secret::Secret;
use crate::core::sync::lock;
use crate::net::transport::TunnelStream;
use crate::tunnel::message::ToClient;

/// Idle data channels kept beyond this are closed; the client refills on demand.
const MAX_IDLE_DATA_CHANNELS: usize = 64;

/// A named client: its secret and, while it is connected, its session.
pub(super) struct Client {
    pub(super) name: String,
    pub(super) secret: Secret,
    pub(super) session: Mutex<Option<Arc<Session>>>,
    /// Cancelled when the client is removed: its session and every exchange on
    /// its data channels end.
    pub(super) removed: CancellationToken,
}

impl Client {
    pub(super) fn current(&self) -> Option<Arc<Session>> {
        lock(&self.session).clone()
    }
}

/// One authenticated connection of a client.
pub(super) struct Session {
    pub(super) id: u64,
    /// What this session's data channels present.
    pub(super) token: String,
    pub(super) peer: SocketAddr,
    /// Whether `peer` is one of this host's own addresses: the client runs
    /// here, so its targets are this host's too.
    pub(super) on_this_host: bool,
    /// Unix seconds.
    pub(super) authenticated_at: f64,
    pub(super) client: Arc<Client>,
    /// Whether the client announced `FEATURE_PROXY_HEADER`: only then may a
    /// `connect` ask it for a PROXY header (an older one would drop the request).
    pub(super) writes_proxy_headers: bool,
    /// Whether the client announced `FEATURE_UDP`: only then may it be asked
    /// for a datagram link.
    pub(super) speaks_udp: bool,
    /// Its datagram link, once the client opened one (see `udp`).
    pub(super) udp: tokio::sync::watch::Sender<Option<Arc<super::udp::UdpLink>>>,
    /// Whether the client was asked for a datagram link and has not answered.
    pub(super) udp_requested: std::sync::atomic::AtomicBool,
    /// Messages for the control channel's writer.
    pub(super) control: mpsc::Sender<ToClient>,
    pub(super) pool: Mutex<Pool>,
    /// Ends the session; a child of `server_stopping`.
    pub(super) cancel: CancellationToken,
    /// Cancelled when the session ends for any reason but the server's own
    /// shutdown (client silent or gone, replaced, removed): the exchanges on its
    /// data channels end with it. Their client end is gone, and on a cut link
    /// nothing would tell the visitors so until the idle timeout.
    pub(super) ended: CancellationToken,
    /// The server's own shutdown: a session it ends is not a client lost.
    pub(super) server_stopping: CancellationToken,
}

#[derive(Default)]
pub(super) struct Pool {
    /// Oldest first, with when each became idle.
    pub(super) idle: VecDeque<(TunnelStream, Instant)>,
    pub(super) waiting: VecDeque<oneshot::Sender<TunnelStream>>,
}

/// Where a data channel lent to one visitor goes back after a clean exchange.
pub struct Lease(pub(super) Arc<Session>);

impl Lease {
    /// Resolves when the channel's client is removed or its session ended
    /// (see [`Session::ended`]): its exchanges end then.
    pub async fn revoked(&self) {
        tokio::select! {
            _ = self.0.client.removed.cancelled() => {}
            _ = self.0.ended.cancelled() => {}
        }
    }

    /// Whether the channel's client was removed (rather than its session lost).
    pub fn client_removed(&self) -> bool {
        self.0.client.removed.is_cancelled()
    }

    /// Into the session's pool (or to a waiting visitor); closed if the session
    /// has ended meanwhile, after what the exchange wrote last.
    pub fn give_back(self, stream: TunnelStream) {
        match self.0.cancel.is_cancelled() {
            false => self.0.offer(stream),
            true => stream.close_gracefully(),
        }
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
