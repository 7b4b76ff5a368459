//! Defences of the tunnel port, kept apart from the protocol that uses them so any
//! handshake (today's, or a TLS one) calls the same few methods:
//!
//! - [`AuthThrottle`]: failed handshakes per source address, a token bucket — a
//!   few mistakes are free, guessing is slowed to a crawl. A token is reserved
//!   when a connection is admitted, not taken when it fails, so a source cannot
//!   start many handshakes on one token;
//! - [`KnownSources`]: addresses clients authenticated from recently, whose
//!   connections get slots kept for them and are not held to the burst while
//!   they have not failed (a busy client opens data channels by the hundred);
//! - [`EndedSessions`]: tokens of sessions that just ended, so a replaced
//!   client's late data channels are told apart from forged ones;
//! - [`FailureLog`] (from `core`): one log line per source per interval, with a
//!   count, instead of one per attempt (2,000 attempts must not mean 2,000 WARN
//!   lines);
//! - [`Unauthenticated`]: a bound on connections that have not authenticated yet,
//!   in total and per source, so idle connections cannot eat every descriptor,
//!   with slots beyond it kept for known clients;
//! - [`FlapDetector`]: two clients with one identity replacing each other.
//!
//! All of them take the time as an argument, so tests drive the clock.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::MAX_POOL_SIZE;
#[cfg(doc)]
use crate::core::failure_log::FailureLog;
use crate::core::secret::tokens_equal;
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
    fn full(now: Instant) -> Bucket {
        Bucket { tokens: FAILURE_BURST, updated: now }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.updated).as_secs_f64() / FAILURE_REFILL.as_secs_f64();
        self.tokens = (self.tokens + earned).min(FAILURE_BURST);
        self.updated = now;
    }
}

/// What admitting a connection took from its source's bucket; the handshake's
/// outcome settles it ([`AuthThrottle::failed`], [`AuthThrottle::refund`],
/// [`AuthThrottle::succeeded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Charge {
    /// A token was taken on admission: a failure keeps it, a proven connection
    /// gets it back.
    Reserved,
    /// Nothing was taken (a known client's address with a clean record): a
    /// failure takes a token then.
    Free,
}

impl AuthThrottle {
    /// Admits a handshake from `source`, or refuses it (`None`) while the source
    /// has no token left. The token is reserved now, so sixteen handshakes
    /// started at once from a source with one token left get one admission, not
    /// sixteen. A `known` source that is not blocked is admitted without a
    /// reservation (its failures are charged when they happen): its client's
    /// data channels come in bursts of hundreds, and one stray failure on
    /// record — a channel of a session that was just replaced, a neighbour
    /// behind the same NAT — must not cut them to the failure burst.
    pub(crate) fn admit(&mut self, source: IpAddr, known: bool, now: Instant) -> Option<Charge> {
        let source = source.to_canonical();
        if known && !self.sources.contains_key(&source) {
            return Some(Charge::Free);
        }
        self.make_room(now);
        let bucket = self.sources.entry(source).or_insert_with(|| Bucket::full(now));
        bucket.refill(now);
        if bucket.tokens < 1.0 {
            return None;
        }
        if known {
            return Some(Charge::Free);
        }
        bucket.tokens -= 1.0;
        Some(Charge::Reserved)
    }

