//! The connection log's writer: ended connections arrive on a bounded queue
//! and are written in batches, one transaction each, off the data path.
//!
//! A connection's task only ever `try_send`s: when the queue is full (the disk
//! is slower than the visitors), the record is dropped and counted in
//! `tunneld_connection_log_dropped_total` — forwarding never waits for SQLite.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::core::time::unix_now;
use crate::store::connection_log::{EndedConnection, LogBounds};
use crate::store::Store;
use crate::telemetry::Metrics;

/// Ended connections that may wait for the writer: a few seconds of 5,000
/// connections a second.
const QUEUE: usize = 32_768;
/// Most rows in one transaction.
const MAX_BATCH: usize = 8_192;
/// After the first record of a batch arrives, how long the writer lets others
/// gather before writing: one transaction (one `fsync`) per burst, not per row.
const GATHER: Duration = Duration::from_millis(200);

/// Where connections report how they ended. Cheap to clone.
#[derive(Clone)]
pub(crate) struct LogSender {
    queue: mpsc::Sender<EndedConnection>,
    metrics: Arc<Metrics>,
}

impl LogSender {
    /// Queues `connection` for the log without waiting; counts it as dropped
    /// when the queue is full.
    pub(crate) fn send(&self, connection: EndedConnection) {
        if self.queue.try_send(connection).is_err() {
            self.metrics.connection_log_dropped();
        }
    }
}

/// Starts the writer. It ends once every [`LogSender`] is dropped and what they
/// sent is written: await the handle for the final batch.
pub(crate) fn spawn_writer(store: Store, bounds: LogBounds, metrics: Arc<Metrics>) -> (LogSender, JoinHandle<()>) {
    let (queue, mut arrivals) = mpsc::channel(QUEUE);
    let task = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(1024);
        // The log's row count, carried from batch to batch (counted once).
        let mut rows = None;
        loop {
            if arrivals.recv_many(&mut batch, MAX_BATCH).await == 0 {
                return;
            }
            tokio::time::sleep(GATHER).await;
            while batch.len() < MAX_BATCH {
                match arrivals.try_recv() {
                    Ok(connection) => batch.push(connection),
                    Err(_) => break,
                }
            }
            let size = batch.len();
            match store.log_connections(std::mem::take(&mut batch), bounds, unix_now(), rows).await {
                Ok(now) => rows = Some(now),
                Err(e) => {
                    // Count again next time: the transaction may or may not have happened.
                    rows = None;
                    warn!(error = %e, rows = size, "connection log: cannot write ended connections; they are lost");
                }
            }
        }
    });
    (LogSender { queue, metrics }, task)
}
