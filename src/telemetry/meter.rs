//! The data path's side of the registry: what each copy loop adds a chunk to.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::{Gauge, IntCounter};

use super::families::RECEIVED;
use super::series::MappingMetrics;
use crate::core::rate::Limiter;
use crate::core::time::unix_now;

/// Where a meter's bytes are counted, with the time of the last chunk.
#[derive(Clone)]
enum Counted {
    /// A mapping's user bytes in one direction.
    Mapping { series: MappingMetrics, received: bool },
    /// A tunnel's wire bytes in one direction.
    Tunnel { bytes: IntCounter, activity: Gauge },
}

/// What one direction of a copy loop adds each chunk to: a byte counter and
/// a "last activity" gauge, resolved before the first byte moves (none: a
/// meter that only paces or tallies).
#[derive(Clone, Default)]
pub struct Meter {
    counted: Option<Counted>,
    held: Option<Arc<Held>>,
    /// The mapping's shared cap for this direction, if it has one at all.
    limiter: Option<Arc<Limiter>>,
    /// One visitor connection's bytes in this direction (see
    /// [`Meter::tallying`]): added by the same `record` that adds to the
    /// counters, so a connection's numbers and its mapping's never disagree.
    connection: Option<Arc<AtomicU64>>,
}

/// Part of a meter that only counts once [`Held::release`] is called: bytes sent
/// on ahead of an answer (a tunneled visitor's first bytes travel with the
/// `connect` request) must not count as reaching the target until it answers.
pub struct Held {
    meter: Meter,
    released: AtomicBool,
    pending: AtomicU64,
}

impl Held {
    /// The target answered: what was held is counted now, the rest live.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        let pending = self.pending.swap(0, Ordering::SeqCst);
        if pending > 0 {
            self.meter.record(pending);
        }
    }

    fn record(&self, n: u64) {
        if self.released.load(Ordering::SeqCst) {
            return self.meter.record(n);
        }
        self.pending.fetch_add(n, Ordering::SeqCst);
        // Released meanwhile: take back what we added, unless release did.
        if self.released.load(Ordering::SeqCst) {
            let pending = self.pending.swap(0, Ordering::SeqCst);
            if pending > 0 {
                self.meter.record(pending);
            }
        }
    }
}

impl Meter {
    /// A meter adding to a tunnel's `bytes` and stamping `activity` with the time of each chunk.
    pub(crate) fn tunnel(bytes: IntCounter, activity: Gauge) -> Meter {
        Meter { counted: Some(Counted::Tunnel { bytes, activity }), ..Meter::default() }
    }

    /// A meter adding to a mapping's bytes in `direction` ([`super::SENT`] or
    /// [`RECEIVED`]) and stamping its last activity.
    pub(crate) fn mapping(series: MappingMetrics, direction: &str) -> Meter {
        Meter { counted: Some(Counted::Mapping { series, received: direction == RECEIVED }), ..Meter::default() }
    }

    /// Paces this direction by `limiter` (shared by all of a mapping's connections;
    /// its rate can change while they run).
    pub fn limited_by(mut self, limiter: Arc<Limiter>) -> Meter {
        self.limiter = Some(limiter);
        self
    }

    /// How many bytes (at most `want`) this direction may move now: waits for
    /// the cap's turn, if there is a cap. Every copy loop asks before it reads
    /// (or writes) a chunk and moves no more than this, so every forwarding
    /// path is capped the same way and nothing goes out ahead of the cap. What
    /// is not moved goes back with [`Meter::unused`]; what is, is counted with
    /// [`Meter::record`]. Without a cap this is `want` at once.
    #[inline]
    pub async fn allowance(&self, want: usize) -> usize {
        match &self.limiter {
            Some(limiter) => limiter.grant(want).await,
            None => want,
        }
    }

    /// [`Meter::allowance`] without waiting: what the cap lets through right
    /// now (possibly 0), for bytes sent on ahead of an answer.
    pub fn allowance_now(&self, want: usize) -> usize {
        match &self.limiter {
            Some(limiter) => limiter.grant_now(want),
            None => want,
        }
    }

    /// Also adds every byte this meter counts to `connection`: one visitor
    /// connection's share of the mapping's counters, read live by
    /// `/api/connections` and written to the connection log when it ends.
    pub fn tallying(mut self, connection: Arc<AtomicU64>) -> Meter {
        self.connection = Some(connection);
        self
    }

    /// Whether a cap paces this direction now.
    pub fn capped(&self) -> bool {
        self.limiter.as_ref().is_some_and(|limiter| limiter.rate() > 0)
    }

    /// Gives back `n` bytes of an allowance that were not moved.
    #[inline]
    pub fn unused(&self, n: usize) {
        if let Some(limiter) = self.limiter.as_ref().filter(|_| n > 0) {
            limiter.refund(n);
        }
    }

    /// Moves this meter's counting behind a [`Held`] gate, keeping `always`
    /// (say, tunnel wire bytes, which did cross) counted live.
    pub fn held_behind(mut self, always: Meter) -> (Meter, Arc<Held>) {
        let limiter = self.limiter.take();
        let held = Arc::new(Held { meter: self, released: AtomicBool::new(false), pending: AtomicU64::new(0) });
        let mut outer = always;
        outer.held = Some(held.clone());
        outer.limiter = limiter.or(outer.limiter);
        (outer, held)
    }

    /// Adds `n` bytes, live.
    #[inline]
    pub fn record(&self, n: u64) {
        if cfg!(feature = "bench-uncounted") {
            return;
        }
        if let Some(held) = &self.held {
            held.record(n);
        }
        match &self.counted {
            Some(Counted::Mapping { series, received }) => {
                match received {
                    true => series.received.inc_by(n),
                    false => series.sent.inc_by(n),
                }
                series.last_activity.set(unix_now());
            }
            Some(Counted::Tunnel { bytes, activity }) => {
                bytes.inc_by(n);
                activity.set(unix_now());
            }
            None => {}
        }
        if let Some(connection) = &self.connection {
            connection.fetch_add(n, Ordering::Relaxed);
        }
    }
}
