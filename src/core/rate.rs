//! A shared token bucket: the mechanism that paces a direction of traffic to a
//! rate. Which rate, and for whom, is policy's business (`crate::policy`); the
//! data path's meters hold a bucket and ask it how much they may move.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::sync::lock;

/// A token bucket shared by every connection of a mapping in one direction.
///
/// Unlimited (rate 0) it costs one relaxed atomic load per chunk and takes no
/// lock. Limited, a connection asks for an allowance *before* it reads a chunk
/// ([`Limiter::grant`]) and reads no more than it was granted, so no byte goes
/// out ahead of the cap, whatever the number or length of the connections:
///
/// - the bucket holds at most [`BURST`] worth of tokens and never goes into
///   debt, so a burst costs nobody more than one burst's time afterwards;
/// - connections take turns in arrival order (a FIFO queue), each taking one
///   share, the burst split between those waiting: a long download gets the
///   same share per round as each short one beside it;
/// - a turn is waited for, never slept off after the fact, so a connection
///   whose peer left is dropped from the queue the moment its relay ends, and
///   a dead relay writes (and learns of the reset) within one round.
#[derive(Default)]
pub struct Limiter {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
    /// Whose turn it is: tokio's mutex queues its waiters in order.
    turn: tokio::sync::Mutex<()>,
    /// Connections waiting for or holding a turn, among whom a burst is split.
    contenders: AtomicUsize,
}

/// How much unused allowance a bucket keeps, in time at its rate.
const BURST: Duration = Duration::from_millis(100);

/// The smallest share worth a write, unless the whole burst is smaller: many
/// connections on a low cap move at least this much per turn.
const MIN_SHARE: usize = 1024;

/// How often a connection waiting for its turn looks at the rate again, so a
/// raised or lifted cap frees it.
const RECHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Bucket {
    /// Tokens (bytes) available, between 0 and the capacity.
    tokens: f64,
    refilled: Option<Instant>,
}

impl Bucket {
    /// Adds what `rate` earned since the last refill, up to `capacity`; a bucket
    /// never used starts full.
    fn refill(&mut self, rate: f64, capacity: f64, now: Instant) {
        self.tokens = match self.refilled {
            Some(at) => (self.tokens + now.saturating_duration_since(at).as_secs_f64() * rate).min(capacity),
            None => capacity,
        };
        self.refilled = Some(now);
    }
}

/// Bytes a bucket at `rate` holds at most: [`BURST`] of it, and at least one byte.
fn capacity(rate: u64) -> f64 {
    (rate as f64 * BURST.as_secs_f64()).max(1.0)
}

/// One turn's share for a connection that wants `want` bytes while
/// `contenders` take turns: the burst split evenly, no less than [`MIN_SHARE`]
/// (nor more than the burst), no more than wanted.
fn share(rate: u64, want: usize, contenders: usize) -> usize {
    let capacity = capacity(rate) as usize;
    let even = capacity / contenders.max(1);
    even.max(MIN_SHARE.min(capacity)).max(1).min(want)
}

/// Counts a connection among the contenders for as long as it lives.
struct Contending<'a>(&'a AtomicUsize);