    /// How long until `source` may start a handshake again: zero unless
    /// [`AuthThrottle::admit`] refuses it now. Anyone can measure this by
    /// retrying; a refused client is told it so it need not.
    pub(crate) fn retry_after(&self, source: IpAddr, now: Instant) -> Duration {
        let Some(bucket) = self.sources.get(&source.to_canonical()) else { return Duration::ZERO };
        let earned = now.saturating_duration_since(bucket.updated).as_secs_f64() / FAILURE_REFILL.as_secs_f64();
        let missing = 1.0 - (bucket.tokens + earned).min(FAILURE_BURST);
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            FAILURE_REFILL.mul_f64(missing)
        }
    }

    /// Records a failed handshake (wrong secret, garbage, silence, a forged
    /// session token). A reserved token is simply kept.
    pub(crate) fn failed(&mut self, source: IpAddr, charge: Charge, now: Instant) {
        if charge == Charge::Reserved {
            return;
        }
        self.make_room(now);
        let bucket = self.sources.entry(source.to_canonical()).or_insert_with(|| Bucket::full(now));
        bucket.refill(now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }

    /// Gives back what admission reserved: the connection was no guess (a data
    /// channel of a live session, another protocol version). A source back at
    /// a full bucket is forgotten.
    pub(crate) fn refund(&mut self, source: IpAddr, charge: Charge, now: Instant) {
        if charge == Charge::Free {
            return;
        }
        let source = source.to_canonical();
        if let Some(bucket) = self.sources.get_mut(&source) {
            bucket.refill(now);
            bucket.tokens = (bucket.tokens + 1.0).min(FAILURE_BURST);
            if bucket.tokens >= FAILURE_BURST {
                self.sources.remove(&source);
            }
        }
    }

    /// A source that authenticated is forgiven its earlier mistakes.
    pub(crate) fn succeeded(&mut self, source: IpAddr) {
        self.sources.remove(&source.to_canonical());
    }

    fn make_room(&mut self, now: Instant) {
        if self.sources.len() >= MAX_TRACKED_SOURCES {
            self.sources.retain(|_, b| {
                b.refill(now);
                b.tokens < FAILURE_BURST
            });
        }
    }
}

/// A source stays known this long after its last successful authentication or
/// data channel. A connected client's address is refreshed at least every
/// pool-idle interval (its pooled channels expire and are replaced).
pub(crate) const KNOWN_FOR: Duration = Duration::from_secs(3600);

/// Addresses clients authenticated from recently. Only a holder of a secret can
/// add one, so the map grows with the fleet, not with an attack.
#[derive(Default)]
pub(crate) struct KnownSources {
    seen: HashMap<IpAddr, Instant>,
}

impl KnownSources {
    /// A client authenticated (or opened a data channel of its session) from `source`.
    pub(crate) fn remember(&mut self, source: IpAddr, now: Instant) {
        if self.seen.len() >= MAX_TRACKED_SOURCES {
            self.seen.retain(|_, at| now.saturating_duration_since(*at) < KNOWN_FOR);
        }
        self.seen.insert(source.to_canonical(), now);
    }

    /// Whether a client authenticated from `source` within [`KNOWN_FOR`].
    pub(crate) fn knows(&self, source: IpAddr, now: Instant) -> bool {
        self.seen.get(&source.to_canonical()).is_some_and(|at| now.saturating_duration_since(*at) < KNOWN_FOR)
    }
}

/// A data channel may present an ended session's token this long after the end.
pub(crate) const LATE_WINDOW: Duration = Duration::from_secs(60);
/// Late data channels one ended session may present: a replaced client had at
/// most its whole pool ([`MAX_POOL_SIZE`]) opening, and as many again asked for
/// by waiting visitors. Beyond it, they count as forged.
pub(crate) const LATE_CHANNELS_PER_SESSION: usize = 2 * MAX_POOL_SIZE;
/// Ended sessions remembered at most.
const MAX_ENDED_SESSIONS: usize = 1024;

/// Tokens of sessions that ended within [`LATE_WINDOW`]. A data channel naming
/// one is a replaced client catching up; one naming no session at all is a
/// guess (tokens are random), and is held against its source.
#[derive(Default)]
pub(crate) struct EndedSessions {
    ended: VecDeque<EndedSession>,
}

struct EndedSession {
    token: String,
    at: Instant,
    presented: usize,
}

impl EndedSessions {
    /// The session whose data channels present `token` has ended (or is about
    /// to; a session already remembered is not added twice).
    pub(crate) fn ended(&mut self, token: &str, now: Instant) {
        self.prune(now);
        if self.ended.iter().any(|e| tokens_equal(&e.token, token)) {
            return;
        }
        if self.ended.len() >= MAX_ENDED_SESSIONS {
            self.ended.pop_front();
        }
        self.ended.push_back(EndedSession { token: token.to_string(), at: now, presented: 0 });
    }

