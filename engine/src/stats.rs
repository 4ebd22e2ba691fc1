//! Statistics (CONTRACT.md §6): sharded counters and their serde snapshot.
//!
//! Monotone counters live in per-thread shards (`CachePadded`, one writer
//! each), so threads punching different huge pages never share a counter's
//! cache line and an update is a plain store. Pending subpages are one global counter: the budget
//! needs its exact value after every punch, and `pending_bytes_peak` is the
//! largest value it had at the end of an operation.

use crate::sync::{AtomicI64, AtomicU64, Ordering};
use crate::unwind::Caught;
use crossbeam_utils::CachePadded;
use serde::{Deserialize, Serialize};

/// A snapshot of the statistics, with exactly the names of
/// `docs/CONTRACT.md` §6.
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
}

impl Default for Delta {
    fn default() -> Self {
        // `counts` is only read where `touched` says it was written.
        Delta {
            counts: [0; N],
            touched: 0,
            pending: 0,
            caught: Caught::default(),
        }
    }
}

impl Delta {
    pub fn add(&mut self, c: C, n: u64) {
        let i = c as usize;
        if self.touched & (1 << i) == 0 {
            self.touched |= 1 << i;
            self.counts[i] = 0;
        }
        self.counts[i] += n;
    }
}

pub(crate) struct Counters {
    shards: shards::Shards,
    pending: CachePadded<AtomicI64>,
    peak: CachePadded<AtomicU64>,
}

type Shard = CachePadded<[AtomicU64; N]>;

