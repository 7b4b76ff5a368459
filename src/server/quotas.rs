//! Quotas: how much of its allowance each mapping has used in the current day
//! or month (the history's periods, at `history.utc_offset`), the 80 % and 100 %
//! notices, and the block flag the accept loop checks.
//!
//! Usage is the port's exact lifetime total (stored + unflushed, from the
//! recorder) minus a baseline: the lifetime at the start of the period, which is
//! worked out once per period from the stored history of the period so far — so
//! a restart mid-month continues where the month stood.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::warn;

use crate::core::calendar::Step;
use crate::core::protocol::MappingKey;
use crate::history::Recorder;
use crate::policy::{LivePolicy, Quota, QuotaAction, QuotaPeriod};
use crate::store::events::EventKind;
use crate::telemetry::MappingMetrics;

/// Share of the allowance at which the early warning goes out.
pub(crate) const WARNING_RATIO: f64 = 0.8;

/// One mapping as the quota check sees it.
pub struct MappingPolicy {
    /// Its port and protocol.
    pub key: MappingKey,
    pub policy: Arc<LivePolicy>,
    /// Its series: `tunneld_mapping_quota_used_ratio` and
    /// `tunneld_mapping_quota_bytes` are set here.
    pub series: MappingMetrics,
}

/// Something to tell the operator.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Notice {
    pub kind: EventKind,
    pub port: u16,
    pub message: String,
}

#[derive(Default)]
pub(crate) struct QuotaTracker {
    tracked: HashMap<MappingKey, Tracked>,
}

struct Tracked {
    period_start: i64,
    /// Lifetime bytes (both directions) when the period began.
    base: u64,
    /// The highest threshold announced this period.
    announced: Threshold,
}

/// How far into its quota a mapping is. One crossing is one event: a jump from
/// below 80 % to past 100 % announces only that the quota is used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Threshold {
    Below,
    Warning,
    Exhausted,
}

impl Threshold {
    fn of(ratio: f64) -> Threshold {
        match ratio {
            r if r >= 1.0 => Threshold::Exhausted,
            r if r >= WARNING_RATIO => Threshold::Warning,
            _ => Threshold::Below,
        }
    }
}

impl QuotaTracker {
    /// Updates every mapping's ratio and block flag; returns the notices due.
    pub(crate) async fn check(&mut self, recorder: &Recorder, mappings: &[MappingPolicy]) -> Vec<Notice> {
        let now = recorder.now();
        let offset = recorder.settings().utc_offset_secs;
        let lifetime = recorder.lifetime();
        let mut notices = Vec::new();
        let quotas: HashMap<MappingKey, Quota> = mappings.iter().filter_map(|m| Some((m.key, m.policy.get().quota?))).collect();
        self.tracked.retain(|key, _| quotas.contains_key(key));
        for m in mappings {
            let key = m.key;
            let port = key.port;
            let Some(&quota) = quotas.get(&key) else {
                m.series.quota_used.set(0.0);
                m.series.quota_bytes.set(0);
                m.policy.set_quota_used(0);
                m.policy.set_quota_blocked(false);
                continue;
            };
            let step = match quota.period {
                QuotaPeriod::Day => Step::Day,
                QuotaPeriod::Month => Step::Month,
            };
            let start = step.bucket_start(now, offset);
            let total = lifetime.get(&key).map_or(0, |t| t.total());
            let previous = self.tracked.remove(&key);
            let mut tracked = match previous {
                Some(t) if t.period_start == start => t,
                previous => {
                    if previous.as_ref().is_some_and(|t| t.announced == Threshold::Exhausted) {
                        notices.push(Notice {
                            kind: EventKind::QuotaReset,
                            port,
                            message: format!("mapping on port {key}: a new quota period began; visitors are admitted again"),
                        });
                    }
                    let base = match stored_before_period(recorder, step, key, start, now, offset).await {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            warn!(port, error = %e, "cannot read this period's history for the quota; counting from now");
                            total
                        }
                    };
                    // A restarted process must not repeat what it already said this period.
                    let announced = match previous {
                        Some(_) => Threshold::Below,
                        None => announced(recorder, port, start).await,
                    };
                    Tracked { period_start: start, base, announced }
                }
            };
            let used = total.saturating_sub(tracked.base);
            let ratio = used as f64 / quota.bytes as f64;
            m.series.quota_used.set(ratio);
            m.series.quota_bytes.set(i64::try_from(quota.bytes).unwrap_or(i64::MAX));
            m.policy.set_quota_used(used);
            // Within a period usage only grows, but a changed quota can put the
            // mapping back below a threshold it had crossed: crossing it again is
            // news. A quota changed to one that leaves the mapping past the same
            // threshold crosses nothing and says nothing.
            let reached = Threshold::of(ratio);
            tracked.announced = tracked.announced.min(reached);
            if reached > tracked.announced {
                tracked.announced = reached;
                notices.push(crossing(key, quota, used, ratio, reached));
            }
            m.policy.set_quota_blocked(quota.action == QuotaAction::Block && used >= quota.bytes);
            self.tracked.insert(key, tracked);
        }
        notices
    }
}

