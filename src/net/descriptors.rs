//! The share of this process's open-file limit that connections caused from
//! outside may use: visitors on the server, data channels and targets on the
//! client. Whatever their shape — a mapping forwarding to itself, a loop
//! through another host or relay, a flood — they stop at this budget, and the
//! descriptors kept back stay free for the API, the tunnel and the store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::core::sync::lock;

/// Descriptors kept back from the budget: a quarter of the limit — twice the
/// API's own bound (an eighth), the rest for the tunnel's handshakes and idle
/// data channels, the store, logs and name lookups — at least [`MIN_RESERVE`],
/// at most [`MAX_RESERVE`] (beyond which every fixed bound is covered).
const RESERVE_SHARE: u64 = 4;
const MIN_RESERVE: u64 = 32;
const MAX_RESERVE: u64 = 4096;

/// Refusals are logged at WARN at most this often; the others are counted into
/// the next line.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Descriptors that connections caused from outside may hold at once, shared
/// by everything that opens them (every mapping of a server, every data
/// channel of a client).
pub(crate) struct DescriptorBudget {
    permits: Arc<Semaphore>,
    capacity: usize,
    /// When a refusal was last logged, and how many were not logged since.
    refusals: Mutex<(Option<Instant>, u64)>,
}

/// Descriptors taken from a [`DescriptorBudget`], given back on drop.
pub(crate) struct Taken {
    _permits: OwnedSemaphorePermit,
}

/// The descriptors of a [`DescriptorBudget`], taken from another owner.
#[derive(Clone)]
pub(crate) struct BudgetShare {
    permits: Arc<Semaphore>,
}

impl BudgetShare {
    /// `descriptors` from the budget, or `None` when that would exceed it.
    pub(crate) fn try_take(&self, descriptors: u32) -> Option<Taken> {
        self.permits.clone().try_acquire_many_owned(descriptors).ok().map(|permits| Taken { _permits: permits })
    }
}

impl DescriptorBudget {
    /// The budget for this process as it is now: its soft `RLIMIT_NOFILE`, less
    /// the descriptors already open (listeners, the store, the runtime) and the
    /// reserve. Call it after the limit was raised and the fixed listeners bound.
    pub(crate) fn for_this_process() -> DescriptorBudget {
        DescriptorBudget::with_capacity(capacity(super::socket::descriptor_limit(), open_descriptors()))
    }

    pub(crate) fn with_capacity(capacity: usize) -> DescriptorBudget {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        DescriptorBudget { permits: Arc::new(Semaphore::new(capacity)), capacity, refusals: Mutex::new((None, 0)) }
    }

    /// How many descriptors the budget holds in all.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// `descriptors` from the budget, or `None` when that would exceed it.
    pub(crate) fn try_take(&self, descriptors: u32) -> Option<Taken> {
        self.share().try_take(descriptors)
    }

    /// A handle on the same descriptors, for a taker that is not handed the
    /// budget with each call (the relays' pipes, see `net::splice`).
    pub(crate) fn share(&self) -> BudgetShare {
        BudgetShare { permits: self.permits.clone() }
    }

    /// Notes a refusal; `Some(not_logged)` when this one should be logged at
    /// WARN (the first of an interval), with how many were refused unlogged
    /// since the last such line. A loop refuses thousands a second: one line
    /// per interval, not one per refusal.
    pub(crate) fn refused(&self) -> Option<u64> {
        let mut state = lock(&self.refusals);
        let (last, unlogged) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < REFUSAL_LOG_INTERVAL) {
            *unlogged += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(unlogged))
    }
}

/// The budget for a soft limit `limit` (`None`: unlimited) with `open`
/// descriptors in use already.
fn capacity(limit: Option<u64>, open: u64) -> usize {
    let Some(limit) = limit else { return Semaphore::MAX_PERMITS };
    let reserve = (limit / RESERVE_SHARE).clamp(MIN_RESERVE, MAX_RESERVE);
    usize::try_from(limit.saturating_sub(open).saturating_sub(reserve)).unwrap_or(usize::MAX)
}

/// Descriptors this process has open now (what `/proc/self/fd` lists, less the
/// one reading it); a guess when that cannot be read.
fn open_descriptors() -> u64 {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => (entries.count() as u64).saturating_sub(1),
        Err(_) => 64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_the_limit_less_what_is_open_and_the_reserve() {
        // 256: a quarter (64) is kept back.
        assert_eq!(capacity(Some(256), 20), 256 - 20 - 64);
        // Small limits keep at least MIN_RESERVE; nothing left is a budget of 0.
        assert_eq!(capacity(Some(64), 20), 64 - 20 - 32);
        assert_eq!(capacity(Some(40), 20), 0);
        // Large limits keep at most MAX_RESERVE.
        assert_eq!(capacity(Some(1 << 20), 100), (1 << 20) - 100 - 4096);
        assert_eq!(capacity(None, 100), Semaphore::MAX_PERMITS);
    }

    #[test]
    fn takes_are_refused_beyond_the_capacity_and_given_back_on_drop() {
        let budget = DescriptorBudget::with_capacity(5);
        let first = budget.try_take(2).expect("2 of 5");
        let second = budget.try_take(3).expect("3 more of 5");
        assert!(budget.try_take(1).is_none(), "the budget is spent");
        drop(first);
        assert!(budget.try_take(3).is_none(), "2 free, 3 asked");
        assert!(budget.try_take(2).is_some());
        drop(second);
    }

    #[test]
    fn refusals_are_logged_once_per_interval_with_the_count_between() {
        let budget = DescriptorBudget::with_capacity(0);
        assert_eq!(budget.refused(), Some(0));
        assert_eq!(budget.refused(), None);
        assert_eq!(budget.refused(), None);
        lock(&budget.refusals).0 = Some(Instant::now() - REFUSAL_LOG_INTERVAL);
        assert_eq!(budget.refused(), Some(2));
    }
}
