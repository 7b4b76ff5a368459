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
use crate::core::calendar::{period_label, Step};
use crate::core::protocol::MappingKey;
use crate::core::sync::lock;
use crate::core::traffic::Traffic;
use crate::store::history::{Delta, Flush, Point, Pruned, ReportRow, Runs, RETENTION_BATCH};
use crate::store::{Store, StoreError};
use crate::telemetry::{ByteTotals, Metrics};

/// Unix seconds now; replaceable in tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The wall clock, in Unix seconds.
pub fn system_clock() -> Clock {
    Arc::new(|| crate::core::time::unix_now() as i64)
}

/// Writes what the counters gained into the history, once per interval and at shutdown.
pub struct Recorder {
    store: Store,
    metrics: Arc<Metrics>,
    settings: HistorySettings,
    clock: Clock,
    /// When this run (process) started recording: its row in the store's runs.
    started: i64,
    retention_batch: i64,
    /// Flushes never overlap (the periodic one and the final one at shutdown).
    flushing: tokio::sync::Mutex<()>,
    state: Mutex<Baseline>,
    /// Set while writes fail (a full or read-only disk), cleared by the next
    /// success: `/health` reports it, as history is then not being recorded.
    failing: Mutex<Option<WriteFailure>>,
}

/// Why the history is not being written, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WriteFailure {
    /// When the first failed write of this outage was tried (recorder clock).
    pub(crate) since: i64,
    /// The latest write's error.
    pub(crate) error: String,
}

/// What has been written so far, as seen from this process.
#[derive(Default)]
struct Baseline {
    /// Counter values at the last successful flush.
    mappings: BTreeMap<MappingKey, Traffic>,
    /// Tunnel wire bytes per client (`default` until clients have names).
    tunnel: BTreeMap<String, Traffic>,
    /// Stored lifetime totals, kept in step with the database after each commit.
    lifetime: BTreeMap<MappingKey, Traffic>,
}

/// What a pair of counters gained since `before`, each direction on its own; a
/// counter below its earlier reading means the series was recreated (mapping
/// removed and created again), which starts again from 0.
fn growth(now: Traffic, before: Traffic) -> Traffic {
    let one = |now: u64, before: u64| if now >= before { now - before } else { now };
    Traffic { sent: one(now.sent, before.sent), received: one(now.received, before.received) }
}

/// What each counter pair gained since `base`; pairs that did not move are left out.
fn deltas_since<K: Ord + Clone>(now: &BTreeMap<K, Traffic>, base: &BTreeMap<K, Traffic>) -> Vec<Delta<K>> {
    now.iter()
        .map(|(key, &counters)| Delta { key: key.clone(), traffic: growth(counters, base.get(key).copied().unwrap_or_default()) })
        .filter(|d| !d.traffic.is_zero())
        .collect()
}

impl Recorder {
    /// Loads the stored lifetime totals so they are exact from the first request.
    pub async fn new(store: Store, metrics: Arc<Metrics>, settings: HistorySettings, clock: Clock) -> Result<Recorder, StoreError> {
        let lifetime = store.lifetime_totals().await?;
        let started = clock();
        Ok(Recorder {
            store,
            metrics,
            settings,
            clock,
            started,
            retention_batch: RETENTION_BATCH,
            flushing: tokio::sync::Mutex::new(()),
            state: Mutex::new(Baseline { lifetime, ..Baseline::default() }),
            failing: Mutex::new(None),
        })
    }

    /// Smaller retention steps, so tests can watch retention work in steps.
    #[cfg(test)]
    pub(crate) fn with_retention_batch(mut self, rows: i64) -> Recorder {
        self.retention_batch = rows.max(1);
        self
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn settings(&self) -> HistorySettings {
        self.settings
    }

    pub(crate) fn now(&self) -> i64 {
        (self.clock)()
    }

    fn baseline(&self) -> std::sync::MutexGuard<'_, Baseline> {
        lock(&self.state)
    }

