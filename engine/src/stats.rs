//! Statistics (SPEC.md §6): sharded counters and their serde snapshot.
//!
//! Monotone counters live in per-thread shards (`CachePadded`, Relaxed
//! `fetch_add`), so threads punching different huge pages never share a
//! counter's cache line. Pending subpages are one global counter: the budget
//! needs its exact value after every punch, and `pending_bytes_peak` is the
//! largest value it had at the end of an operation.

use crate::sync::{AtomicI64, AtomicU64, Ordering};
use crossbeam_utils::CachePadded;
use serde::{Deserialize, Serialize};

/// A snapshot of the statistics, with exactly the names of SPEC.md §6.
///
/// Exact at quiescent points (no operation in flight); a snapshot taken
/// while operations run may be momentarily inconsistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Punches that passed validation.
    pub punch_calls: u64,
    /// Conversions that passed validation (`conversions_ok + conversions_rejected`).
    pub convert_calls: u64,
    /// Populates that passed validation.
    pub populate_calls: u64,
    /// Bits newly set by partial punches (a whole-huge-page punch sets none).
    pub punched_subpages: u64,
    /// Punched subpages not yet freed, now.
    pub pending_subpages: u64,
    /// The largest pending bytes seen at the end of an operation.
    pub pending_bytes_peak: u64,
    /// Completions (teardown excluded), and whole frees by `flush` or the
    /// shrinker of huge pages whose completion's free had failed.
    pub huge_frees: u64,
    /// Huge pages freed whole by teardown.
    pub teardown_frees: u64,
    /// Subpages freed one by one: punches of `Split` huge pages, forced splits, `Split` huge pages at teardown.
    pub small_freed_subpages: u64,
    /// Host free calls of any size (failed ones included).
    pub free_calls: u64,
    /// Invalidation begin/end pairs of any kind.
    pub invalidations: u64,
    /// Immediate invalidations of partial punches of possibly-private ranges.
    pub invalidations_immediate: u64,
    /// Conversions that went ahead.
    pub conversions_ok: u64,
    /// Conversions to private refused over a pending punch.
    pub conversions_rejected: u64,
    /// Punched subpages un-punched by populate or by `CancelAndZero`.
    pub repopulated_subpages: u64,
    /// Huge pages split by the shrinker or `flush`.
    pub forced_splits: u64,
    /// Host frees that failed.
    pub free_errors: u64,
    /// Calls refused with `InvalidRange`.
    pub errors_invalid_range: u64,
    /// Calls refused with `TornDown`.
    pub errors_torn_down: u64,
}

/// Counter indices into a shard.
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub(crate) enum C {
    PunchCalls,
    ConvertCalls,
    PopulateCalls,
    PunchedSubpages,
    HugeFrees,
    TeardownFrees,
    SmallFreedSubpages,
    FreeCalls,
    Invalidations,
    InvalidationsImmediate,
    ConversionsOk,
    ConversionsRejected,
    RepopulatedSubpages,
    ForcedSplits,
    FreeErrors,
    ErrorsInvalidRange,
    ErrorsTornDown,
}
const N: usize = C::ErrorsTornDown as usize + 1;

/// What one operation changed, flushed into the shared counters once.
#[derive(Default)]
pub(crate) struct Delta {
    counts: [u64; N],
    /// Change in pending subpages not yet applied to the global counter.
    pub pending: i64,
}

impl Delta {
    pub fn add(&mut self, c: C, n: u64) {
        self.counts[c as usize] += n;
    }
}

pub(crate) struct Counters {
    shards: Box<[CachePadded<[AtomicU64; N]>]>,
    pending: CachePadded<AtomicI64>,
    peak: CachePadded<AtomicU64>,
}

#[cfg(not(hugepunch_loom))]
fn shard_hint() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static HINT: Cell<usize> = const { Cell::new(usize::MAX) });
    HINT.with(|h| {
        if h.get() == usize::MAX {
            // ORDERING: Relaxed: a distinct number per thread is all we need.
            h.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        h.get()
    })
}

#[cfg(hugepunch_loom)]
fn shard_hint() -> usize {
    0
}

impl Counters {
    pub fn new() -> Self {
        #[cfg(not(hugepunch_loom))]
        let n = std::thread::available_parallelism().map_or(4, |n| n.get()).next_power_of_two() * 2;
        #[cfg(hugepunch_loom)]
        let n = 1;
        Counters {
            shards: (0..n).map(|_| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0)))).collect(),
            pending: CachePadded::new(AtomicI64::new(0)),
            peak: CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// Apply the counters of `d` (not its pending change).
    pub fn flush_counts(&self, d: &mut Delta) {
        let shard = &self.shards[shard_hint() & (self.shards.len() - 1)];
        for (i, n) in d.counts.iter_mut().enumerate() {
            if *n != 0 {
                // ORDERING: Relaxed: counters carry no synchronisation;
                // they are exact at quiescent points, where the threads
                // that made the changes have been joined.
                shard[i].fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
    }

    /// Apply `d.pending` to the global pending count; returns the new value.
    pub fn apply_pending(&self, d: &mut Delta) -> i64 {
        let p = std::mem::take(&mut d.pending);
        if p == 0 {
            // ORDERING: Relaxed: a statistic (the budget re-reads under its
            // own lock).
            return self.pending.load(Ordering::Relaxed);
        }
        // ORDERING: Relaxed: a counter; the RMW gives this operation the
        // exact value after its own change, which is all the budget needs.
        self.pending.fetch_add(p, Ordering::Relaxed) + p
    }

    /// Pending subpages now.
    pub fn pending(&self) -> i64 {
        // ORDERING: Relaxed: a statistic.
        self.pending.load(Ordering::Relaxed)
    }

    /// Record `pending` subpages as seen at the end of an operation.
    pub fn observe_peak(&self, pending_subpages: i64) {
        let bytes = pending_subpages.max(0) as u64 * crate::range::SUBPAGE_SIZE;
        // ORDERING: Relaxed: a statistic; the load avoids writing the shared
        // line when the peak does not move.
        if bytes > self.peak.load(Ordering::Relaxed) {
            // ORDERING: Relaxed: fetch_max is exact whatever the order.
            self.peak.fetch_max(bytes, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Stats {
        let mut c = [0u64; N];
        for shard in self.shards.iter() {
            for (i, v) in shard.iter().enumerate() {
                // ORDERING: Relaxed: see `flush_counts`.
                c[i] += v.load(Ordering::Relaxed);
            }
        }
        let g = |k: C| c[k as usize];
        Stats {
            punch_calls: g(C::PunchCalls),
            convert_calls: g(C::ConvertCalls),
            populate_calls: g(C::PopulateCalls),
            punched_subpages: g(C::PunchedSubpages),
            pending_subpages: self.pending().max(0) as u64,
            // ORDERING: Relaxed: a statistic.
            pending_bytes_peak: self.peak.load(Ordering::Relaxed),
            huge_frees: g(C::HugeFrees),
            teardown_frees: g(C::TeardownFrees),
            small_freed_subpages: g(C::SmallFreedSubpages),
            free_calls: g(C::FreeCalls),
            invalidations: g(C::Invalidations),
            invalidations_immediate: g(C::InvalidationsImmediate),
            conversions_ok: g(C::ConversionsOk),
            conversions_rejected: g(C::ConversionsRejected),
            repopulated_subpages: g(C::RepopulatedSubpages),
            forced_splits: g(C::ForcedSplits),
            free_errors: g(C::FreeErrors),
            errors_invalid_range: g(C::ErrorsInvalidRange),
            errors_torn_down: g(C::ErrorsTornDown),
        }
    }
}
