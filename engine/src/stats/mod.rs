//! Statistics (CONTRACT.md §6): sharded counters and their serde snapshot.
//!
//! Monotone counters live in per-thread shards (`CachePadded`, one writer
//! each, on a lock-free list per file), so threads punching different huge
//! pages never share a counter's cache line and an update is a plain store.
//!
//! Pending subpages: with a budget, one global counter, moved by one RMW
//! per operation that changes it (the budget needs its exact value after
//! every punch). Without one, each thread batches its changes in
//! a *residue* in its own shard and moves the global counter only when the
//! residue reaches ±[`BATCH`] subpages (and when the thread exits), so
//! threads on different huge pages share no written cache line.
//! `pending_subpages` (the global count plus every residue) stays exact at
//! quiescent points. `pending_bytes_peak` is the largest of the values each
//! thread saw at the end of its operations, the global count plus its own
//! residue: exact when one thread at a time works on the file (the threads
//! before it have exited, flushing their residues), and otherwise off by
//! less than `BATCH` subpages (256 KiB) per other thread with a residue,
//! either way (see `docs/CONTRACT.md` §6).

use crate::sync::{AtomicU64, Ordering};
use crate::unwind::Caught;
use crossbeam_utils::CachePadded;

mod list;

pub use list::Stats;
pub(crate) use list::C;
use list::N;

/// What one operation changed, flushed into the shared counters once, and
/// the first host panic it caught (resumed once the counters are applied).
pub(crate) struct Delta {
    counts: [u64; N],
    /// Which counters are non-zero (bit i: `counts[i]`).
    touched: u32,
    /// Change in pending subpages not yet applied to the global counter.
    pub pending: i64,
    /// The operation's host calls go through this (see [`crate::unwind`]).
    pub caught: Caught,
    /// An exit of this operation found the shrinker had skipped its huge
    /// page (`WANTED`): run the shrinker at the end if pending bytes are over the budget.
    pub shrink_wanted: bool,
}

impl Default for Delta {
    fn default() -> Self {
        // `counts` is only read where `touched` says it was written.
        Delta {
            counts: [0; N],
            touched: 0,
            pending: 0,
            caught: Caught::default(),
            shrink_wanted: false,
        }
    }
}

impl Delta {
    pub fn add(&mut self, c: C, n: u64) {
        // Those two slots are the shards' residue and peak, not counters.
        debug_assert!(!matches!(c, C::PendingSubpages | C::PendingBytesPeak));
        let i = c as usize;
        if self.touched & (1 << i) == 0 {
            self.touched |= 1 << i;
            self.counts[i] = 0;
        }
        self.counts[i] += n;
    }
}

/// This thread's shard of one file, for the counts of the operation
/// running (see `Counters::punch_one`).
pub(crate) struct MyShard<'a>(&'a Shard);

impl MyShard<'_> {
    /// One immediate invalidation (`invalidations` and
    /// `invalidations_immediate`).
    #[inline(always)]
    pub fn count_immediate_invalidation(&self) {
        for c in [C::Invalidations, C::InvalidationsImmediate] {
            // ORDERING: Relaxed load and store: this thread is the shard's
            // only writer.
            let v = self.0[c as usize].load(Ordering::Relaxed);
            self.0[c as usize].store(v + 1, Ordering::Relaxed);
        }
    }
}

pub(crate) struct Counters {
    shards: shards::Shards,
    /// Pending changes go to the global count by RMW at once (a budget is
    /// set), or through each thread's residue (none is).
    exact: bool,
}

/// Residues of this many subpages (either way) move the global count.
#[cfg(not(hugepunch_loom))]
pub(crate) const BATCH: i64 = 64;
/// Slot of a shard holding its thread's pending residue (an `i64` stored
/// as its bits): the slot of `pending_subpages`, which no operation counts.
#[cfg(not(hugepunch_loom))]
const RESIDUE: usize = C::PendingSubpages as usize;
/// Slot of a shard holding the largest pending subpages its threads saw:
/// the slot of `pending_bytes_peak`, which no operation counts.
#[cfg(not(hugepunch_loom))]
const PEAK: usize = C::PendingBytesPeak as usize;

/// One slot per statistic (under loom the residue and peak slots stay
/// unused: the pending count and the peak are the loom `Shards`' own).
type Shard = CachePadded<[AtomicU64; N]>;

