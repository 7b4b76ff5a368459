//! Reconnect delays: exponential with jitter, capped, so a fleet of clients does
//! not stampede a server that comes back.

use std::time::Duration;

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Exponential backoff with jitter, capped.
pub(super) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff { attempt: 0 }
    }

    pub(super) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let exp = BACKOFF_START.saturating_mul(1u32 << self.attempt.min(16)).min(BACKOFF_CAP);
        self.attempt = self.attempt.saturating_add(1);
        // Full range 50–100 % of the step: spreads reconnects, never collapses to 0.
        exp.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= BACKOFF_START / 2 && first <= BACKOFF_START);
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            last = b.next_delay();
            assert!(last <= BACKOFF_CAP);
        }
        assert!(last >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_START);
    }
}
