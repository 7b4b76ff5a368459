//! Defences of the tunnel port, kept apart from the protocol that uses them so any
//! handshake (today's, or a TLS one) calls the same few methods:
//!
//! - [`AuthThrottle`]: failed handshakes per source address, a token bucket — a
//!   few mistakes are free, guessing is slowed to a crawl;
//! - [`FailureLog`]: one log line per source per interval, with a count, instead of
//!   one per attempt (2,000 attempts must not mean 2,000 WARN lines);
//! - [`Unauthenticated`]: a bound on connections that have not authenticated yet,
//!   in total and per source, so idle connections cannot eat every descriptor;
//! - [`FlapDetector`]: two clients with one identity replacing each other.
//!
//! All of them take the time as an argument, so tests drive the clock.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::sync::lock;

/// Failed handshakes a source may make in a burst before it is throttled.
pub(crate) const FAILURE_BURST: f64 = 5.0;
/// After the burst, one more attempt per this interval (five a minute).
pub(crate) const FAILURE_REFILL: Duration = Duration::from_secs(12);
/// Sources remembered at most; beyond it the fullest buckets are forgotten first
/// (a spoofing flood must not grow the map without bound).
const MAX_TRACKED_SOURCES: usize = 10_000;

/// Failed handshakes per source, as a token bucket.
#[derive(Default)]
pub(crate) struct AuthThrottle {
    sources: HashMap<IpAddr, Bucket>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.updated).as_secs_f64() / FAILURE_REFILL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(FAILURE_BURST);
        self.updated = now;
    }
}

impl AuthThrottle {
    /// Whether `source` may try a handshake now.
    pub(crate) fn allows(&mut self, source: IpAddr, now: Instant) -> bool {
        match self.sources.get_mut(&source.to_canonical()) {
            Some(bucket) => {
                bucket.refill(now);
                bucket.tokens >= 1.0
            }
            None => true,
        }
    }

    /// Records a failed handshake (wrong secret, garbage, silence, unknown session).
    pub(crate) fn failed(&mut self, source: IpAddr, now: Instant) {
        if self.sources.len() >= MAX_TRACKED_SOURCES {
            self.sources.retain(|_, b| {
                b.refill(now);
                b.tokens < FAILURE_BURST
            });
        }
        let bucket = self.sources.entry(source.to_canonical()).or_insert(Bucket { tokens: FAILURE_BURST, updated: now });
        bucket.refill(now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    /// A source that authenticated is forgiven its earlier mistakes.
    pub(crate) fn succeeded(&mut self, source: IpAddr) {
        self.sources.remove(&source.to_canonical());
    }
}

/// Aggregates failure log lines: the first failure from a source is logged at
/// once; later ones within the interval are counted and reported by [`drain`].
///
/// [`drain`]: FailureLog::drain
pub(crate) struct FailureLog {
    interval: Duration,
    sources: HashMap<IpAddr, Tally>,
}

struct Tally {
    since: Instant,
    suppressed: u64,
    last_reason: &'static str,
}

/// A source's failures not logged one by one during the last interval.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    pub source: IpAddr,
    pub count: u64,
    pub last_reason: &'static str,
}

impl FailureLog {
    pub(crate) fn new(interval: Duration) -> FailureLog {
        FailureLog { interval, sources: HashMap::new() }
    }

    /// Counts a failure; `true` when the caller should log this one itself.
    pub(crate) fn record(&mut self, source: IpAddr, reason: &'static str, now: Instant) -> bool {
        let source = source.to_canonical();
        match self.sources.get_mut(&source) {
            Some(tally) => {
                tally.suppressed += 1;
                tally.last_reason = reason;
                false
            }
            None => {
                if self.sources.len() < MAX_TRACKED_SOURCES {
                    self.sources.insert(source, Tally { since: now, suppressed: 0, last_reason: reason });
                }
                true
            }
        }
    }

    /// Summaries of sources whose interval is over and that failed again after
    /// their first logged failure. A source quiet for a whole interval is
    /// forgotten, so its next failure is logged at once again.
    pub(crate) fn drain(&mut self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        let interval = self.interval;
        self.sources.retain(|source, tally| {
            if now.saturating_duration_since(tally.since) < interval {
                return true;
            }
            if tally.suppressed == 0 {
                return false;
            }
            out.push(Summary { source: *source, count: tally.suppressed, last_reason: tally.last_reason });
            tally.suppressed = 0;
            tally.since = now;
            true
        });
        out.sort_by_key(|s| s.source);
        out
    }
}

/// Connections not yet authenticated, bounded in total and per source.
pub(crate) struct Unauthenticated {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One unauthenticated connection's slot; freed on drop (authenticated, or gone).
pub(crate) struct Pending {
    owner: Arc<Unauthenticated>,
    source: IpAddr,
}

impl Unauthenticated {
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Arc<Unauthenticated> {
        Arc::new(Unauthenticated { max_total, max_per_source, open: Mutex::new((0, HashMap::new())) })
    }

