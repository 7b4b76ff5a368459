//! The traffic recorder: turns the registry's live counters into history that
//! outlives the process.
//!
//! Every `history.interval_secs` it reads each mapping's byte counters (and the
//! tunnel's wire bytes), subtracts its own previous reading *in this process*, and
//! writes the difference into minute, hour and day buckets plus lifetime totals in
//! one transaction (`store::history`). Because the baseline is the previous
//! reading and a new process starts from counters at 0, a restart never counts a
//! byte twice; a crash loses at most the last interval; the final flush after
//! the SIGTERM drain loses nothing. A failed write keeps the old baseline, so its
//! bytes go into the next flush instead of being dropped.
//!
//! The clock is injected so tests can move time (retention, roll-ups) without
//! waiting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::HistorySettings;
use crate::metrics::Metrics;
use crate::store::history::{Delta, Flush, Pruned, RETENTION_BATCH};
use crate::store::{Store, StoreError};

/// Tunnel wire bytes are recorded per client; until the server serves named
/// clients (DESIGN.md "Clients"), its one client is `default`.
pub const DEFAULT_CLIENT: &str = "default";

/// Unix seconds now; replaceable in tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| crate::metrics::unix_now() as i64)
}

pub struct Recorder {
    store: Store,
    metrics: Arc<Metrics>,
    settings: HistorySettings,
    clock: Clock,
    retention_batch: i64,
    /// Flushes never overlap (the periodic one and the final one at shutdown).
    flushing: tokio::sync::Mutex<()>,
    state: Mutex<Baseline>,
}

/// What has been written so far, as seen from this process.
#[derive(Default)]
struct Baseline {
    /// Counter values at the last successful flush.
    mappings: BTreeMap<u16, (u64, u64)>,
    tunnel: (u64, u64),
    /// Stored lifetime totals, kept in step with the database after each commit.
    lifetime: BTreeMap<u16, (u64, u64)>,
}

/// A counter's growth since `before`; a smaller value means the series was
/// recreated (mapping removed and created again), which starts again from 0.
fn growth(now: u64, before: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

impl Recorder {
    /// Loads the stored lifetime totals so they are exact from the first request.
    pub async fn new(store: Store, metrics: Arc<Metrics>, settings: HistorySettings, clock: Clock) -> Result<Recorder, StoreError> {
        let lifetime = store.lifetime_totals().await?;
        Ok(Recorder {
            store,
            metrics,
            settings,
            clock,
            retention_batch: RETENTION_BATCH,
            flushing: tokio::sync::Mutex::new(()),
            state: Mutex::new(Baseline { lifetime, ..Baseline::default() }),
        })
    }

    /// Smaller retention steps, so tests can watch retention work in steps.
    pub fn with_retention_batch(mut self, rows: i64) -> Recorder {
        self.retention_batch = rows.max(1);
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> HistorySettings {
        self.settings
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    fn baseline(&self) -> std::sync::MutexGuard<'_, Baseline> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the registry and writes what moved since the last flush.
    pub async fn flush(&self) -> Result<Pruned, StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        let at = self.now();
        let (mappings, tunnel) = self.metrics.byte_totals();
        let (deltas, tunnel_delta) = {
            let base = self.baseline();
            let deltas: Vec<Delta<u16>> = mappings
                .iter()
                .map(|(&port, &(sent, received))| {
                    let (bs, br) = base.mappings.get(&port).copied().unwrap_or_default();
                    Delta { key: port, sent: growth(sent, bs), received: growth(received, br) }
                })
                .filter(|d| d.sent > 0 || d.received > 0)
                .collect();
            let tunnel_delta = Delta {
                key: DEFAULT_CLIENT.to_string(),
                sent: growth(tunnel.0, base.tunnel.0),
                received: growth(tunnel.1, base.tunnel.1),
            };
            (deltas, tunnel_delta)
        };
        let s = self.settings;
        let flush = Flush {
            at,
            utc_offset: s.utc_offset_secs,
            mappings: deltas.clone(),
            tunnel: if tunnel_delta.sent > 0 || tunnel_delta.received > 0 { vec![tunnel_delta] } else { vec![] },
            keep_minutes_from: at - s.minute_retention_secs,
            keep_hours_from: at - s.hour_retention_secs,
            keep_days_from: at - s.day_retention_secs,
            retention_batch: self.retention_batch,
        };
        let pruned = self.store.flush_history(flush).await?;
        {
            let mut base = self.baseline();
            for d in &deltas {
                let entry = base.lifetime.entry(d.key).or_default();
                entry.0 += d.sent;
                entry.1 += d.received;
            }
            // Removed mappings drop out of the baseline with their series.
            base.mappings = mappings;
            base.tunnel = tunnel;
        }
        self.metrics.history_flushed(at as f64);
        debug!(mappings = deltas.len(), pruned_minute = pruned.minute, pruned_hour = pruned.hour, pruned_day = pruned.day, "history flushed");
        Ok(pruned)
    }

    /// Lifetime (sent, received) per port: stored totals plus what the counters
    /// gained since the last flush — exact at any moment.
    pub fn lifetime(&self) -> BTreeMap<u16, (u64, u64)> {
        let base = self.baseline();
        // Read under the lock: a flush updates baseline and lifetime together.
        let (now, _) = self.metrics.byte_totals();
        let mut out = base.lifetime.clone();
        for (port, (sent, received)) in now {
            let (bs, br) = base.mappings.get(&port).copied().unwrap_or_default();
            let entry = out.entry(port).or_default();
            entry.0 += growth(sent, bs);
            entry.1 += growth(received, br);
        }
        out
    }

    /// Flushes every `interval_secs` until `shutdown`; the caller runs the final
    /// flush after connections have drained.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(self.settings.interval_secs));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; nothing has moved yet
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    match self.flush().await {
                        Ok(_) if failing => { failing = false; warn!("history recorder writes again"); }
                        Ok(_) => {}
                        // Logged once per outage, not once per interval; the bytes stay
                        // in the next flush's delta.
                        Err(e) if !failing => { failing = true; warn!(error = %e, "history recorder cannot write; will retry every interval"); }
                        Err(_) => {}
                    }
                }
            }
        }
    }
}
