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

use prometheus::{Gauge, IntGauge};
use tracing::warn;

use crate::core::calendar::Step;
use crate::history::Recorder;
use crate::policy::{LivePolicy, Quota, QuotaAction, QuotaPeriod};
use crate::store::events::EventKind;

/// Share of the allowance at which the early warning goes out.
pub(crate) const WARNING_RATIO: f64 = 0.8;

/// One mapping as the quota check sees it.
pub struct MappingPolicy {
    pub port: u16,
    pub policy: Arc<LivePolicy>,
    /// `tunneld_mapping_quota_used_ratio{port}`.
    pub quota_used: Gauge,
    /// `tunneld_mapping_quota_bytes{port}`.
    pub quota_bytes: IntGauge,
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
    tracked: HashMap<u16, Tracked>,
}

struct Tracked {
    quota: Quota,
    period_start: i64,
    /// Lifetime bytes (both directions) when the period began.
    base: u64,
    warned: bool,
    exhausted: bool,
}

impl QuotaTracker {
    /// Updates every mapping's ratio and block flag; returns the notices due.
    pub(crate) async fn check(&mut self, recorder: &Recorder, mappings: &[MappingPolicy]) -> Vec<Notice> {
        let now = recorder.now();
        let offset = recorder.settings().utc_offset_secs;
        let lifetime = recorder.lifetime();
        let mut notices = Vec::new();
        let quotas: HashMap<u16, Quota> = mappings.iter().filter_map(|m| Some((m.port, m.policy.get().quota?))).collect();
        self.tracked.retain(|port, _| quotas.contains_key(port));
        for m in mappings {
            let port = m.port;
            let Some(&quota) = quotas.get(&port) else {
                m.quota_used.set(0.0);
                m.quota_bytes.set(0);
                m.policy.set_quota_used(0);
                m.policy.set_quota_blocked(false);
                continue;
            };
            let step = match quota.period {
                QuotaPeriod::Day => Step::Day,
                QuotaPeriod::Month => Step::Month,
            };
            let start = step.bucket_start(now, offset);
            let total = lifetime.get(&port).map_or(0, |t| t.total());
            let previous = self.tracked.remove(&port);
            let tracked = match previous {
                Some(t) if t.period_start == start && t.quota == quota => t,
                // Same period, new quota: same usage, thresholds judged afresh.
                Some(t) if t.period_start == start => Tracked { quota, warned: false, exhausted: false, ..t },
                previous => {
                    if previous.as_ref().is_some_and(|t| t.exhausted) {
                        notices.push(Notice {
                            kind: EventKind::QuotaReset,
                            port,
                            message: format!("mapping on port {port}: a new quota period began; visitors are admitted again"),
                        });
                    }
                    let base = match stored_before_period(recorder, step, port, start, now, offset).await {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            warn!(port, error = %e, "cannot read this period's history for the quota; counting from now");
                            total
                        }
                    };
                    // A restarted process must not repeat what it already said this period.
                    let (warned, exhausted) = match previous {
                        Some(_) => (false, false),
                        None => announced(recorder, port, start).await,
                    };
                    Tracked { quota, period_start: start, base, warned, exhausted }
                }
            };
            let mut tracked = tracked;
            let used = total.saturating_sub(tracked.base);
            let ratio = used as f64 / quota.bytes as f64;
            m.quota_used.set(ratio);
            m.quota_bytes.set(i64::try_from(quota.bytes).unwrap_or(i64::MAX));
            m.policy.set_quota_used(used);
            let period = match quota.period {
                QuotaPeriod::Day => "today",
                QuotaPeriod::Month => "this month",
            };
            if ratio >= WARNING_RATIO && !tracked.warned {
                tracked.warned = true;
                notices.push(Notice {
                    kind: EventKind::QuotaWarning,
                    port,
                    message: format!(
                        "mapping on port {port} has used {:.0} % of its quota {period} ({used} of {} bytes)",
                        ratio * 100.0,
                        quota.bytes
                    ),
                });
            }
            if ratio >= 1.0 && !tracked.exhausted {
                tracked.exhausted = true;
                let then = match quota.action {
                    QuotaAction::Block => "new visitors are refused until the period ends",
                    QuotaAction::Alert => "traffic continues (action: alert)",
                };
                notices.push(Notice {
                    kind: EventKind::QuotaExhausted,
                    port,
                    message: format!("mapping on port {port} has used its whole quota {period} ({used} of {} bytes); {then}", quota.bytes),
                });
            }
            m.policy.set_quota_blocked(quota.action == QuotaAction::Block && used >= quota.bytes);
            self.tracked.insert(port, tracked);
        }
        notices
    }
}

/// Whether the warning and the exhaustion notice for `port` were already
/// recorded since `period_start` (by an earlier process).
async fn announced(recorder: &Recorder, port: u16, period_start: i64) -> (bool, bool) {
    const NOTICES: &[EventKind] = &[EventKind::QuotaWarning, EventKind::QuotaExhausted];
    match recorder.store().announced_since(port, period_start as f64, NOTICES).await {
        Ok(kinds) => (kinds.contains(&EventKind::QuotaWarning), kinds.contains(&EventKind::QuotaExhausted)),
        Err(e) => {
            warn!(port, error = %e, "cannot read the recorded quota events; thresholds may be announced again");
            (false, false)
        }
    }
}

/// The stored lifetime of `port` as it stood when the period starting at `start`
/// began: the stored lifetime minus what the stored history holds for the
/// period. Bytes not flushed yet are in neither, so they count in this period.
async fn stored_before_period(
    recorder: &Recorder,
    step: Step,
    port: u16,
    start: i64,
    now: i64,
    offset: i64,
) -> Result<u64, crate::store::StoreError> {
    let store = recorder.store();
    let stored = store.lifetime_totals().await?.get(&port).map_or(0, |t| t.total());
    let rows = store.history_report(step, start, now.max(start) + 1, offset).await?;
    let in_period: u64 = rows.iter().filter(|r| r.port == port && r.period_start == start).map(|r| r.bytes_sent + r.bytes_received).sum();
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
        let counters = metrics.add_mapping(port, ["127.0.0.1:22", "direct", "", ""]);
        let quota = Quota { bytes: 1_000, period: QuotaPeriod::Day, action: QuotaAction::Block };
        let policy = LivePolicy::new(Policy { quota: Some(quota), ..Policy::default() });
        let mappings = [MappingPolicy {
            port,
            policy: policy.clone(),
            quota_used: counters.quota_used.clone(),
            quota_bytes: counters.quota_bytes.clone(),
        }];
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

        // A restart in the same local day continues from the stored history. What
        // was not recorded as announced is announced (once); what was, is not.
        let mut restarted = QuotaTracker::default();
        let notices = kinds(restarted.check(&recorder, &mappings).await);
        assert_eq!(notices, [EventKind::QuotaWarning, EventKind::QuotaExhausted]);
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
        counters.sent.inc_by(2_000);
        assert_eq!(kinds(tracker.check(&recorder, &mappings).await), [EventKind::QuotaWarning, EventKind::QuotaExhausted]);
        assert!(policy.quota_blocked());
        policy.set(Policy::default());
        assert!(tracker.check(&recorder, &mappings).await.is_empty());
        assert!(!policy.quota_blocked());
        assert_eq!(counters.quota_used.get(), 0.0);
    }
}
