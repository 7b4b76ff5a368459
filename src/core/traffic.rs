//! Bytes in both directions, as every traffic number in the daemon comes.

use std::ops::{Add, AddAssign};

/// Bytes sent and received, one pair of counters read together. What "sent"
/// means is the counter's: for a mapping, visitor to target; for a tunnel, from
/// this side. A named pair, so the two directions cannot be swapped the way the
/// fields of a `(u64, u64)` can.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes in the counter's `sent` direction.
    pub sent: u64,
    /// Bytes the other way.
    pub received: u64,
}

impl Traffic {
    /// Both directions together: what a quota counts.
    pub fn total(self) -> u64 {
        self.sent + self.received
    }

    /// Whether nothing moved in either direction.
    pub fn is_zero(self) -> bool {
        self == Traffic::default()
    }
}

impl Add for Traffic {
    type Output = Traffic;

    fn add(self, other: Traffic) -> Traffic {
        Traffic { sent: self.sent + other.sent, received: self.received + other.received }
    }
}

impl AddAssign for Traffic {
    fn add_assign(&mut self, other: Traffic) {
        *self = *self + other;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_keep_the_directions_apart() {
        let mut t = Traffic { sent: 5, received: 7 };
        t += Traffic { sent: 1, received: 0 };
        assert_eq!(t, Traffic { sent: 6, received: 7 });
        assert_eq!(t.total(), 13);
        assert!(!t.is_zero());
        assert!(Traffic::default().is_zero());
    }
}
