//! Statistics (CONTRACT.md §6): sharded counters and their serde snapshot.
//!
//! Monotone counters live in per-thread shards (`CachePadded`, one writer
//! each, on a lock-free list per file), so threads punching different huge
//! pages never share a counter's cache line and an update is a plain store. Pending subpages are one global counter: the budget
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
mod shards {
    use super::{new_shard, Delta, Shard, N};
    use crate::sync::{Arc, AtomicBool, AtomicPtr, AtomicU64, Ordering};
    use std::cell::{Cell, RefCell};
    use std::ptr;

    static NEXT_ID: AtomicU64 = AtomicU64::new(0);

    /// One shard of a file's list.
    struct Node {
        shard: Shard,
        /// A thread writes this shard (set by the claiming CAS, cleared
        /// when that thread's `MINE` is destroyed).
        owned: AtomicBool,
        /// The node pushed before this one; set before the node is
        /// published, never changed after.
        next: AtomicPtr<Node>,
    }

    /// This thread's shards: (file id, node). Its destructor clears `LAST`
    /// before it releases the shards, so the cache never points at a shard
    /// this thread no longer owns.
    struct Mine(Vec<(u64, Arc<Node>)>);

    impl Drop for Mine {
        fn drop(&mut self) {
            LAST.set(EMPTY);
            for (_, node) in &self.0 {
                // ORDERING: Release: this thread's last stores to the shard
                // happen-before the claim (Acquire) of the thread that
                // takes it over and goes on from those values.
                node.owned.store(false, Ordering::Release);
            }
        }
    }

    const EMPTY: (u64, *const Shard) = (u64::MAX, ptr::null());

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
        /// The newest node of the file's list (each holds one `Arc`
        /// reference, from `Arc::into_raw`, released in `Drop`).
        head: AtomicPtr<Node>,
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
                head: AtomicPtr::new(ptr::null_mut()),
                orphans: new_shard(),
            }
        }

        /// Every node of the list, newest first.
        fn nodes(&self) -> impl Iterator<Item = &Node> {
            // ORDERING: Acquire pairs with the pushing CAS's Release: a
            // node's fields are seen as they were when it was published.
            let mut at = self.head.load(Ordering::Acquire);
            std::iter::from_fn(move || {
                // SAFETY: every node reachable from `head` came from
                // `Arc::into_raw` and keeps that reference until `Drop`,
                // which needs `&mut self`; `next` never changes once
                // published.
                let node = unsafe { at.as_ref()? };
                // ORDERING: Relaxed: `next` was written before the node was
                // published, and the Acquire above (or of the node that led
                // here) orders this read after it.
                at = node.next.load(Ordering::Relaxed);
                Some(node)
            })
        }

        /// A shard for this thread: one a thread released, or a new one.
        fn register(&self) -> Arc<Node> {
            for node in self.nodes() {
                // ORDERING: Acquire on success pairs with the releasing
                // thread's Release store: we go on from its last counts.
                // Relaxed on failure: we only move on.
                if !node.owned.load(Ordering::Relaxed)
                    && node
                        .owned
                        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    // SAFETY: `node` is in the list, which holds one `Arc`
                    // reference to it until `Drop` (`&mut self`): adding
                    // one more is sound.
                    return unsafe {
                        Arc::increment_strong_count(node);
                        Arc::from_raw(node)
                    };
                }
            }
            let node = Arc::new(Node {
                shard: new_shard(),
                owned: AtomicBool::new(true),
                next: AtomicPtr::new(ptr::null_mut()),
            });
            let raw = Arc::into_raw(node.clone()).cast_mut();
            // ORDERING: Relaxed first read: the CAS below decides.
            let mut head = self.head.load(Ordering::Relaxed);
            loop {
                // ORDERING: Relaxed: published by the Release CAS below.
                node.next.store(head, Ordering::Relaxed);
                // ORDERING: Release publishes the node's fields to `nodes`'
                // Acquire; Relaxed on failure: we only retry.
                match self.head.compare_exchange_weak(
                    head,
                    raw,
                    Ordering::Release,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return node,
                    Err(now) => head = now,
                }
            }
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
                    if let Some((_, n)) = mine.iter().find(|(id, _)| *id == self.id) {
                        return Some(&n.shard as *const Shard);
                    }
                    // Forget shards of files that were dropped.
                    mine.retain(|(_, n)| Arc::strong_count(n) > 1);
                    let node = self.register();
                    let ptr = &node.shard as *const Shard;
                    mine.push((self.id, node));
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
            // shard's node: `MINE` drops it only in its destructor, which
            // clears `LAST` first, or when this file is gone, which it is
            // not (`self` is borrowed). Nothing below can run that
            // destructor or drop the file.
            let shard: &Shard = unsafe { &*ptr };
            while d.touched != 0 {
                let i = d.touched.trailing_zeros() as usize;
                d.touched &= d.touched - 1;
                // ORDERING: Relaxed load and store: this thread is the
                // shard's only writer (it holds `owned`), so nothing is
                // lost; readers need no synchronisation (exact at quiescent
                // points, after the writers were joined).
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
            let mut c = [0; N];
            for s in self.nodes().map(|n| &n.shard).chain([&self.orphans]) {
                for (t, v) in c.iter_mut().zip(s.iter()) {
                    // ORDERING: Relaxed: see `flush`.
                    *t += v.load(Ordering::Relaxed);
                }
            }
            c
        }
    }

    impl Drop for Shards {
        fn drop(&mut self) {
            // ORDERING: Relaxed: `&mut self`, no other thread.
            let mut at = self.head.load(Ordering::Relaxed);
            while !at.is_null() {
                // SAFETY: each node in the list holds one reference from
                // `Arc::into_raw`, released exactly once, here; threads
                // that still hold a clone in `MINE` keep the node alive.
                let node = unsafe { Arc::from_raw(at) };
                // ORDERING: Relaxed, as above.
                at = node.next.load(Ordering::Relaxed);
            }
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