    /// Reads the registry and writes what moved since the last flush.
    pub async fn flush(&self) -> Result<Pruned, StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        let at = self.now();
        let ByteTotals { mappings, tunnel } = self.metrics.byte_totals();
        let (deltas, tunnel_deltas) = {
            let base = self.baseline();
            (deltas_since(&mappings, &base.mappings), deltas_since(&tunnel, &base.tunnel))
        };
        let s = self.settings;
        let flush = Flush {
            at,
            run_started: self.started,
            utc_offset: s.utc_offset_secs,
            mappings: deltas.clone(),
            tunnel: tunnel_deltas,
            keep_minutes_from: at - s.minute_retention_secs,
            keep_hours_from: at - s.hour_retention_secs,
            keep_days_from: at - s.day_retention_secs,
            retention_batch: self.retention_batch,
        };
        let pruned = match self.store.flush_history(flush).await {
            Ok(pruned) => pruned,
            Err(e) => {
                let mut failing = lock(&self.failing);
                let since = failing.as_ref().map_or(at, |f| f.since);
                *failing = Some(WriteFailure { since, error: e.to_string() });
                return Err(e);
            }
        };
        *lock(&self.failing) = None;
        {
            let mut base = self.baseline();
            for d in &deltas {
                *base.lifetime.entry(d.key).or_default() += d.traffic;
            }
            // Removed mappings drop out of the baseline with their series.
            base.mappings = mappings;
            base.tunnel = tunnel;
        }
        self.metrics.history_flushed(at as f64);
        debug!(
            mappings = deltas.len(),
            pruned_minute = pruned.minute,
            pruned_hour = pruned.hour,
            pruned_day = pruned.day,
            "history flushed"
        );
        Ok(pruned)
    }

    /// [`Recorder::flush`] for callers that cannot do more about a failure than
    /// log it (the bytes stay in the next flush's delta).
    pub(crate) async fn flush_logged(&self) {
        if let Err(e) = self.flush().await {
            warn!(error = %e, "traffic history flush failed; retried at the next interval");
        }
    }

    /// Why history is not being recorded, while its writes fail.
    pub(crate) fn write_failure(&self) -> Option<WriteFailure> {
        lock(&self.failing).clone()
    }

    /// Lifetime traffic per port: stored totals plus what the counters gained
    /// since the last flush — exact at any moment.
    pub(crate) fn lifetime(&self) -> BTreeMap<MappingKey, Traffic> {
        let base = self.baseline();
        // Read under the lock: a flush updates baseline and lifetime together.
        let now = self.metrics.byte_totals().mappings;
        let mut out = base.lifetime.clone();
        for (port, counters) in now {
            *out.entry(port).or_default() += growth(counters, base.mappings.get(&port).copied().unwrap_or_default());
        }
        out
    }

    /// What each port's counters gained since the last flush: the bytes the next
    /// flush will write into the bucket it runs in.
    fn unflushed(&self) -> BTreeMap<MappingKey, Traffic> {
        let base = self.baseline();
        let now = self.metrics.byte_totals().mappings;
        now.into_iter()
            .map(|(port, counters)| (port, growth(counters, base.mappings.get(&port).copied().unwrap_or_default())))
            .filter(|(_, t)| !t.is_zero())
            .collect()
    }

    /// A history series over `[from, to)` as of now: the stored buckets plus the
    /// bytes not yet flushed, counted in the bucket in progress (where the next
    /// flush puts them). So the series' sum always equals what the live counters
    /// say, not what they said at the last flush. With the points: the moment the
    /// counters were read (`as_of`) and the spans of the range no recorder run
    /// covered (the daemon was down), finer than the minute coverage.
    pub(crate) async fn points(&self, step: Step, port: Option<MappingKey>, from: i64, to: i64) -> Result<Series, StoreError> {
        // No flush in between: a byte is either in the store or unflushed, never both or neither.
        let _no_flush = self.flushing.lock().await;
        let offset = self.settings.utc_offset_secs;
        let mut points = self.store.history_points(step, port, from, to, offset).await?;
        let as_of = self.now();
        let unflushed = self.unflushed();
        let gained =
            unflushed.iter().filter(|(p, _)| port.map_or(true, |want| **p == want)).fold(Traffic::default(), |sum, (_, t)| sum + *t);
        let current = step.bucket_start(as_of, offset);
        if !gained.is_zero() && current >= step.bucket_start(from, offset) && current < to {
            add_to_point(&mut points, current, gained);
        }
        let Runs { before, mut runs } = self.store.history_runs(from, to).await?;
        // This run covers up to now, whether or not it has written yet.
        match runs.iter_mut().find(|(started, _)| *started == self.started) {
            Some(run) => run.1 = run.1.max(as_of),
            None if self.started < to => {
                runs.push((self.started, as_of));
                runs.sort_unstable();
            }
            None => {}
        }
        Ok(Series { points, as_of, unrecorded: unrecorded(before, &runs, from, to) })
    }

    /// Per-period, per-port totals over `[from, to)` as of now: stored rows plus
    /// the unflushed bytes in the period in progress (see [`Recorder::points`]).
    pub(crate) async fn report(&self, period: Step, from: i64, to: i64) -> Result<(Vec<ReportRow>, i64), StoreError> {
        let _no_flush = self.flushing.lock().await;
        let offset = self.settings.utc_offset_secs;
        let mut rows = self.store.history_report(period, from, to, offset).await?;
        let as_of = self.now();
        let current = period.bucket_start(as_of, offset);
        if current >= period.bucket_start(from, offset) && current < to {
            for (port, gained) in self.unflushed() {
                add_to_row(&mut rows, period, current, offset, port, gained);
            }
        }
        Ok((rows, as_of))
    }

    /// Flushes every `interval_secs` until `shutdown`; the caller runs the final
    /// flush after connections have drained.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
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