impl<'a> Contending<'a> {
    fn enter(contenders: &'a AtomicUsize) -> Contending<'a> {
        contenders.fetch_add(1, Ordering::Relaxed);
        Contending(contenders)
    }
}

impl Drop for Contending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Limiter {
    pub fn set_rate(&self, rate: u64) {
        let before = self.rate.swap(rate, Ordering::Relaxed);
        if before != rate {
            // A new rate starts from a full bucket of its own size.
            *lock(&self.bucket) = Bucket::default();
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// How many bytes (at most `want`) the caller may move now, waiting for its
    /// turn and for the tokens. Bytes granted but not moved go back with
    /// [`Limiter::refund`]. Unlimited, it is `want` at once; a rate lifted while
    /// waiting ends the wait (checked every [`RECHECK`]). Dropping the future
    /// gives up the place in the queue without taking anything.
    pub async fn grant(&self, want: usize) -> usize {
        if want == 0 || self.rate() == 0 {
            return want;
        }
        let _contending = Contending::enter(&self.contenders);
        let _turn = self.turn.lock().await;
        loop {
            let rate = self.rate();
            if rate == 0 {
                return want;
            }
            let share = share(rate, want, self.contenders.load(Ordering::Relaxed));
            match self.take_at(share, rate, Instant::now()) {
                Ok(()) => return share,
                Err(wait) => tokio::time::sleep(wait.min(RECHECK)).await,
            }
        }
    }

    /// What may move at once without waiting, at most `want`: a share of the
    /// tokens there are, if nobody is waiting for a turn (else 0: no cutting in).
    pub fn grant_now(&self, want: usize) -> usize {
        let rate = self.rate();
        if want == 0 || rate == 0 {
            return want;
        }
        let Ok(_turn) = self.turn.try_lock() else { return 0 };
        let share = share(rate, want, self.contenders.load(Ordering::Relaxed) + 1);
        let mut bucket = lock(&self.bucket);
        bucket.refill(rate as f64, capacity(rate), Instant::now());
        let granted = share.min(bucket.tokens as usize);
        bucket.tokens -= granted as f64;
        granted
    }

    /// Gives back `n` bytes of a grant that were not moved (a short read).
    pub fn refund(&self, n: usize) {
        let rate = self.rate();
        if n == 0 || rate == 0 {
            return;
        }
        let mut bucket = lock(&self.bucket);
        if bucket.refilled.is_some() {
            bucket.tokens = (bucket.tokens + n as f64).min(capacity(rate));
        }
    }

    /// Takes `n` tokens if the bucket has them at `now`; otherwise how long
    /// until it will.
    fn take_at(&self, n: usize, rate: u64, now: Instant) -> Result<(), Duration> {
        let mut bucket = lock(&self.bucket);
        bucket.refill(rate as f64, capacity(rate), now);
        let n = n as f64;
        if bucket.tokens >= n {
            bucket.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - bucket.tokens) / rate as f64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_never_lends_ahead_and_holds_one_burst() {
        let limiter = Limiter::default();
        limiter.set_rate(1000);
        let t0 = Instant::now();
        // A fresh bucket holds 100 ms of the rate: 100 B now, not one more.
        assert_eq!(limiter.take_at(100, 1000, t0), Ok(()));
        assert_eq!(limiter.take_at(50, 1000, t0), Err(Duration::from_millis(50)));
        // Refused takes run up no debt: 50 ms later the 50 B are there.
        assert_eq!(limiter.take_at(50, 1000, t0 + Duration::from_millis(50)), Ok(()));
        // However long it stays idle, it holds one burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(limiter.take_at(100, 1000, later), Ok(()));
        assert_eq!(limiter.take_at(1, 1000, later), Err(Duration::from_millis(1)));
        // A refund goes back, up to the burst.
        limiter.refund(500);
        assert_eq!(limiter.take_at(100, 1000, later), Ok(()));
        assert!(limiter.take_at(1, 1000, later).is_err());
    }

    #[test]
    fn a_share_splits_the_burst_between_contenders() {
        // 100 kB/s: a burst of 10 kB.
        assert_eq!(share(100_000, 64 * 1024, 1), 10_000);
        assert_eq!(share(100_000, 64 * 1024, 4), 2_500);
        assert_eq!(share(100_000, 64 * 1024, 100), MIN_SHARE);
        assert_eq!(share(100_000, 300, 1), 300, "never more than wanted");
        // A tiny rate still moves a byte at a time.
        assert_eq!(share(5, 64 * 1024, 3), 1);
        // A high one is bounded by what the caller reads at once.
        assert_eq!(share(1 << 30, 64 * 1024, 2), 64 * 1024);
    }

    #[tokio::test]
    async fn unlimited_grants_everything_at_once() {
        let limiter = Limiter::default();
        assert_eq!(limiter.grant(1 << 20).await, 1 << 20);
        assert_eq!(limiter.grant_now(1 << 20), 1 << 20);
    }

    #[tokio::test]
    async fn grants_hold_the_rate_and_take_turns() {
        let limiter = std::sync::Arc::new(Limiter::default());
        limiter.set_rate(100_000);
        let start = Instant::now();
        let turns = std::sync::Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..2)
            .map(|task| {
                let (limiter, turns) = (limiter.clone(), turns.clone());
                tokio::spawn(async move {
                    for _ in 0..5 {
                        let granted = limiter.grant(64 * 1024).await;
                        lock(&turns).push((task, granted));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let turns = lock(&turns).clone();
        let moved: usize = turns.iter().map(|(_, granted)| granted).sum();
        // Never more than the rate plus the first burst.
        let allowed = 100_000.0 * start.elapsed().as_secs_f64() + 10_000.0;
        assert!(moved as f64 <= allowed, "{moved} B > {allowed}: {turns:?}");
        // Each waits its turn: while both want more, neither goes twice in a
        // row (only the first, before the other arrived, and the last, after
        // it left, may), and they share the burst.
        let twice = turns.windows(2).filter(|w| w[0].0 == w[1].0).count();
        assert!(twice <= 2, "{turns:?}");
        assert!(turns[2..turns.len() - 2].iter().all(|(_, granted)| *granted == 5_000), "{turns:?}");
    }
}