fn new_shard() -> Shard {
    CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

/// Per-thread shards: each thread that changes the statistics of a file
/// owns one shard of that file's counters and is its only writer, so an
/// update is a plain load and store (no locked instruction, no shared
/// cache line). A snapshot sums the shards; shards of threads that exited
/// are folded into a total when the next thread registers.
///
/// # Who owns a shard, and how long a pointer to it lives
///
/// A shard is an `Arc` held by the file's registry (`Shards::all`) and by
/// the thread's `MINE` list. The fast path reads `LAST`, a plain
/// `Cell` (no destructor: it can be read at any point of a thread's life,
/// thread-local destructors included) caching a raw pointer to the last
/// shard used. That pointer never outlives its owner:
///
/// * the registry drops a shard only once `MINE` has dropped its clone
///   (`strong_count == 1`), and `MINE` drops a clone only (a) when the
///   file is gone (its id then matches no live file, so `LAST` is never
///   dereferenced under it: ids are never reused), or (b) in `MINE`'s own
///   destructor, which **first clears `LAST`** (`Mine`'s `Drop`);
/// * after `MINE` is destroyed, `try_with` fails and an operation (run,
///   say, from another thread-local's destructor) adds its counts to the
///   file's `orphans` shard with atomic adds: nothing is lost.
#[cfg(not(hugepunch_loom))]
mod shards {
    use super::{new_shard, Delta, Shard, N};
    use crate::sync::{fence, Arc, AtomicU64, Mutex, MutexGuard, Ordering};
    use std::cell::{Cell, RefCell};

    static NEXT_ID: AtomicU64 = AtomicU64::new(0);

    /// This thread's shards: (file id, shard). Its destructor clears `LAST`
    /// before it drops the shards, so the cache never points at a shard
    /// this thread no longer owns.
    struct Mine(Vec<(u64, Arc<Shard>)>);

    impl Drop for Mine {
        fn drop(&mut self) {
            LAST.set(EMPTY);
        }
    }

    const EMPTY: (u64, *const Shard) = (u64::MAX, std::ptr::null());

    thread_local! {
        /// Owns this thread's shards.
        static MINE: RefCell<Mine> = const { RefCell::new(Mine(Vec::new())) };
        /// The last (file id, shard) used by this thread: the fast path,
        /// a `Cell` without destructor, so reading it costs no lazy
        /// initialisation check and works during thread exit. Points into
        /// `MINE` (see the module doc for why it never dangles).
        static LAST: Cell<(u64, *const Shard)> = const { Cell::new(EMPTY) };
    }

    pub(crate) struct Shards {
        id: u64,
        /// Live shards, and the totals of shards whose threads exited.
        all: Mutex<(Vec<Arc<Shard>>, [u64; N])>,
        /// Counts of operations that ran after their thread's `MINE` was
        /// destroyed (from another thread-local's destructor), added
        /// atomically: there is no per-thread shard left to own them.
        orphans: Shard,
    }

    impl Shards {
        pub fn new() -> Self {
            // ORDERING: Relaxed: a unique number is all we need.
            Shards {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                all: Mutex::new((Vec::new(), [0; N])),
                orphans: new_shard(),
            }
        }

        fn lock(&self) -> MutexGuard<'_, (Vec<Arc<Shard>>, [u64; N])> {
            self.all.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Register a shard for this thread (once per thread and file).
        fn register(&self) -> Arc<Shard> {
            let shard = Arc::new(new_shard());
            let mut all = self.lock();
            let (live, retired) = &mut *all;
            live.retain(|s| {
                if Arc::strong_count(s) > 1 {
                    return true;
                }
                // ORDERING: the exited thread dropped its clone with a
                // Release decrement; this fence makes its last stores to
                // the shard visible before we fold them.
                fence(Ordering::Acquire);
                for (t, v) in retired.iter_mut().zip(s.iter()) {
                    // ORDERING: Relaxed, ordered by the fence above.
                    *t += v.load(Ordering::Relaxed);
                }
                false
            });
            live.push(shard.clone());
            shard
        }

        /// This thread's shard of this file, or `None` once this thread's
        /// `MINE` is destroyed (or borrowed: never, no callback runs under
        /// the borrow).
        fn mine(&self) -> Option<*const Shard> {
            let (id, ptr) = LAST.get();
            if id == self.id {
                return Some(ptr);
            }
            let ptr = MINE
                .try_with(|mine| {
                    let mut mine = mine.try_borrow_mut().ok()?;
                    let mine = &mut mine.0;
                    if let Some((_, s)) = mine.iter().find(|(id, _)| *id == self.id) {
                        return Some(Arc::as_ptr(s));
                    }
                    // Forget shards of files that were dropped.
                    mine.retain(|(_, s)| Arc::strong_count(s) > 1);
                    let shard = self.register();
                    let ptr = Arc::as_ptr(&shard);
                    mine.push((self.id, shard));
                    Some(ptr)
                })
                .ok()??;
            LAST.set((self.id, ptr));
            Some(ptr)
        }

        pub fn flush(&self, d: &mut Delta) {
            let Some(ptr) = self.mine() else {
                return self.flush_orphan(d);
            };
            // SAFETY: `ptr` came from `LAST` under this file's id or from
            // `MINE` just now, so this thread's `MINE` holds an `Arc` of the
            // shard: `MINE` drops it only in its destructor, which clears
            // `LAST` first, or when this file is gone, which it is not
            // (`self` is borrowed). Nothing below can run that destructor
            // or drop the file.
            let shard: &Shard = unsafe { &*ptr };
            while d.touched != 0 {
                let i = d.touched.trailing_zeros() as usize;
                d.touched &= d.touched - 1;
                // ORDERING: Relaxed load and store: this thread is the
                // shard's only writer, so nothing is lost; readers need
                // no synchronisation (exact at quiescent points, after
                // the writers were joined).
                let v = shard[i].load(Ordering::Relaxed);
                shard[i].store(v + d.counts[i], Ordering::Relaxed);
            }
        }

        /// The counts of an operation whose thread has no shard any more.
        #[cold]
        fn flush_orphan(&self, d: &mut Delta) {
            while d.touched != 0 {
                let i = d.touched.trailing_zeros() as usize;
                d.touched &= d.touched - 1;
                // ORDERING: Relaxed: counters carry no synchronisation; the
                // RMW keeps concurrent orphans from losing updates.
                self.orphans[i].fetch_add(d.counts[i], Ordering::Relaxed);
            }
        }

        pub fn sum(&self) -> [u64; N] {
            let all = self.lock();
            let mut c = all.1;
            for s in all.0.iter().map(|s| &**s).chain([&self.orphans]) {
                for (t, v) in c.iter_mut().zip(s.iter()) {
                    // ORDERING: Relaxed: see `flush`.
                    *t += v.load(Ordering::Relaxed);
                }
            }
            c
        }
    }
}

/// Under loom: one shard, updated with `fetch_add` (thread-locals and the
/// registry add nothing the models need to explore).
#[cfg(hugepunch_loom)]
mod shards {
    use super::{new_shard, Delta, Shard, N};
    use crate::sync::Ordering;

    pub(crate) struct Shards(Shard);

    impl Shards {
        pub fn new() -> Self {
            Shards(new_shard())
        }

        pub fn flush(&self, d: &mut Delta) {
            while d.touched != 0 {
                let i = d.touched.trailing_zeros() as usize;
                d.touched &= d.touched - 1;
                // ORDERING: Relaxed: counters carry no synchronisation.
                self.0[i].fetch_add(d.counts[i], Ordering::Relaxed);
            }
        }

        pub fn sum(&self) -> [u64; N] {
            // ORDERING: Relaxed: counters carry no synchronisation.
            std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
        }
    }
}

impl Counters {
    pub fn new() -> Self {
        Counters {
            shards: shards::Shards::new(),
            pending: CachePadded::new(AtomicI64::new(0)),
            peak: CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// Apply the counters of `d` (not its pending change).
    pub fn flush_counts(&self, d: &mut Delta) {
        if d.touched != 0 {
            self.shards.flush(d);
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
        let c = self.shards.sum();
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