/// A series as of `as_of`, see [`Recorder::points`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Series {
    pub(crate) points: Vec<Point>,
    pub(crate) as_of: i64,
    /// `(from, to)` spans of the range that no recorder run covered, oldest first.
    pub(crate) unrecorded: Vec<(i64, i64)>,
}

/// The spans of `[from, to)` between one run's last write and the next run's
/// start. `runs` are (started, last write), by start; `before` is the last write
/// of the latest run before them. Time before the first run ever is not an outage.
fn unrecorded(before: Option<i64>, runs: &[(i64, i64)], from: i64, to: i64) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut covered_until = before;
    for &(started, last) in runs {
        if let Some(until) = covered_until {
            let (gap_from, gap_to) = (until.max(from), started.min(to));
            if gap_to > gap_from {
                out.push((gap_from, gap_to));
            }
        }
        covered_until = Some(covered_until.map_or(last, |until| until.max(last)));
    }
    out
}

/// Adds `gained` to the point of bucket `t`, or inserts that point in time
/// order (a minute series has no point for a minute not flushed yet).
fn add_to_point(points: &mut Vec<Point>, t: i64, gained: Traffic) {
    match points.binary_search_by_key(&t, |p| p.t) {
        Ok(i) => {
            points[i].bytes_sent += gained.sent;
            points[i].bytes_received += gained.received;
        }
        Err(i) => points.insert(i, Point { t, bytes_sent: gained.sent, bytes_received: gained.received }),
    }
}