/// The notice for `port` reaching `threshold` (one above [`Threshold::Below`]).
fn crossing(key: MappingKey, quota: Quota, used: u64, ratio: f64, threshold: Threshold) -> Notice {
    let period = match quota.period {
        QuotaPeriod::Day => "today",
        QuotaPeriod::Month => "this month",
    };
    let bytes = quota.bytes;
    let port = key.port;
    if threshold == Threshold::Warning {
        let percent = ratio * 100.0;
        let message = format!("mapping on port {key} has used {percent:.0} % of its quota {period} ({used} of {bytes} bytes)");
        return Notice { kind: EventKind::QuotaWarning, port, message };
    }
    let then = match quota.action {
        QuotaAction::Block => "new visitors are refused until the period ends",
        QuotaAction::Alert => "traffic continues (action: alert)",
    };
    let message = format!("mapping on port {key} has used its whole quota {period} ({used} of {bytes} bytes); {then}");
    Notice { kind: EventKind::QuotaExhausted, port, message }
}

/// The highest threshold already recorded for `port` since `period_start` (by
/// an earlier process).
async fn announced(recorder: &Recorder, port: u16, period_start: i64) -> Threshold {
    const NOTICES: &[EventKind] = &[EventKind::QuotaWarning, EventKind::QuotaExhausted];
    match recorder.store().announced_since(port, period_start as f64, NOTICES).await {
        Ok(kinds) if kinds.contains(&EventKind::QuotaExhausted) => Threshold::Exhausted,
        Ok(kinds) if kinds.contains(&EventKind::QuotaWarning) => Threshold::Warning,
        Ok(_) => Threshold::Below,
        Err(e) => {
            warn!(port, error = %e, "cannot read the recorded quota events; thresholds may be announced again");
            Threshold::Below
        }
    }
}

