//! Every open visitor connection, live, and the connection log it goes to
//! when it ends.
//!
//! A connection's byte counts are not a second tally: its two counters are
//! fed by the same `Meter::record` that adds to its mapping's counters (see
//! `Meter::tallying`), so at every moment the open connections of a port plus
//! those that ended add up to the port's `tunneld_mapping_bytes_total`.
//!
//! The table costs one lock, one insert and one remove per connection; what an
//! ended connection leaves for the log is queued without waiting (see
//! `history::connection_log`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::core::protocol::{MappingKey, Protocol};
use crate::core::sync::lock;
use crate::core::time::unix_now;
use crate::history::connection_log::LogSender;
use crate::store::connection_log::EndedConnection;

/// How often each open connection's rate is taken: the rates `/api/connections`
/// shows are over the last this long.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(2);

/// How a visitor connection ended, as the log and the API name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Both sides finished cleanly.
    Closed,
    /// The visitor reset (or its socket failed).
    VisitorReset,
    /// The target reset (through the tunnel: the client's side of it, or the tunnel broke).
    TargetReset(Option<String>),
    /// No byte either way for `server.idle_timeout_secs`.
    IdleTimeout,
    /// The target could not be reached.
    TargetUnreachable(String),
    /// Refused at accept; the reason as in `tunneld_mapping_refused_total`.
    Refused(&'static str),
    /// Its mapping was removed.
    MappingRemoved,
    /// Its tunnel client was removed.
    ClientRemoved,
    /// The daemon stopped and the grace period ran out.
    Shutdown,
    /// `POST /api/connection/close` reset it.
    ClosedByApi,
}

impl End {
    /// The name the log and the API use.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::VisitorReset => "visitor_reset",
            End::TargetReset(_) => "target_reset",
            End::IdleTimeout => "idle_timeout",
            End::TargetUnreachable(_) => "target_unreachable",
            End::Refused(_) => "refused",
            End::MappingRemoved => "mapping_removed",
            End::ClientRemoved => "client_removed",
            End::Shutdown => "shutdown",
            End::ClosedByApi => "closed_by_api",
        }
    }

    /// For `refused`, why; for an unreachable target or a reset through the
    /// tunnel, what was said.
    fn into_reason(self) -> Option<String> {
        match self {
            End::Refused(reason) => Some(reason.to_string()),
            End::TargetUnreachable(why) => Some(why),
            End::TargetReset(why) => why,
            _ => None,
        }
    }
}

/// One open visitor connection.
pub(crate) struct OpenConnection {
    pub(crate) id: u64,
    pub(crate) port: u16,
    pub(crate) protocol: Protocol,
    /// The tunnel client serving it (tunneled mappings): of a group, the
    /// first one until a member takes it, then the one that did.
    pub(crate) client: Mutex<Option<Arc<str>>>,
    pub(crate) source: SocketAddr,
    /// Unix seconds.
    pub(crate) started_at: f64,
    /// Visitor → target bytes: counted by the relay's upstream meter.
    pub(crate) sent: Arc<AtomicU64>,
    /// Target → visitor bytes.
    pub(crate) received: Arc<AtomicU64>,
    close: Notify,
    rate: Mutex<RateSample>,
}

#[derive(Default)]
struct RateSample {
    /// When the counts below were read; `None` until the first sample.
    at: Option<Instant>,
    sent: u64,
    received: u64,
    /// Bytes per second over the window that ended at `at`.
    sent_rate: f64,
    received_rate: f64,
}

/// An open connection as `/api/connections` shows it.
pub(crate) struct ConnectionView {
    pub(crate) id: u64,
    pub(crate) port: u16,
    pub(crate) protocol: Protocol,
    pub(crate) client: Option<String>,
    pub(crate) source: SocketAddr,
    pub(crate) started_at: f64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) sent_rate: f64,
    pub(crate) received_rate: f64,
}