/// Adds `gained` to the row of (`start`, `port`), or inserts that row in the
/// report's order (period, then port).
fn add_to_row(rows: &mut Vec<ReportRow>, period: Step, start: i64, utc_offset: i64, key: MappingKey, gained: Traffic) {
    match rows.binary_search_by_key(&(start, key), |r| (r.period_start, MappingKey { port: r.port, protocol: r.protocol })) {
        Ok(i) => {
            rows[i].bytes_sent += gained.sent;
            rows[i].bytes_received += gained.received;
        }
        Err(i) => rows.insert(
            i,
            ReportRow {
                period: period_label(start, period, utc_offset),
                period_start: start,
                port: key.port,
                protocol: key.protocol,
                bytes_sent: gained.sent,
                bytes_received: gained.received,
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HistoryConfig;
    use crate::core::calendar::{days_from_civil, Step};
    use std::sync::atomic::{AtomicI64, Ordering};

    const PLUS_8: &str = "+08:00";

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        metrics: Arc<Metrics>,
        now: Arc<AtomicI64>,
        recorder: Recorder,
    }

    async fn fixture(offset: &str, start: i64, batch: i64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let now = Arc::new(AtomicI64::new(start));
        let settings = HistoryConfig { utc_offset: offset.into(), ..HistoryConfig::default() }.settings().unwrap();
        let clock_now = now.clone();
        let clock: Clock = Arc::new(move || clock_now.load(Ordering::SeqCst));
        let recorder = Recorder::new(store.clone(), metrics.clone(), settings, clock).await.unwrap().with_retention_batch(batch);
        Fixture { _dir: dir, store, metrics, now, recorder }
    }

    fn bytes(sent: u64, received: u64) -> Traffic {
        Traffic { sent, received }
    }

    /// 2026-11-29 at `h:m` UTC.
    fn utc(h: i64, m: i64) -> i64 {
        days_from_civil(2026, 11, 29) * 86_400 + h * 3600 + m * 60
    }

    #[tokio::test]
    async fn deltas_roll_up_into_hours_and_local_days_without_double_counting() {
        let f = fixture(PLUS_8, utc(15, 58), RETENTION_BATCH).await;
        let a = f.metrics.add_mapping(crate::core::protocol::MappingKey::tcp(4000), ["127.0.0.1:9", "direct", "", ""]);
        let b = f.metrics.add_mapping(crate::core::protocol::MappingKey::tcp(4001), ["127.0.0.1:9", "direct", "", ""]);
        a.sent.inc_by(100);
        a.received.inc_by(10);
        f.recorder.flush().await.unwrap();
        // A flush with nothing new adds nothing.
        f.recorder.flush().await.unwrap();
        a.sent.inc_by(50);
        b.received.inc_by(7);
        f.now.store(utc(15, 59), Ordering::SeqCst);
        f.recorder.flush().await.unwrap();
        // 16:01 UTC is 00:01 on the 30th at +08:00: a new local day.
        a.sent.inc_by(1000);
        f.now.store(utc(16, 1), Ordering::SeqCst);
        f.recorder.flush().await.unwrap();

        let minutes = f
            .store
            .history_points(Step::Minute, Some(crate::core::protocol::MappingKey::tcp(4000)), utc(15, 0), utc(17, 0), 8 * 3600)
            .await
            .unwrap();
        let sent: Vec<(i64, u64)> = minutes.iter().map(|p| (p.t, p.bytes_sent)).collect();
        assert_eq!(sent, vec![(utc(15, 58), 100), (utc(15, 59), 50), (utc(16, 1), 1000)], "minute 16:00 was not recorded: a gap");
        let hours = f.store.history_points(Step::Hour, None, utc(15, 0), utc(17, 0), 8 * 3600).await.unwrap();
        assert_eq!(hours.iter().map(|p| (p.bytes_sent, p.bytes_received)).collect::<Vec<_>>(), vec![(150, 17), (1000, 0)]);
        let local_day_29 = days_from_civil(2026, 11, 29) * 86_400 - 8 * 3600;
        let report = f.store.history_report(Step::Day, local_day_29, local_day_29 + 2 * 86_400, 8 * 3600).await.unwrap();
        let rows: Vec<(String, u16, u64, u64)> =
            report.iter().map(|r| (r.period.clone(), r.port, r.bytes_sent, r.bytes_received)).collect();
        assert_eq!(
            rows,
            vec![("2026-11-29".into(), 4000, 150, 10), ("2026-11-29".into(), 4001, 0, 7), ("2026-11-30".into(), 4000, 1000, 0)]
        );
        // At +08:00 both local days are in November.
        let month = f.store.history_report(Step::Month, local_day_29, local_day_29 + 2 * 86_400, 8 * 3600).await.unwrap();
        assert_eq!(
            month.iter().map(|r| (r.period.as_str(), r.port, r.bytes_sent)).collect::<Vec<_>>(),
            vec![("2026-11", 4000, 1150), ("2026-11", 4001, 0)]
        );

        // Unflushed bytes are in the lifetime totals at once.
        b.sent.inc_by(5);
        assert_eq!(f.recorder.lifetime().get(&crate::core::protocol::MappingKey::tcp(4001)), Some(&bytes(5, 7)));
        assert_eq!(f.recorder.lifetime().get(&crate::core::protocol::MappingKey::tcp(4000)), Some(&bytes(1150, 10)));
    }

    #[test]
    fn unrecorded_spans_lie_between_runs() {
        // Before the first run ever: not an outage.
        assert_eq!(unrecorded(None, &[(100, 200), (240, 300)], 0, 1000), vec![(200, 240)]);
        // A run that ended before the range; the span is clipped to the range.
        assert_eq!(unrecorded(Some(50), &[(100, 200)], 60, 150), vec![(60, 100)]);
        assert_eq!(unrecorded(None, &[(100, 200), (400, 500)], 0, 300), vec![(200, 300)]);
        // Runs that overlap (a second process on the same state) leave no span.
        assert_eq!(unrecorded(None, &[(100, 200), (150, 180), (190, 250)], 0, 1000), vec![]);
    }

    #[tokio::test]
    async fn a_restart_is_an_unrecorded_span_until_the_new_run_started() {
        let f = fixture("+00:00", utc(10, 0), RETENTION_BATCH).await;
        f.metrics.add_mapping(crate::core::protocol::MappingKey::tcp(7000), ["127.0.0.1:9", "direct", "", ""]).sent.inc_by(5);
        f.now.store(utc(10, 0) + 20, Ordering::SeqCst);
        f.recorder.flush().await.unwrap();
        // Killed after that write; a new process 40 s later has not written yet.
        let restarted_at = utc(10, 1);
        let restarted =
            Recorder::new(f.store.clone(), Arc::new(Metrics::new()), f.recorder.settings(), Arc::new(move || restarted_at)).await.unwrap();
        let series = restarted.points(Step::Minute, None, utc(9, 0), utc(11, 0)).await.unwrap();
        assert_eq!(series.unrecorded, vec![(utc(10, 0) + 20, restarted_at)]);
        assert_eq!(series.as_of, restarted_at);
        // The old run, seen from itself, is unbroken.
        assert_eq!(f.recorder.points(Step::Minute, None, utc(9, 0), utc(11, 0)).await.unwrap().unrecorded, vec![]);
    }

    #[tokio::test]
    async fn a_restarted_process_continues_the_totals_without_recounting() {
        let f = fixture("+00:00", utc(10, 0), RETENTION_BATCH).await;
        let m = f.metrics.add_mapping(crate::core::protocol::MappingKey::tcp(5000), ["127.0.0.1:9", "direct", "", ""]);
        m.sent.inc_by(300);
        // Tunnel wire bytes go to the `default` client's buckets.
        f.metrics.add_client("default");
        let (wire_out, wire_in) = f.metrics.tunnel_meters("default");
        wire_out.record(900);
        wire_in.record(80);
        f.recorder.flush().await.unwrap();
        f.recorder.flush().await.unwrap();
        let tunnel = f.store.tunnel_history(Step::Day, utc(0, 0), utc(24, 0)).await.unwrap();
        assert_eq!(tunnel, vec![(utc(0, 0), "default".to_string(), bytes(900, 80))]);
        // A new process: fresh counters from 0, same database.
        let metrics = Arc::new(Metrics::new());
        let settings = HistoryConfig::default().settings().unwrap();
        let restarted = Recorder::new(f.store.clone(), metrics.clone(), settings, Arc::new(|| utc(10, 5))).await.unwrap();
        assert_eq!(restarted.lifetime().get(&crate::core::protocol::MappingKey::tcp(5000)), Some(&bytes(300, 0)));
        let m2 = metrics.add_mapping(crate::core::protocol::MappingKey::tcp(5000), ["127.0.0.1:9", "direct", "", ""]);
        m2.sent.inc_by(20);
        restarted.flush().await.unwrap();
        assert_eq!(restarted.lifetime().get(&crate::core::protocol::MappingKey::tcp(5000)), Some(&bytes(320, 0)));
        let day =
            f.store.history_points(Step::Day, Some(crate::core::protocol::MappingKey::tcp(5000)), utc(0, 0), utc(24, 0), 0).await.unwrap();
        assert_eq!(day[0].bytes_sent, 320);
        // A mapping removed and created again starts its counters at 0: counted from there.
        metrics.remove_mapping(crate::core::protocol::MappingKey::tcp(5000));
        let m3 = metrics.add_mapping(crate::core::protocol::MappingKey::tcp(5000), ["127.0.0.1:9", "direct", "", ""]);
        m3.sent.inc_by(4);
        restarted.flush().await.unwrap();
        assert_eq!(restarted.lifetime().get(&crate::core::protocol::MappingKey::tcp(5000)), Some(&bytes(324, 0)));
    }

    #[tokio::test]
    async fn retention_expires_each_resolution_in_bounded_steps() {
        let start = utc(0, 0);
        let f = fixture("+00:00", start, 7).await;
        let m = f.metrics.add_mapping(crate::core::protocol::MappingKey::tcp(6000), ["127.0.0.1:9", "direct", "", ""]);
        // 30 minutes of traffic, one flush a minute.
        for minute in 0..30 {
            f.now.store(start + minute * 60, Ordering::SeqCst);
            m.sent.inc_by(1);
            f.recorder.flush().await.unwrap();
        }
        let count = |step| {
            let store = f.store.clone();
            async move {
                store
                    .history_points(step, Some(crate::core::protocol::MappingKey::tcp(6000)), start - 86_400, start + 86_400, 0)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(count(Step::Minute).await.len(), 30);
        // Three days later: minutes (kept 2 days) expire, 7 rows per table per flush
        // (30 minute rows + 30 coverage rows = 60 rows: 5 flushes of 14).
        f.now.store(start + 3 * 86_400, Ordering::SeqCst);
        let mut steps = Vec::new();
        loop {
            let pruned = f.recorder.flush().await.unwrap();
            steps.push(pruned.minute);
            if pruned.minute == 0 {
                break;
            }
        }
        assert_eq!(steps, vec![14, 14, 14, 14, 4, 0]);
        let minutes = f
            .store
            .history_points(Step::Minute, Some(crate::core::protocol::MappingKey::tcp(6000)), start - 86_400, start + 86_400, 0)
            .await
            .unwrap();
        assert!(minutes.is_empty(), "{minutes:?}");
        // Hours (90 days) and days (5 years) still hold every byte.
        assert_eq!(count(Step::Hour).await.iter().map(|p| p.bytes_sent).sum::<u64>(), 30);
        // 100 days later the hour is gone, the day remains.
        f.now.store(start + 100 * 86_400, Ordering::SeqCst);
        f.recorder.flush().await.unwrap();
        assert_eq!(count(Step::Hour).await.iter().map(|p| p.bytes_sent).sum::<u64>(), 0);
        assert_eq!(count(Step::Day).await.iter().map(|p| p.bytes_sent).sum::<u64>(), 30);
        // Six years later the day is gone too; the lifetime total is not history and stays.
        f.now.store(start + 6 * 365 * 86_400, Ordering::SeqCst);
        f.recorder.flush().await.unwrap();
        assert_eq!(count(Step::Day).await.iter().map(|p| p.bytes_sent).sum::<u64>(), 0);
        assert_eq!(f.store.lifetime_totals().await.unwrap().get(&crate::core::protocol::MappingKey::tcp(6000)), Some(&bytes(30, 0)));
    }
}