    /// Whether `token` is a recently ended session's, and within what its client
    /// may still present; counts the presentation.
    pub(crate) fn late(&mut self, token: &str, now: Instant) -> bool {
        self.prune(now);
        // Every entry is compared, in constant time each, whichever matches.
        let mut found = None;
        for (i, e) in self.ended.iter().enumerate() {
            if tokens_equal(&e.token, token) {
                found = Some(i);
            }
        }
        let Some(entry) = found.and_then(|i| self.ended.get_mut(i)) else { return false };
        entry.presented += 1;
        entry.presented <= LATE_CHANNELS_PER_SESSION
    }

    fn prune(&mut self, now: Instant) {
        while self.ended.front().is_some_and(|e| now.saturating_duration_since(e.at) >= LATE_WINDOW) {
            self.ended.pop_front();
        }
    }
}

/// Connections not yet authenticated, bounded in total and per source, with
/// slots beyond the total kept for known clients: sources that fill every
/// ordinary slot with silent connections cannot keep a client out.
pub(crate) struct Unauthenticated {
    max_total: usize,
    max_per_source: usize,
    reserved_for_known: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One unauthenticated connection's slot; freed on drop (authenticated, or gone).
pub(crate) struct Pending {
    owner: Arc<Unauthenticated>,
    source: IpAddr,
}

impl Unauthenticated {
    /// `max_total` slots for anyone, at most `max_per_source` of them per
    /// unknown source; known sources may use `reserved_for_known` more, and up
    /// to `max_total` each (a client's data channels arrive in bursts).
    pub(crate) fn new(max_total: usize, max_per_source: usize, reserved_for_known: usize) -> Arc<Unauthenticated> {
        Arc::new(Unauthenticated { max_total, max_per_source, reserved_for_known, open: Mutex::new((0, HashMap::new())) })
    }

    /// A slot for a new connection from `source`, or `None` when its bounds are
    /// reached.
    pub(crate) fn enter(self: &Arc<Self>, source: IpAddr, known: bool) -> Option<Pending> {
        let source = source.to_canonical();
        let mut open = lock(&self.open);
        let (total, per_source) = &mut *open;
        let mine = per_source.entry(source).or_insert(0);
        let (total_bound, source_bound) =
            if known { (self.max_total + self.reserved_for_known, self.max_total) } else { (self.max_total, self.max_per_source) };
        if *total >= total_bound || *mine >= source_bound {
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
            let charge = t.admit(a, false, start).expect("within the burst");
            t.failed(a, charge, start);
        }
        assert_eq!(t.admit(a, false, start), None, "burst used up");
        assert_eq!(t.retry_after(a, start), FAILURE_REFILL, "a whole token to earn");
        assert_eq!(t.retry_after(a, start + FAILURE_REFILL / 4), FAILURE_REFILL * 3 / 4);
        assert!(t.admit(b, false, start).is_some(), "other sources are not affected");
        assert_eq!(t.retry_after(b, start), Duration::ZERO);
        assert_eq!(t.admit(a, false, start + FAILURE_REFILL / 2), None);
        let charge = t.admit(a, false, start + FAILURE_REFILL).expect("one attempt per refill interval");
        t.failed(a, charge, start + FAILURE_REFILL);
        assert_eq!(t.admit(a, false, start + FAILURE_REFILL), None);
        // IPv4-mapped IPv6 is the same source.
        assert_eq!(t.admit(ip("::ffff:192.0.2.1"), false, start + FAILURE_REFILL), None);
        t.succeeded(a);
        assert!(t.admit(a, false, start + FAILURE_REFILL).is_some());
    }

