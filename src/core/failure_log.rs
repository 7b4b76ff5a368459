//! Log lines of a repeated failure, aggregated: the first for a key (a source
//! address, a mapping's port and reason, a target) at once, the rest as one
//! summary per interval with a count. A target that is down refuses every
//! visitor, a guesser fails every handshake: one line each would bury
//! everything else in the journal.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Keys remembered at most; beyond it new keys are logged one by one, unbounded
/// memory being worse than an unaggregated line.
const MAX_KEYS: usize = 10_000;

/// Aggregates log lines of a repeated failure: the first for a key (a source
/// address, a mapping's port and reason) is logged at once; later ones within
/// the interval are counted and reported by [`drain`], with the detail of the
/// last one (`D`: a reason, an error).
///
/// [`drain`]: FailureLog::drain
pub(crate) struct FailureLog<K, D = &'static str> {
    interval: Duration,
    keys: HashMap<K, Tally<D>>,
}

struct Tally<D> {
    since: Instant,
    suppressed: u64,
    last: D,
}

/// A key's failures not logged one by one during the last interval.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Summary<K, D = &'static str> {
    pub key: K,
    pub count: u64,
    /// The detail of the last failure counted.
    pub last: D,
}

impl<K: Hash + Eq + Ord + Clone, D: Clone> FailureLog<K, D> {
    pub(crate) fn new(interval: Duration) -> FailureLog<K, D> {
        FailureLog { interval, keys: HashMap::new() }
    }

    /// Counts a failure; `true` when the caller should log this one itself.
    pub(crate) fn record(&mut self, key: K, detail: D, now: Instant) -> bool {
        match self.keys.get_mut(&key) {
            Some(tally) => {
                tally.suppressed += 1;
                tally.last = detail;
                false
            }
            None => {
                if self.keys.len() < MAX_KEYS {
                    self.keys.insert(key, Tally { since: now, suppressed: 0, last: detail });
                }
                true
            }
        }
    }

    /// Summaries of keys whose interval is over and that failed again after
    /// their first logged failure. A key quiet for a whole interval is
    /// forgotten, so its next failure is logged at once again.
    pub(crate) fn drain(&mut self, now: Instant) -> Vec<Summary<K, D>> {
        let interval = self.interval;
        self.take(|tally| now.saturating_duration_since(tally.since) >= interval, now)
    }

    /// Every failure counted and not yet summarised, interval over or not: at
    /// shutdown, so no count is lost with the process.
    pub(crate) fn flush(&mut self, now: Instant) -> Vec<Summary<K, D>> {
        self.take(|_| true, now)
    }

    fn take(&mut self, due: impl Fn(&Tally<D>) -> bool, now: Instant) -> Vec<Summary<K, D>> {
        let mut out = Vec::new();
        self.keys.retain(|key, tally| {
            if !due(tally) {
                return true;
            }
            if tally.suppressed == 0 {
                return false;
            }
            out.push(Summary { key: key.clone(), count: tally.suppressed, last: tally.last.clone() });
            tally.suppressed = 0;
            tally.since = now;
            true
        });
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failures_are_logged_once_per_source_per_interval_with_a_count() {
        let mut log = FailureLog::<IpAddr>::new(Duration::from_secs(60));
        let start = Instant::now();
        let a = ip("192.0.2.1");
        assert!(log.record(a, "wrong secret", start));
        for _ in 0..1999 {
            assert!(!log.record(a, "wrong secret", start + Duration::from_secs(1)));
        }
        assert!(log.drain(start + Duration::from_secs(30)).is_empty(), "interval not over");
        assert_eq!(log.drain(start + Duration::from_secs(60)), vec![Summary { key: a, count: 1999, last: "wrong secret" }]);
        // Quiet for a whole interval: forgotten, the next failure is logged again.
        assert!(log.drain(start + Duration::from_secs(120)).is_empty());
        assert!(log.record(a, "no_hello", start + Duration::from_secs(121)));
        assert!(!log.record(a, "no_hello", start + Duration::from_secs(122)));
        // At shutdown, what the interval counted so far is summarised at once.
        assert_eq!(log.flush(start + Duration::from_secs(123)), vec![Summary { key: a, count: 1, last: "no_hello" }]);
        assert!(log.flush(start + Duration::from_secs(124)).is_empty());
    }
}
