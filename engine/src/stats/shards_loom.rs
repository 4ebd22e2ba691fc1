//! Under loom: one shard, updated with `fetch_add` (thread-locals and the
//! registry add nothing the models need to explore).

use super::{new_shard, Delta, Shard, Sum};
use crate::sync::{AtomicI64, AtomicU64, Ordering};

pub(crate) struct Shards(Shard, AtomicI64, AtomicU64);

impl Shards {
    pub fn new() -> Self {
        Shards(new_shard(), AtomicI64::new(0), AtomicU64::new(0))
    }

    /// Under loom the pending count is always exact (one RMW).
    pub fn add_pending(&self, p: i64, _exact: bool) -> i64 {
        // ORDERING: Relaxed: a counter.
        self.1.fetch_add(p, Ordering::Relaxed) + p
    }

    pub fn global(&self) -> i64 {
        // ORDERING: Relaxed: a counter.
        self.1.load(Ordering::Relaxed)
    }

    pub fn observe_peak(&self, pending: i64) {
        let bytes = pending.max(0) as u64 * crate::range::SUBPAGE_SIZE;
        // ORDERING: Relaxed: a statistic.
        self.2.fetch_max(bytes, Ordering::Relaxed);
    }

    /// No fast path under loom: the general one (`None`).
    pub fn punch_one(&self, _newly: u64) -> Option<&Shard> {
        None
    }

    /// No fast path under loom: the general one (`None`).
    pub fn count2(&self, _a: usize, _b: usize) -> Option<()> {
        None
    }

    /// No fast path under loom: the general one (`None`).
    pub fn count1(&self, _a: usize) -> Option<()> {
        None
    }

    /// No fast path under loom: the general one (`None`).
    pub fn populate_one(&self, _k: u64) -> Option<()> {
        None
    }

    pub fn flush(&self, d: &mut Delta) {
        while d.touched != 0 {
            let i = d.touched.trailing_zeros() as usize;
            d.touched &= d.touched - 1;
            // ORDERING: Relaxed: counters carry no synchronisation.
            self.0[i].fetch_add(d.counts[i], Ordering::Relaxed);
        }
    }

    pub fn sum(&self) -> Sum {
        Sum {
            // ORDERING: Relaxed: counters carry no synchronisation.
            counts: std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed)),
            pending: self.global(),
            // ORDERING: Relaxed: a statistic.
            peak: self.2.load(Ordering::Relaxed),
        }
    }
}