    #[test]
    fn concurrent_handshakes_share_the_tokens_left_instead_of_each_seeing_them() {
        let mut t = AuthThrottle::default();
        let start = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..(FAILURE_BURST as usize - 1) {
            let charge = t.admit(a, false, start).unwrap();
            t.failed(a, charge, start);
        }
        // One token left: sixteen handshakes started at once get one admission.
        let admitted: Vec<Charge> = (0..16).filter_map(|_| t.admit(a, false, start)).collect();
        assert_eq!(admitted, vec![Charge::Reserved]);
        // Its failure costs nothing more; a refund (a valid data channel) gives it back.
        t.failed(a, Charge::Reserved, start);
        assert_eq!(t.admit(a, false, start), None);
        let later = start + FAILURE_REFILL;
        let charge = t.admit(a, false, later).unwrap();
        t.refund(a, charge, later);
        assert!(t.admit(a, false, later).is_some(), "refunded");
    }

    #[test]
    fn a_known_clean_source_is_not_held_to_the_burst_until_it_fails() {
        let mut t = AuthThrottle::default();
        let start = Instant::now();
        let a = ip("192.0.2.1");
        let charges: Vec<Charge> = (0..200).filter_map(|_| t.admit(a, true, start)).collect();
        assert_eq!(charges.len(), 200, "a busy client's burst of data channels");
        assert!(charges.iter().all(|c| *c == Charge::Free));
        // One stray failure on record (a replaced session's channel): the next
        // burst is still admitted whole.
        t.failed(a, Charge::Free, start);
        assert_eq!((0..200).filter_map(|_| t.admit(a, true, start)).count(), 200, "one failure does not cut a known client to the burst");
        for _ in 1..FAILURE_BURST as usize {
            t.failed(a, Charge::Free, start);
        }
        assert_eq!(t.admit(a, true, start), None, "known, but failing: throttled like anyone");
        // An unknown source starts with the burst, reserved one by one.
        let b = ip("192.0.2.2");
        assert_eq!((0..16).filter_map(|_| t.admit(b, false, start)).count(), FAILURE_BURST as usize);
    }

    #[test]
    fn known_sources_are_remembered_for_a_while() {
        let mut k = KnownSources::default();
        let start = Instant::now();
        let a = ip("192.0.2.1");
        assert!(!k.knows(a, start));
        k.remember(a, start);
        assert!(k.knows(ip("::ffff:192.0.2.1"), start + KNOWN_FOR / 2));
        assert!(!k.knows(a, start + KNOWN_FOR));
    }

    #[test]
    fn an_ended_sessions_token_is_late_for_a_while_and_a_bounded_number_of_times() {
        let mut e = EndedSessions::default();
        let start = Instant::now();
        assert!(!e.late("forged", start), "never a session's");
        e.ended("old", start);
        assert!(!e.late("forged", start));
        for _ in 0..LATE_CHANNELS_PER_SESSION {
            assert!(e.late("old", start + LATE_WINDOW / 2));
        }
        assert!(!e.late("old", start + LATE_WINDOW / 2), "more than a replaced client can present");
        e.ended("older", start);
        assert!(!e.late("older", start + LATE_WINDOW), "too late");
    }

    #[test]
    fn unauthenticated_connections_are_bounded_in_total_and_per_source() {
        let gate = Unauthenticated::new(3, 2, 0);
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        let a1 = gate.enter(a, false).expect("first");
        let _a2 = gate.enter(a, false).expect("second");
        assert!(gate.enter(a, false).is_none(), "per-source bound");
        let _b1 = gate.enter(b, false).expect("other source");
        assert!(gate.enter(c, false).is_none(), "total bound");
        drop(a1);
        assert!(gate.enter(c, false).is_some(), "a freed slot is reusable");
    }

    #[test]
    fn known_sources_have_slots_that_strangers_cannot_take() {
        let gate = Unauthenticated::new(4, 2, 3);
        let strangers: Vec<Pending> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .flat_map(|s| [gate.enter(ip(s), false), gate.enter(ip(s), false)])
            .flatten()
            .collect();
        assert_eq!(strangers.len(), 4, "the ordinary slots");
        let client = ip("198.51.100.7");
        assert!(gate.enter(client, false).is_none(), "full for strangers");
        let kept: Vec<Pending> = (0..5).filter_map(|_| gate.enter(client, true)).collect();
        assert_eq!(kept.len(), 3, "the kept slots, beyond the per-source bound of strangers");
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