/// Every open connection, and where ended ones go.
pub(crate) struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<OpenConnection>>>,
    /// `None` with `history.connection_log = false`, and after [`Connections::close_log`].
    log: Mutex<Option<LogSender>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Connections {
    /// A table whose ids start after `last_id` (the log's largest, so ids stay
    /// unique across restarts), logging ended connections to `log` if given.
    /// Starts the task that samples rates.
    pub(crate) fn new(last_id: u64, log: Option<(LogSender, JoinHandle<()>)>) -> Arc<Connections> {
        let (sender, writer) = log.unzip();
        let table = Arc::new(Connections {
            next_id: AtomicU64::new(last_id + 1),
            open: Mutex::new(HashMap::new()),
            log: Mutex::new(sender),
            writer: Mutex::new(writer),
        });
        tokio::spawn(sample_rates(Arc::downgrade(&table)));
        table
    }

    /// Registers a visitor that was admitted. Its meters must be given
    /// [`Tracked::sent`] and [`Tracked::received`] to tally into.
    pub(crate) fn open(self: &Arc<Self>, key: MappingKey, client: Option<Arc<str>>, source: SocketAddr) -> Tracked {
        let connection = Arc::new(OpenConnection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            port: key.port,
            protocol: key.protocol,
            client: Mutex::new(client),
            source,
            started_at: unix_now(),
            sent: Arc::new(AtomicU64::new(0)),
            received: Arc::new(AtomicU64::new(0)),
            close: Notify::new(),
            rate: Mutex::new(RateSample::default()),
        });
        lock(&self.open).insert(connection.id, connection.clone());
        Tracked { table: self.clone(), connection, finished: false }
    }

    /// A visitor refused at accept: logged (never listed as open).
    pub(crate) fn refused(&self, key: MappingKey, client: Option<&str>, source: SocketAddr, reason: &'static str) {
        let log = lock(&self.log);
        let Some(log) = log.as_ref() else { return };
        let now = unix_now();
        log.send(EndedConnection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            port: key.port,
            protocol: key.protocol,
            client: client.map(Arc::from),
            source,
            started_at: now,
            ended_at: now,
            bytes_sent: 0,
            bytes_received: 0,
            end: End::Refused(reason).name(),
            reason: Some(reason.to_string()),
        });
    }

    /// Asks the connection `id` to end with a reset to its visitor; `false`
    /// when no such connection is open.
    pub(crate) fn close(&self, id: u64) -> bool {
        match lock(&self.open).get(&id) {
            Some(connection) => {
                connection.close.notify_one();
                true
            }
            None => false,
        }
    }

    /// The open connections of `port` (any, if `None`) and `client`, oldest
    /// first, at most `limit`; and how many match in all.
    pub(crate) fn list(
        &self,
        port: Option<u16>,
        protocol: Option<Protocol>,
        client: Option<&str>,
        limit: usize,
    ) -> (Vec<ConnectionView>, usize) {
        let open = lock(&self.open);
        let mut matching: Vec<&Arc<OpenConnection>> = open
            .values()
            .filter(|c| port.map_or(true, |p| c.port == p))
            .filter(|c| protocol.map_or(true, |p| c.protocol == p))
            .filter(|c| client.map_or(true, |name| lock(&c.client).as_deref() == Some(name)))
            .collect();
        let count = matching.len();
        matching.sort_unstable_by_key(|c| c.id);
        let views = matching.into_iter().take(limit).map(|c| view(c)).collect();
        (views, count)
    }

    /// At shutdown, once every connection has ended: stops taking records and
    /// waits until the writer has stored what it was sent.
    pub(crate) async fn close_log(&self) {
        lock(&self.log).take();
        let writer = lock(&self.writer).take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }

    fn finish(&self, connection: &OpenConnection, end: End) {
        lock(&self.open).remove(&connection.id);
        let log = lock(&self.log);
        let Some(log) = log.as_ref() else { return };
        log.send(EndedConnection {
            id: connection.id,
            port: connection.port,
            protocol: connection.protocol,
            client: lock(&connection.client).clone(),
            source: connection.source,
            started_at: connection.started_at,
            ended_at: unix_now(),
            bytes_sent: connection.sent.load(Ordering::Relaxed),
            bytes_received: connection.received.load(Ordering::Relaxed),
            end: end.name(),
            reason: end.into_reason(),
        });
    }
}

