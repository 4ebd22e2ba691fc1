//! The per-thread shards of a file's statistics and their lock-free list
//! (the build outside loom; see the module `stats`).

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
            match self
                .head
                .compare_exchange_weak(head, raw, Ordering::Release, Ordering::Relaxed)
            {
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

    /// The fast path of a deferred 4 KiB punch: its counts
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
            for (i, (t, v)) in counts.iter_mut().zip(s.iter()).enumerate() {
                // The residue and peak slots are no counters: read below.
                if i != RESIDUE && i != PEAK {
                    // ORDERING: Relaxed: see `flush`.
                    *t += v.load(Ordering::Relaxed);
                }
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
