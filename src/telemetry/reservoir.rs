//! The API's connect-time quantiles: a small reservoir per mapping holding the
//! last [`RESERVOIR_SIZE`] connect times of the last [`QUANTILE_WINDOW`],
//! exact over those (nearest rank), where the histogram's buckets could only
//! place a quantile within a factor of about two. Recording one costs a lock
//! per connection, never per byte.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::core::sync::lock;

/// How far back the API's connect-time quantiles look: long enough that a
/// mapping with a visitor every few minutes still shows them, short enough that
/// a slow spell an hour ago no longer does.
pub(crate) const QUANTILE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// At most this many recent connect times are kept per mapping (24 KiB): the
/// quantiles are exact over them; at 1,000 connects/s they cover the last second.
pub(crate) const RESERVOIR_SIZE: usize = 1024;

/// A mapping's recent connect times, newest last (nothing allocated before the first).
#[derive(Default)]
pub(crate) struct Reservoir(Mutex<VecDeque<(Instant, f64)>>);

/// The 50th and 99th percentile of a mapping's recent connect times, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub(crate) struct ConnectQuantiles {
    pub p50: f64,
    pub p99: f64,
}

impl Reservoir {
    pub(super) fn record(&self, at: Instant, seconds: f64) {
        let mut samples = lock(&self.0);
        if samples.len() == RESERVOIR_SIZE {
            samples.pop_front();
        }
        samples.push_back((at, seconds));
    }

    /// Over the samples of the last [`QUANTILE_WINDOW`] before `now`; `None`
    /// without any.
    pub(crate) fn quantiles(&self, now: Instant) -> Option<ConnectQuantiles> {
        let mut values: Vec<f64> = {
            let mut samples = lock(&self.0);
            while samples.front().is_some_and(|(at, _)| now.saturating_duration_since(*at) > QUANTILE_WINDOW) {
                samples.pop_front();
            }
            samples.iter().map(|(_, s)| *s).collect()
        };
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        // Nearest rank: the smallest sample with at least q of them at or below it.
        let rank = |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Some(ConnectQuantiles { p50: rank(0.5), p99: rank(0.99) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank_over_the_recent_window() {
        let reservoir = Reservoir::default();
        let now = Instant::now();
        assert_eq!(reservoir.quantiles(now), None);
        for ms in 1..=100 {
            reservoir.record(now, f64::from(ms) / 1000.0);
        }
        assert_eq!(reservoir.quantiles(now), Some(ConnectQuantiles { p50: 0.050, p99: 0.099 }));
        // Older than the window: gone.
        assert_eq!(reservoir.quantiles(now + QUANTILE_WINDOW + Duration::from_secs(1)), None);
        let one = Reservoir::default();
        one.record(now, 0.25);
        assert_eq!(one.quantiles(now), Some(ConnectQuantiles { p50: 0.25, p99: 0.25 }));
    }

    #[test]
    fn the_reservoir_keeps_the_newest_samples() {
        let reservoir = Reservoir::default();
        let now = Instant::now();
        for _ in 0..RESERVOIR_SIZE {
            reservoir.record(now, 9.0);
        }
        for _ in 0..RESERVOIR_SIZE {
            reservoir.record(now, 0.001);
        }
        assert_eq!(reservoir.quantiles(now), Some(ConnectQuantiles { p50: 0.001, p99: 0.001 }));
    }
}