fn view(c: &OpenConnection) -> ConnectionView {
    let (bytes_sent, bytes_received) = (c.sent.load(Ordering::Relaxed), c.received.load(Ordering::Relaxed));
    let sample = lock(&c.rate);
    let (sent_rate, received_rate) = match sample.at {
        Some(_) => (sample.sent_rate, sample.received_rate),
        // Younger than one window: its average so far.
        None => {
            let age = (unix_now() - c.started_at).max(0.001);
            (bytes_sent as f64 / age, bytes_received as f64 / age)
        }
    };
    ConnectionView {
        id: c.id,
        port: c.port,
        protocol: c.protocol,
        client: lock(&c.client).as_deref().map(str::to_string),
        source: c.source,
        started_at: c.started_at,
        bytes_sent,
        bytes_received,
        sent_rate,
        received_rate,
    }
}

/// Every [`RATE_WINDOW`], each open connection's bytes per second over the
/// window just past; ends when the table is dropped.
async fn sample_rates(table: Weak<Connections>) {
    let mut tick = tokio::time::interval(RATE_WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(table) = table.upgrade() else { return };
        let open: Vec<Arc<OpenConnection>> = lock(&table.open).values().cloned().collect();
        let now = Instant::now();
        for c in open {
            let (sent, received) = (c.sent.load(Ordering::Relaxed), c.received.load(Ordering::Relaxed));
            let mut sample = lock(&c.rate);
            let since = match sample.at {
                Some(at) => now.duration_since(at).as_secs_f64(),
                None => (unix_now() - c.started_at).max(0.001),
            };
            if since > 0.0 {
                sample.sent_rate = (sent - sample.sent) as f64 / since;
                sample.received_rate = (received - sample.received) as f64 / since;
            }
            *sample = RateSample { at: Some(now), sent, received, ..*sample };
        }
    }
}

/// An admitted visitor's entry, until [`Tracked::finish`] says how it ended
/// (dropped without, it ends as `shutdown`: its task was cut).
pub(crate) struct Tracked {
    table: Arc<Connections>,
    connection: Arc<OpenConnection>,
    finished: bool,
}

impl Tracked {
    /// The mapping's port.
    pub(crate) fn port(&self) -> u16 {
        self.connection.port
    }

    /// The visitor's address.
    pub(crate) fn source(&self) -> SocketAddr {
        self.connection.source
    }

    /// What the upstream meter tallies into.
    pub(crate) fn sent(&self) -> Arc<AtomicU64> {
        self.connection.sent.clone()
    }

    /// What the downstream meter tallies into.
    pub(crate) fn received(&self) -> Arc<AtomicU64> {
        self.connection.received.clone()
    }

    /// The tunnel client of its group that took it: what the list and the
    /// log show from now on.
    pub(crate) fn served_by(&self, client: &Arc<str>) {
        let mut current = lock(&self.connection.client);
        if current.as_ref() != Some(client) {
            *current = Some(client.clone());
        }
    }

    /// Resolves when `POST /api/connection/close` names this connection.
    pub(crate) async fn close_requested(&self) {
        self.connection.close.notified().await
    }

    /// Removes it from the open ones and logs how it ended.
    pub(crate) fn finish(mut self, end: End) {
        self.finished = true;
        self.table.finish(&self.connection, end);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.finished {
            self.table.finish(&self.connection, End::Shutdown);
        }
    }
}