/// The stored lifetime of `port` as it stood when the period starting at `start`
/// began: the stored lifetime minus what the stored history holds for the
/// period. Bytes not flushed yet are in neither, so they count in this period.
async fn stored_before_period(
    recorder: &Recorder,
    step: Step,
    key: MappingKey,
    start: i64,
    now: i64,
    offset: i64,
) -> Result<u64, crate::store::StoreError> {
    let store = recorder.store();
    let stored = store.lifetime_totals().await?.get(&key).map_or(0, |t| t.total());
    let rows = store.history_report(step, start, now.max(start) + 1, offset).await?;
    let in_period: u64 = rows
        .iter()
        .filter(|r| r.port == key.port && r.protocol == key.protocol && r.period_start == start)
        .map(|r| r.bytes_sent + r.bytes_received)
        .sum();
    Ok(stored.saturating_sub(in_period))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HistoryConfig;
    use crate::policy::Policy;
    use crate::store::Store;
    use crate::telemetry::Metrics;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// 2026-11-29 23:00 at +08:00 (15:00 UTC).
    const LATE_EVENING: i64 = 1_795_964_400;

    #[tokio::test]
    async fn a_blocking_quota_warns_blocks_and_rolls_over_at_local_midnight() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let clock = Arc::new(AtomicI64::new(LATE_EVENING));
        let settings = HistoryConfig { utc_offset: "+08:00".into(), ..HistoryConfig::default() }.settings().unwrap();
        let c = clock.clone();
        let recorder = Recorder::new(store.clone(), metrics.clone(), settings, Arc::new(move || c.load(Ordering::SeqCst))).await.unwrap();
        let port = 4000;
        let counters = metrics.add_mapping(crate::core::protocol::MappingKey::tcp(port), ["127.0.0.1:22", "direct", "", ""]);
        let quota = Quota { bytes: 1_000, period: QuotaPeriod::Day, action: QuotaAction::Block };
        let policy = LivePolicy::new(Policy { quota: Some(quota), ..Policy::default() });
        let mappings =
            [MappingPolicy { key: crate::core::protocol::MappingKey::tcp(port), policy: policy.clone(), series: counters.clone() }];
        let mut tracker = QuotaTracker::default();
        let kinds = |notices: Vec<Notice>| notices.into_iter().map(|n| n.kind).collect::<Vec<_>>();

        // Bytes that moved before the first check (not flushed yet) count too.
        counters.sent.inc_by(500);
        counters.received.inc_by(350);
        assert_eq!(kinds(tracker.check(&recorder, &mappings).await), [EventKind::QuotaWarning]);
        assert!((counters.quota_used.get() - 0.85).abs() < 1e-9);
        assert!(!policy.quota_blocked());
        assert!(tracker.check(&recorder, &mappings).await.is_empty(), "each threshold is announced once");

        counters.sent.inc_by(150);
        recorder.flush().await.unwrap();
        assert_eq!(kinds(tracker.check(&recorder, &mappings).await), [EventKind::QuotaExhausted]);
        assert!(policy.quota_blocked());

        // A changed quota that leaves the mapping past the same threshold
        // crosses nothing; one that puts it back below does, once, when crossed
        // again; the same quota set again changes nothing.
        for bytes in [999, 1_000, 2_000] {
            policy.set(Policy { quota: Some(Quota { bytes, ..quota }), ..Policy::default() });
            assert!(tracker.check(&recorder, &mappings).await.is_empty(), "quota of {bytes} bytes");
        }
        counters.sent.inc_by(700);
        assert_eq!(kinds(tracker.check(&recorder, &mappings).await), [EventKind::QuotaWarning], "1,700 of 2,000");
        policy.set(Policy { quota: Some(quota), ..Policy::default() });
        assert_eq!(
            kinds(tracker.check(&recorder, &mappings).await),
            [EventKind::QuotaExhausted],
            "1,700 of 1,000: one crossing, one event"
        );
        assert!(tracker.check(&recorder, &mappings).await.is_empty());
        assert!((counters.quota_used.get() - 1.7).abs() < 1e-9);
        recorder.flush().await.unwrap();

        // A restart in the same local day continues from the stored history. What
        // was not recorded as announced is announced (once, the highest
        // threshold crossed); what was, is not.
        let mut restarted = QuotaTracker::default();
        let notices = kinds(restarted.check(&recorder, &mappings).await);
        assert_eq!(notices, [EventKind::QuotaExhausted]);
        assert!(policy.quota_blocked());
        for kind in [EventKind::QuotaWarning, EventKind::QuotaExhausted] {
            let event =
                crate::store::events::Event { time: LATE_EVENING as f64, kind, port: Some(port), client: None, message: String::new() };
            store.add_event(event).await.unwrap();
        }
        let mut restarted_again = QuotaTracker::default();
        assert!(restarted_again.check(&recorder, &mappings).await.is_empty(), "already announced this period");
        assert!(policy.quota_blocked());

        // 59 minutes later it is still the same local day; one more minute and
        // it is 00:00 at +08:00: a new period.
        clock.store(LATE_EVENING + 59 * 60, Ordering::SeqCst);
        assert!(tracker.check(&recorder, &mappings).await.is_empty());
        assert!(policy.quota_blocked());
        clock.store(LATE_EVENING + 3600, Ordering::SeqCst);
        assert_eq!(kinds(tracker.check(&recorder, &mappings).await), [EventKind::QuotaReset]);
        assert_eq!(counters.quota_used.get(), 0.0);
        assert!(!policy.quota_blocked());

        // Lifting the quota clears the gauge and the block.
        // A jump from 0 to 200 % is one crossing: one event.
        counters.sent.inc_by(2_000);
        assert_eq!(kinds(tracker.check(&recorder, &mappings).await), [EventKind::QuotaExhausted]);
        assert!(policy.quota_blocked());
        policy.set(Policy::default());
        assert!(tracker.check(&recorder, &mappings).await.is_empty());
        assert!(!policy.quota_blocked());
        assert_eq!(counters.quota_used.get(), 0.0);
    }
}