fn new_shard() -> Shard {
    CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

/// The global pending count, shared by the file and by the shards (a
/// thread's residue is flushed into it when the thread exits).
#[cfg(not(hugepunch_loom))]
type Global = CachePadded<crate::sync::AtomicI64>;

/// What the sum of the shards says.
pub(crate) struct Sum {
    /// The counters, summed; 0 in the residue and peak slots.
    counts: [u64; N],
    pending: i64,
    peak: u64,
}

/// Record `bytes` in a shard's peak slot if larger (its owner only writes it).
#[inline]
#[cfg(not(hugepunch_loom))]
fn raise_peak(slot: &AtomicU64, pending: i64) {
    // In subpages, as an `i64` (a transiently negative estimate never
    // raises it): no conversion on the hot path.
    // ORDERING: Relaxed load and store: one writer per shard (see
    // `Shards::flush`); a statistic.
    if pending > slot.load(Ordering::Relaxed) as i64 {
        slot.store(pending as u64, Ordering::Relaxed);
    }
}

/// Per-thread shards: each thread that changes the statistics of a file
/// owns one shard of that file's counters and is its only writer, so an
/// update is a plain load and store (no locked instruction, no shared
/// cache line). A snapshot sums the shards. No lock anywhere: the shards of
/// a file form a lock-free, append-only list, and a shard whose thread
/// exited is *released* and taken over by the next thread that needs one
/// (its counts stay in it), so the list is as long as the largest number of
/// threads that used the file at once.
///
/// # Who owns a shard, and how long a pointer to it lives
///
/// A shard is a list node, an `Arc` held by the file's list and by the
/// thread's `MINE` list. The fast path reads `LAST`, a plain `Cell` (no
/// destructor: it can be read at any point of a thread's life,
/// thread-local destructors included) caching a raw pointer to the last
/// shard used. That pointer never outlives its owner:
///
/// * the list drops its `Arc`s only when the file is dropped, and `MINE`
///   drops a clone only (a) when the file is gone (its id then matches no
///   live file, so `LAST` is never dereferenced under it: ids are never
///   reused), or (b) in `MINE`'s own destructor, which **first clears
///   `LAST`** (`Mine`'s `Drop`), then releases each shard it owned;
/// * after `MINE` is destroyed, `try_with` fails and an operation (run,
///   say, from another thread-local's destructor) adds its counts to the
///   file's `orphans` shard with atomic adds: nothing is lost.
#[cfg(not(hugepunch_loom))]
mod shards;

/// Under loom: one shard, updated with `fetch_add` (thread-locals and the
/// registry add nothing the models need to explore).
#[cfg(hugepunch_loom)]
#[path = "shards_loom.rs"]
mod shards;

impl Counters {
    /// `exact`: a budget is set, so pending changes go to the global count
    /// at once.
    pub fn new(exact: bool) -> Self {
        Counters {
            shards: shards::Shards::new(),
            exact,
        }
    }

    /// Apply the counters of `d` (not its pending change).
    pub fn flush_counts(&self, d: &mut Delta) {
        if d.touched != 0 {
            self.shards.flush(d);
        }
    }

    /// Apply `d.pending`; returns the pending count as this thread sees it
    /// (exact with a budget; see the module doc otherwise).
    pub fn apply_pending(&self, d: &mut Delta) -> i64 {
        let p = std::mem::take(&mut d.pending);
        self.shards.add_pending(p, self.exact)
    }

    /// Pending subpages now, exact with a budget (the shrinker's measure).
    pub fn pending(&self) -> i64 {
        self.shards.global()
    }

    /// Record `pending` subpages as seen at the end of an operation.
    pub fn observe_peak(&self, pending_subpages: i64) {
        self.shards.observe_peak(pending_subpages);
    }

    /// One each of counters `a` and `b`, for an operation that moves no
    /// pending subpage (a conversion's fast path); `None`: take the general
    /// path.
    #[inline]
    pub fn count2(&self, a: C, b: C) -> Option<()> {
        self.shards.count2(a as usize, b as usize)
    }

    /// One of counter `a`, for an operation that moves nothing else;
    /// `None`: take the general path.
    #[inline]
    pub fn count1(&self, a: C) -> Option<()> {
        self.shards.count1(a as usize)
    }

    /// The statistics of a 4 KiB populate that un-punched `k` subpages,
    /// without a budget; `None`: take the general path.
    #[inline]
    pub fn populate_one(&self, k: u64) -> Option<()> {
        if self.exact {
            return None;
        }
        self.shards.populate_one(k)
    }

    /// The statistics of a punch that went the lean way (`newly` bits set,
    /// `inval` immediate invalidations), without a budget; `None`: take
    /// the general path.
    #[inline]
    pub fn punch_lean(&self, newly: u64, inval: u64) -> Option<()> {
        let shard = self.punch_one(newly)?;
        for _ in 0..inval {
            shard.count_immediate_invalidation();
        }
        Some(())
    }

    /// The statistics of a deferred 4 KiB punch without a budget, in one
    /// go (see `Shards::punch_one`); `None`: take the general path.
    ///
    /// The returned handle is this thread's shard, which stays this
    /// thread's while `self` is borrowed (host callbacks included: they run
    /// on this thread, which runs no thread-local destructor meanwhile):
    /// the punch counts its immediate invalidation through it.
    #[inline]
    pub fn punch_one(&self, newly: u64) -> Option<MyShard<'_>> {
        if self.exact {
            return None;
        }
        self.shards.punch_one(newly).map(MyShard)
    }

    pub fn snapshot(&self) -> Stats {
        let sum = self.shards.sum();
        let mut slots = sum.counts;
        slots[C::PendingSubpages as usize] = sum.pending.max(0) as u64;
        slots[C::PendingBytesPeak as usize] = sum.peak;
        Stats::from_slots(&slots)
    }
}
