//! A shared token bucket: the mechanism that paces a direction of traffic to a
//! rate. Which rate, and for whom, is policy's business (`crate::policy`); the
//! data path's meters hold a bucket and ask it how long to wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::sync::lock;

/// A token bucket shared by every connection of a mapping in one direction.
///
/// Unlimited (rate 0) it costs one relaxed atomic load per chunk and takes no
/// lock. Limited, each chunk is debited after it was forwarded and the copy
/// sleeps off any debt, so the sum over all connections converges to the rate
/// whatever their number; the bucket holds at most [`BURST`] worth of tokens,
/// which bounds the burst after an idle spell.
#[derive(Default)]
pub struct Limiter {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
}

/// How much unused allowance a bucket keeps, in time at its rate.
const BURST: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Bucket {
    /// Tokens (bytes) available; negative = debt to sleep off.
    tokens: f64,
    refilled: Option<std::time::Instant>,
}

impl Limiter {
    pub fn set_rate(&self, rate: u64) {
        let before = self.rate.swap(rate, Ordering::Relaxed);
        if before != rate {
            // A new rate starts from an empty bucket: debt run up at a low cap
            // must not hold back a raised one.
            *lock(&self.bucket) = Bucket::default();
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Debits `n` bytes; returns how long the caller must wait before moving more.
    pub fn debit(&self, n: u64) -> Option<Duration> {
        if self.rate.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.debit_at(n, std::time::Instant::now())
    }

    fn debit_at(&self, n: u64, now: std::time::Instant) -> Option<Duration> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return None;
        }
        let rate = rate as f64;
        let mut b = lock(&self.bucket);
        let capacity = rate * BURST.as_secs_f64();
        b.tokens = match b.refilled {
            Some(at) => (b.tokens + now.duration_since(at).as_secs_f64() * rate).min(capacity),
            None => capacity,
        };
        b.refilled = Some(now);
        b.tokens -= n as f64;
        (b.tokens < 0.0).then(|| Duration::from_secs_f64(-b.tokens / rate))
    }

    /// Waits out `n` bytes' worth of the rate, if there is a rate. A raised or
    /// lifted rate ends the wait early (checked every 100 ms), so lifting a cap
    /// frees connections that were sleeping off a low one.
    pub async fn pace(&self, n: u64) {
        let Some(mut wait) = self.debit(n) else { return };
        let rate = self.rate();
        while !wait.is_zero() {
            let step = wait.min(Duration::from_millis(100));
            tokio::time::sleep(step).await;
            wait -= step;
            if self.rate() != rate {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_bucket_holds_its_rate_across_users() {
        let limiter = Limiter::default();
        let t0 = std::time::Instant::now();
        assert_eq!(limiter.debit_at(1 << 30, t0), None, "unlimited never waits");
        limiter.set_rate(1000);
        // 100 ms of burst, then 1,000 B/s whoever debits.
        assert_eq!(limiter.debit_at(100, t0), None);
        assert_eq!(limiter.debit_at(500, t0), Some(Duration::from_millis(500)));
        // Half a second later the debt is paid; the next 250 B cost 250 ms.
        assert_eq!(limiter.debit_at(250, t0 + Duration::from_millis(500)), Some(Duration::from_millis(250)));
        // A new rate starts afresh.
        limiter.set_rate(2000);
        assert_eq!(limiter.debit_at(200, t0 + Duration::from_millis(500)), None);
    }
}
