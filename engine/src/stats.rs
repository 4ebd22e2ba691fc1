//! Statistics (CONTRACT.md §6): sharded counters and their serde snapshot.
//!
//! Monotone counters live in per-thread shards (`CachePadded`, one writer
//! each, on a lock-free list per file), so threads punching different huge
//! pages never share a counter's cache line and an update is a plain store.
//!
//! Pending subpages: with a budget, one global counter, moved by one RMW
//! per operation that changes it (the budget needs its exact value after
//! every punch). Without one (issue 13), each thread batches its changes in
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
/// as its bits).
#[cfg(not(hugepunch_loom))]
const RESIDUE: usize = N;
/// Slot of a shard holding the largest pending subpages its threads saw.
#[cfg(not(hugepunch_loom))]
const PEAK: usize = N + 1;

type Shard = CachePadded<[AtomicU64; N + 2]>;

fn new_shard() -> Shard {
    CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

/// The global pending count, shared by the file and by the shards (a
/// thread's residue is flushed into it when the thread exits).
#[cfg(not(hugepunch_loom))]
type Global = CachePadded<crate::sync::AtomicI64>;

/// What the sum of the shards says.
pub(crate) struct Sum {
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
mod shards {
    use super::{new_shard, raise_peak, Delta, Global, Shard, Sum, BATCH, N, PEAK, RESIDUE};
    use crate::sync::{Arc, AtomicBool, AtomicI64, AtomicPtr, AtomicU64, Ordering};
    use crossbeam_utils::CachePadded;
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
        /// The file's global pending count, where the owner's residue goes
        /// when it releases the shard (an `Arc`: the thread may outlive the
        /// file).
        global: Arc<Global>,
    }

    /// This thread's shards: (file id, node). Its destructor clears `LAST`
    /// before it releases the shards, so the cache never points at a shard
    /// this thread no longer owns.
    struct Mine(Vec<(u64, Arc<Node>)>);

    impl Drop for Mine {
        fn drop(&mut self) {
            LAST.set(EMPTY);
            for (_, node) in &self.0 {
                // ORDERING: Relaxed: this thread is the shard's only writer.
                let residue = node.shard[RESIDUE].swap(0, Ordering::Relaxed) as i64;
                if residue != 0 {
                    // ORDERING: Relaxed: a counter; exact at quiescent
                    // points (the exiting thread is joined before).
                    node.global.fetch_add(residue, Ordering::Relaxed);
                }
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
        /// The global pending count.
        global: Arc<Global>,
        /// The largest pending bytes seen by operations that ran without a
        /// shard (orphans, see below).
        peak: AtomicU64,
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
                global: Arc::new(CachePadded::new(AtomicI64::new(0))),
                peak: AtomicU64::new(0),
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
                global: self.global.clone(),
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
        #[inline(always)]
        fn mine(&self) -> Option<*const Shard> {
            let (id, ptr) = LAST.get();
            if id == self.id {
                return Some(ptr);
            }
            self.mine_slow()
        }

        /// `mine` when `LAST` names another file (or none).
        #[cold]
        #[inline(never)]
        fn mine_slow(&self) -> Option<*const Shard> {
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

        /// This thread's shard, valid while `self` is borrowed and this
        /// thread runs no thread-local destructor of the engine's.
        #[inline(always)]
        fn shard(&self) -> Option<&Shard> {
            let ptr = self.mine()?;
            // SAFETY: `ptr` came from `LAST` under this file's id or from
            // `MINE` just now, so this thread's `MINE` holds an `Arc` of the
            // shard's node: `MINE` drops it only in its destructor, which
            // clears `LAST` first, or when this file is gone, which it is
            // not (`self` is borrowed). The reference is used only by the
            // current operation, which runs no thread-local destructor (it
            // calls host code only outside the shard's use: each use below
            // re-fetches it).
            Some(unsafe { &*ptr })
        }

        /// Apply `p` pending subpages; returns the pending count as this
        /// thread sees it (exact when `exact`: by RMW on the global count).
        #[inline]
        pub fn add_pending(&self, p: i64, exact: bool) -> i64 {
            if exact {
                // ORDERING: Relaxed: a counter; the RMW gives this
                // operation the exact value after its own change, which is
                // all the budget needs.
                return if p == 0 {
                    self.global.load(Ordering::Relaxed)
                } else {
                    self.global.fetch_add(p, Ordering::Relaxed) + p
                };
            }
            let Some(shard) = self.shard() else {
                // ORDERING: Relaxed: as above (no shard: straight to the
                // global count).
                return self.global.fetch_add(p, Ordering::Relaxed) + p;
            };
            // ORDERING: Relaxed load and store: this thread is the only
            // writer of its shard's residue.
            let mut residue = shard[RESIDUE].load(Ordering::Relaxed) as i64 + p;
            let global = if residue >= BATCH || residue <= -BATCH {
                // ORDERING: Relaxed: a counter (exact at quiescent points).
                let g = self.global.fetch_add(residue, Ordering::Relaxed) + residue;
                residue = 0;
                g
            } else {
                // ORDERING: Relaxed: a statistic (the peak's estimate).
                self.global.load(Ordering::Relaxed)
            };
            // ORDERING: Relaxed: see the load above.
            shard[RESIDUE].store(residue as u64, Ordering::Relaxed);
            global + residue
        }

        /// The exact pending count now (with a budget: no residues).
        pub fn global(&self) -> i64 {
            // ORDERING: Relaxed: a counter.
            self.global.load(Ordering::Relaxed)
        }

        /// Record `pending` as seen at the end of an operation.
        #[inline]
        pub fn observe_peak(&self, pending: i64) {
            match self.shard() {
                Some(shard) => raise_peak(&shard[PEAK], pending),
                None => {
                    let bytes = pending.max(0) as u64 * crate::range::SUBPAGE_SIZE;
                    // ORDERING: Relaxed: a statistic; fetch_max is exact.
                    self.peak.fetch_max(bytes, Ordering::Relaxed);
                }
            }
        }

        /// The fast path of a deferred 4 KiB punch (issue 13): its counts
        /// (`punch_calls`, `punched_subpages`), its pending change and the
        /// peak, with one look-up of this thread's shard and no RMW unless
        /// the residue fills. `None`: no shard (the caller takes the
        /// general path).
        #[inline(always)]
        pub fn punch_one(&self, newly: u64) -> Option<&Shard> {
            use super::C;
            let shard = self.shard()?;
            // ORDERING: Relaxed loads and stores: this thread is the
            // shard's only writer (see `flush`).
            let bump = |c: usize, n: u64| {
                let v = shard[c].load(Ordering::Relaxed);
                shard[c].store(v.wrapping_add(n), Ordering::Relaxed);
            };
            bump(C::PunchCalls as usize, 1);
            bump(C::PunchedSubpages as usize, newly);
            // ORDERING: Relaxed: as above.
            let mut residue = shard[RESIDUE].load(Ordering::Relaxed) as i64 + newly as i64;
            let global = if residue >= BATCH {
                // ORDERING: Relaxed: a counter (exact at quiescent points).
                let g = self.global.fetch_add(residue, Ordering::Relaxed) + residue;
                residue = 0;
                g
            } else {
                // ORDERING: Relaxed: a statistic (the peak's estimate).
                self.global.load(Ordering::Relaxed)
            };
            // ORDERING: Relaxed: as above.
            shard[RESIDUE].store(residue as u64, Ordering::Relaxed);
            raise_peak(&shard[PEAK], global + residue);
            Some(shard)
        }

        /// One each of two counters, with no pending change: the fast
        /// paths of `convert`. `None`: no shard (take the general path).
        #[inline(always)]
        pub fn count2(&self, a: usize, b: usize) -> Option<()> {
            let shard = self.shard()?;
            for c in [a, b] {
                // ORDERING: Relaxed load and store: this thread is the
                // shard's only writer (see `flush`).
                let v = shard[c].load(Ordering::Relaxed);
                shard[c].store(v + 1, Ordering::Relaxed);
            }
            // No peak to observe: an operation that moves no pending
            // subpage ends where the last one that did (which observed it)
            // ended.
            Some(())
        }

        /// One of counter `a`: an operation that moves nothing else (a
        /// populate with nothing to un-punch).
        #[inline(always)]
        pub fn count1(&self, a: usize) -> Option<()> {
            let shard = self.shard()?;
            // ORDERING: Relaxed load and store: this thread is the
            // shard's only writer (see `flush`).
            let v = shard[a].load(Ordering::Relaxed);
            shard[a].store(v + 1, Ordering::Relaxed);
            Some(())
        }

        /// The fast path of a 4 KiB populate that un-punched `k` (0 or 1)
        /// subpages: its counts and pending change (a decrease: the peak
        /// does not move), no RMW unless the residue fills.
        #[inline(always)]
        pub fn populate_one(&self, k: u64) -> Option<()> {
            use super::C;
            let shard = self.shard()?;
            // ORDERING: Relaxed loads and stores: this thread is the
            // shard's only writer (see `flush`).
            let bump = |c: usize, n: u64| {
                let v = shard[c].load(Ordering::Relaxed);
                shard[c].store(v.wrapping_add(n), Ordering::Relaxed);
            };
            bump(C::PopulateCalls as usize, 1);
            if k != 0 {
                bump(C::RepopulatedSubpages as usize, k);
                // ORDERING: Relaxed: as above.
                let mut residue = shard[RESIDUE].load(Ordering::Relaxed) as i64 - k as i64;
                if residue <= -BATCH {
                    // ORDERING: Relaxed: a counter (exact at quiescent
                    // points).
                    self.global.fetch_add(residue, Ordering::Relaxed);
                    residue = 0;
                }
                // ORDERING: Relaxed: as above.
                shard[RESIDUE].store(residue as u64, Ordering::Relaxed);
            }
            Some(())
        }

        pub fn flush(&self, d: &mut Delta) {
            let Some(shard) = self.shard() else {
                return self.flush_orphan(d);
            };
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

        pub fn sum(&self) -> Sum {
            let mut counts = [0; N];
            // ORDERING: Relaxed: statistics (exact at quiescent points).
            let mut pending = self.global.load(Ordering::Relaxed);
            // ORDERING: Relaxed: as above.
            let mut peak = self.peak.load(Ordering::Relaxed);
            for s in self.nodes().map(|n| &n.shard).chain([&self.orphans]) {
                for (t, v) in counts.iter_mut().zip(s.iter()) {
                    // ORDERING: Relaxed: see `flush`.
                    *t += v.load(Ordering::Relaxed);
                }
                // ORDERING: Relaxed: as above.
                pending += s[RESIDUE].load(Ordering::Relaxed) as i64;
                // ORDERING: Relaxed: as above.
                let subpages = (s[PEAK].load(Ordering::Relaxed) as i64).max(0) as u64;
                peak = peak.max(subpages * crate::range::SUBPAGE_SIZE);
            }
            Sum {
                counts,
                pending,
                peak,
            }
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
}

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
        let c = sum.counts;
        let g = |k: C| c[k as usize];
        Stats {
            punch_calls: g(C::PunchCalls),
            convert_calls: g(C::ConvertCalls),
            populate_calls: g(C::PopulateCalls),
            punched_subpages: g(C::PunchedSubpages),
            pending_subpages: sum.pending.max(0) as u64,
            pending_bytes_peak: sum.peak,
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