    /// A slot for a new connection from `source`, or `None` when either bound is
    /// reached.
    pub(crate) fn enter(self: &Arc<Self>, source: IpAddr) -> Option<Pending> {
        let source = source.to_canonical();
        let mut open = lock(&self.open);
        let (total, per_source) = &mut *open;
        let mine = per_source.entry(source).or_insert(0);
        if *total >= self.max_total || *mine >= self.max_per_source {
            if *mine == 0 {
                per_source.remove(&source);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Pending { owner: self.clone(), source })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut open = lock(&self.owner.open);
        let (total, per_source) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = per_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// Replacements within this window count towards flapping.
pub(crate) const FLAP_WINDOW: Duration = Duration::from_secs(60);
/// This many replacements within [`FLAP_WINDOW`] is flapping, not a restart.
pub(crate) const FLAP_THRESHOLD: usize = 4;

/// Notices a client identity that keeps changing hands: two clients running
/// with the same secret replace each other forever, and visitors land on
/// whichever won last.
#[derive(Default)]
pub(crate) struct FlapDetector {
    replacements: VecDeque<(Instant, SocketAddr, SocketAddr)>,
    reported: Option<Instant>,
}

/// Two peers fighting over one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flapping {
    pub previous: SocketAddr,
    pub latest: SocketAddr,
    pub replacements: usize,
}

impl FlapDetector {
    /// Records that `latest` replaced `previous`. Returns the flapping to report
    /// when this replacement crosses the threshold and none was reported within
    /// the window (so an ongoing fight logs once a minute, not on every swap).
    pub(crate) fn replaced(&mut self, previous: SocketAddr, latest: SocketAddr, now: Instant) -> Option<Flapping> {
        self.replacements.push_back((now, previous, latest));
        self.prune(now);
        let flapping = self.flapping(now)?;
        if self.reported.is_some_and(|at| now.saturating_duration_since(at) < FLAP_WINDOW) {
            return None;
        }
        self.reported = Some(now);
        Some(flapping)
    }

    /// The current fight, if replacements within the window reach the threshold.
    pub(crate) fn flapping(&self, now: Instant) -> Option<Flapping> {
        let recent: Vec<_> = self.replacements.iter().filter(|(at, _, _)| now.saturating_duration_since(*at) < FLAP_WINDOW).collect();
        if recent.len() < FLAP_THRESHOLD {
            return None;
        }
        let (_, previous, latest) = recent.last()?;
        Some(Flapping { previous: *previous, latest: *latest, replacements: recent.len() })
    }

    fn prune(&mut self, now: Instant) {
        while self.replacements.front().is_some_and(|(at, _, _)| now.saturating_duration_since(*at) >= FLAP_WINDOW) {
            self.replacements.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_few_failures_are_free_then_the_source_is_slowed_to_the_refill_rate() {
        let mut t = AuthThrottle::default();
        let start = Instant::now();
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        for _ in 0..FAILURE_BURST as usize {
            assert!(t.allows(a, start));
            t.failed(a, start);
        }
        assert!(!t.allows(a, start), "burst used up");
        assert!(t.allows(b, start), "other sources are not affected");
        assert!(!t.allows(a, start + FAILURE_REFILL / 2));
        assert!(t.allows(a, start + FAILURE_REFILL), "one attempt per refill interval");
        t.failed(a, start + FAILURE_REFILL);
        assert!(!t.allows(a, start + FAILURE_REFILL));
        // IPv4-mapped IPv6 is the same source.
        assert!(!t.allows(ip("::ffff:192.0.2.1"), start + FAILURE_REFILL));
        t.succeeded(a);
        assert!(t.allows(a, start + FAILURE_REFILL));
    }

    #[test]
    fn failures_are_logged_once_per_source_per_interval_with_a_count() {
        let mut log = FailureLog::new(Duration::from_secs(60));
        let start = Instant::now();
        let a = ip("192.0.2.1");
        assert!(log.record(a, "auth_failed", start));
        for _ in 0..1999 {
            assert!(!log.record(a, "auth_failed", start + Duration::from_secs(1)));
        }
        assert!(log.drain(start + Duration::from_secs(30)).is_empty(), "interval not over");
        assert_eq!(log.drain(start + Duration::from_secs(60)), vec![Summary { source: a, count: 1999, last_reason: "auth_failed" }]);
        // Quiet for a whole interval: forgotten, the next failure is logged again.
        assert!(log.drain(start + Duration::from_secs(120)).is_empty());
        assert!(log.record(a, "no_hello", start + Duration::from_secs(121)));
    }

    #[test]
    fn unauthenticated_connections_are_bounded_in_total_and_per_source() {
        let gate = Unauthenticated::new(3, 2);
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        let a1 = gate.enter(a).expect("first");
        let _a2 = gate.enter(a).expect("second");
        assert!(gate.enter(a).is_none(), "per-source bound");
        let _b1 = gate.enter(b).expect("other source");
        assert!(gate.enter(c).is_none(), "total bound");
        drop(a1);
        assert!(gate.enter(c).is_some(), "a freed slot is reusable");
    }

    #[test]
    fn flapping_is_several_replacements_a_minute_and_reported_once_a_minute() {
        let mut d = FlapDetector::default();
        let start = Instant::now();
        let p: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let q: SocketAddr = "192.0.2.2:2000".parse().unwrap();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(d.replaced(p, q, at(0)), None, "one restart is not flapping");
        assert_eq!(d.replaced(q, p, at(5)), None);
        assert_eq!(d.replaced(p, q, at(10)), None);
        let report = d.replaced(q, p, at(15)).expect("fourth replacement within a minute");
        assert_eq!((report.previous, report.latest, report.replacements), (q, p, 4));
        assert_eq!(d.replaced(p, q, at(20)), None, "reported already this minute");
        assert!(d.flapping(at(20)).is_some());
        assert!(d.flapping(at(200)).is_none(), "calm again after the window");
        // Replacements spread out over time never flap.
        let mut calm = FlapDetector::default();
        for i in 0..10 {
            assert_eq!(calm.replaced(p, q, at(i * 30)), None);
        }
    }
}
