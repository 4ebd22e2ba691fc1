//! The implementations the benchmarks compare, the adversarial patterns they
//! replay (hugepunch-workload's, the same as `hugepunch gen` and `hugepunch
//! real` run for the same size and seed), and the side-by-side runner
//! shared by criterion and the report.
//!
//! Every implementation does the same work: it tracks punched 4 KiB
//! subpages per 2 MiB huge page of a populated, shared file and "frees" a
//! huge page (counts a completion) when its last subpage is punched;
//! `populate` un-punches; a conversion to private is refused over a
//! pending punch. The engine and the three map baselines must report the
//! same completions for the same pattern (the criterion groups and the
//! report check it before timing, and a test here does); the
//! single-partial tracker frees less by design.

#![forbid(unsafe_code)]

use bitvec::prelude::*;
use dashmap::DashMap;
use hugepunch::{Attribute, ByteRange, Config, Error, Geometry, Hint, Host, HostError, HugePunch};
use hugepunch_workload::{apply, Op, Pattern, Target, DEFAULT_SEED};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Subpage size.
pub const SUB: u64 = 4096;

/// The seed of the patterns the benches replay.
pub const SEED: u64 = DEFAULT_SEED;

/// What the benchmarks compare: a [`Target`] for the patterns'
/// operations ([`apply`]) that counts the huge pages it frees whole.
pub trait Tracker: Target<Error = Error> + Sync {
    /// Huge pages freed whole so far.
    fn completions(&self) -> u64;
}

// ---- the engine -----------------------------------------------------------

/// A host that does nothing (all memory shared, frees succeed): the cost
/// measured is the engine's own.
pub use hugepunch::NullHost;

/// A host whose memory is all private (every partial punch invalidates
/// now, the immediate-invalidation path); otherwise the [`NullHost`].
pub struct PrivateHost;

impl Host for PrivateHost {
    fn is_shared(&self, _: ByteRange) -> bool {
        false
    }
    fn set_attributes(&self, _: ByteRange, _: Attribute) {}
    fn invalidate_begin(&self, _: ByteRange, _: Hint) {}
    fn invalidate_end(&self, _: ByteRange) {}
    fn allocate(&self, _: ByteRange, _: u8) -> Result<(), HostError> {
        Ok(())
    }
    fn free(&self, _: ByteRange, _: u8) -> Result<(), HostError> {
        Ok(())
    }
    fn zero(&self, _: ByteRange) {}
}

/// hugepunch itself.
pub struct Engine(pub HugePunch);

impl Engine {
    /// A populated file of `huge_pages` 2 MiB huge pages, all shared.
    pub fn new(huge_pages: u64) -> Self {
        Self::with_host(huge_pages, Arc::new(NullHost))
    }

    /// The same over `host`.
    pub fn with_host(huge_pages: u64, host: Arc<dyn Host>) -> Self {
        Engine(HugePunch::new(Config::new(huge_pages << 21), host).expect("valid config"))
    }
}

impl Target for Engine {
    type Error = Error;
    fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.0.punch(offset, len)
    }
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        self.0.convert(offset, len, to)
    }
    fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.0.populate(offset, len)
    }
    fn flush(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.0.flush(offset, len)
    }
    fn teardown(&self) -> Result<(), Error> {
        self.0.teardown();
        Ok(())
    }
}

impl Tracker for Engine {
    fn completions(&self) -> u64 {
        self.0.stats().huge_frees
    }
}

// ---- the map baselines ------------------------------------------------------

/// The parts of a range per 2 MiB huge page: (huge page, first, count),
/// split by the engine's [`Geometry::parts`]. The baselines know no file
/// size, so the split is that of the largest file the engine accepts (the
/// patterns' ranges are valid ones).
fn parts(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let geo = Geometry::new(hugepunch::MAX_SIZE, 9).expect("4 PiB of 2 MiB huge pages");
    geo.parts(ByteRange::new(offset, len))
        .map(|p| (p.huge_page, p.first as usize, p.count as usize))
}

fn punch_bits(bits: &mut BitVec, first: usize, count: usize) -> bool {
    bits[first..first + count].fill(true);
    bits.all()
}

/// A conversion to private of `offset .. offset + len` is refused over the
/// first pending subpage: `first_pending(h, first, count)` says which of
/// the part's subpages is pending first, if any.
fn refuse_pending(
    offset: u64,
    len: u64,
    first_pending: impl Fn(u64, usize, usize) -> Option<usize>,
) -> Result<(), Error> {
    for (h, first, count) in parts(offset, len) {
        if let Some(i) = first_pending(h, first, count) {
            return Err(Error::PendingPunch {
                offset: (h * 512 + (first + i) as u64) * SUB,
            });
        }
    }
    Ok(())
}

/// The obvious implementation: one mutex around a map of bit vectors.
#[derive(Default)]
pub struct MutexMap {
    map: Mutex<HashMap<u64, BitVec>>,
    completions: AtomicU64,
}

impl Target for MutexMap {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut map = self.map.lock().unwrap();
        for (h, first, count) in parts(o, l) {
            let bits = map.entry(h).or_insert_with(|| bitvec![0; 512]);
            if punch_bits(bits, first, count) {
                map.remove(&h);
                self.completions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut map = self.map.lock().unwrap();
        for (h, first, count) in parts(o, l) {
            if let Some(bits) = map.get_mut(&h) {
                bits[first..first + count].fill(false);
            }
        }
        Ok(())
    }
    fn convert(&self, o: u64, l: u64, to: Attribute) -> Result<(), Error> {
        if to == Attribute::Shared {
            return Ok(());
        }
        let map = self.map.lock().unwrap();
        refuse_pending(o, l, |h, f, c| map.get(&h)?[f..f + c].first_one())
    }
    /// Forgets the range's pending punches (freed in pieces: no completion).
    fn flush(&self, o: u64, l: u64) -> Result<(), Error> {
        self.populate(o, l)
    }
    fn teardown(&self) -> Result<(), Error> {
        self.map.lock().unwrap().clear();
        Ok(())
    }
}

impl Tracker for MutexMap {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

/// The same map behind an `RwLock`: conversion checks share the lock.
#[derive(Default)]
pub struct RwLockMap {
    map: RwLock<HashMap<u64, BitVec>>,
    completions: AtomicU64,
}

impl Target for RwLockMap {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut map = self.map.write().unwrap();
        for (h, first, count) in parts(o, l) {
            let bits = map.entry(h).or_insert_with(|| bitvec![0; 512]);
            if punch_bits(bits, first, count) {
                map.remove(&h);
                self.completions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut map = self.map.write().unwrap();
        for (h, first, count) in parts(o, l) {
            if let Some(bits) = map.get_mut(&h) {
                bits[first..first + count].fill(false);
            }
        }
        Ok(())
    }
    fn convert(&self, o: u64, l: u64, to: Attribute) -> Result<(), Error> {
        if to == Attribute::Shared {
            return Ok(());
        }
        let map = self.map.read().unwrap();
        refuse_pending(o, l, |h, f, c| map.get(&h)?[f..f + c].first_one())
    }
    /// Forgets the range's pending punches (freed in pieces: no completion).
    fn flush(&self, o: u64, l: u64) -> Result<(), Error> {
        self.populate(o, l)
    }
    fn teardown(&self) -> Result<(), Error> {
        self.map.write().unwrap().clear();
        Ok(())
    }
}

impl Tracker for RwLockMap {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

/// The sharded-map implementation: a `DashMap` of bit vectors.
#[derive(Default)]
pub struct DashMapTracker {
    map: DashMap<u64, BitVec>,
    completions: AtomicU64,
}

impl Target for DashMapTracker {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, first, count) in parts(o, l) {
            let full = punch_bits(
                &mut self.map.entry(h).or_insert_with(|| bitvec![0; 512]),
                first,
                count,
            );
            if full && self.map.remove_if(&h, |_, b| b.all()).is_some() {
                self.completions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, first, count) in parts(o, l) {
            if let Some(mut bits) = self.map.get_mut(&h) {
                bits[first..first + count].fill(false);
            }
        }
        Ok(())
    }
    fn convert(&self, o: u64, l: u64, to: Attribute) -> Result<(), Error> {
        if to == Attribute::Shared {
            return Ok(());
        }
        refuse_pending(o, l, |h, f, c| self.map.get(&h)?[f..f + c].first_one())
    }
    /// Forgets the range's pending punches (freed in pieces: no completion).
    fn flush(&self, o: u64, l: u64) -> Result<(), Error> {
        self.populate(o, l)
    }
    fn teardown(&self) -> Result<(), Error> {
        self.map.clear();
        Ok(())
    }
}

impl Tracker for DashMapTracker {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

/// QEMU's and Cloud Hypervisor's balloon: one partially punched huge page
/// is tracked; touching another drops it, and what it tracked is never
/// freed.
#[derive(Default)]
pub struct SinglePartial {
    tracked: Mutex<Option<(u64, BitVec)>>,
    completions: AtomicU64,
}

impl Target for SinglePartial {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut tracked = self.tracked.lock().unwrap();
        for (h, first, count) in parts(o, l) {
            if tracked.as_ref().is_none_or(|(t, _)| *t != h) {
                *tracked = Some((h, bitvec![0; 512]));
            }
            let (_, bits) = tracked.as_mut().expect("just set");
            if punch_bits(bits, first, count) {
                *tracked = None;
                self.completions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut tracked = self.tracked.lock().unwrap();
        // A re-used subpage of the tracked huge page is no longer
        // discarded.
        for (h, first, count) in parts(o, l) {
            if let Some((t, bits)) = tracked.as_mut() {
                if *t == h {
                    bits[first..first + count].fill(false);
                }
            }
        }
        Ok(())
    }
    /// The balloon does not look at conversions.
    fn convert(&self, _: u64, _: u64, _: Attribute) -> Result<(), Error> {
        Ok(())
    }
    fn flush(&self, _: u64, _: u64) -> Result<(), Error> {
        Ok(())
    }
    fn teardown(&self) -> Result<(), Error> {
        *self.tracked.lock().unwrap() = None;
        Ok(())
    }
}

impl Tracker for SinglePartial {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

// ---- the atomic peers --------------------------------------------

/// vm-memory's `AtomicBitmap` shape: one bit per 4 KiB page, set with one
/// `fetch_or(SeqCst)` per page, which cannot say that a huge page became
/// full; the full check it then needs (every word of the huge page loaded)
/// runs after each punch, and a per-huge-page flag claims the completion.
/// No registration, no generation: a populate racing a completion can lose
/// its un-punch (the price of the shortcut the engine does not take).
pub struct AtomicBitmapPeer {
    words: Vec<AtomicU64>,
    claimed: Vec<std::sync::atomic::AtomicBool>,
    completions: AtomicU64,
}

impl AtomicBitmapPeer {
    /// A file of `huge_pages` 2 MiB huge pages.
    pub fn new(huge_pages: u64) -> Self {
        AtomicBitmapPeer {
            words: (0..huge_pages * 8).map(|_| AtomicU64::new(0)).collect(),
            claimed: (0..huge_pages)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            completions: AtomicU64::new(0),
        }
    }
}

impl Target for AtomicBitmapPeer {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, first, count) in parts(o, l) {
            for sub in first..first + count {
                let w = &self.words[h as usize * 8 + sub / 64];
                // ORDERING: SeqCst, as vm-memory's bitmap (its choice, no
                // reason given): the peer as it is.
                w.fetch_or(1 << (sub % 64), Ordering::SeqCst);
            }
            let page = &self.words[h as usize * 8..h as usize * 8 + 8];
            // ORDERING: SeqCst, as above: the full check.
            if page.iter().all(|w| w.load(Ordering::SeqCst) == u64::MAX)
                && !self.claimed[h as usize].swap(true, Ordering::SeqCst)
            {
                self.completions.fetch_add(1, Ordering::Relaxed);
                for w in page {
                    // ORDERING: SeqCst, as above.
                    w.store(0, Ordering::SeqCst);
                }
                // ORDERING: SeqCst, as above.
                self.claimed[h as usize].store(false, Ordering::SeqCst);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, first, count) in parts(o, l) {
            for sub in first..first + count {
                // ORDERING: SeqCst, as above.
                self.words[h as usize * 8 + sub / 64]
                    .fetch_and(!(1 << (sub % 64)), Ordering::SeqCst);
            }
        }
        Ok(())
    }
    fn convert(&self, o: u64, l: u64, to: Attribute) -> Result<(), Error> {
        if to == Attribute::Shared {
            return Ok(());
        }
        refuse_pending(o, l, |h, f, c| {
            (f..f + c).position(|sub| {
                // ORDERING: SeqCst, as above.
                self.words[h as usize * 8 + sub / 64].load(Ordering::SeqCst) >> (sub % 64) & 1 == 1
            })
        })
    }
    /// Forgets the range's pending punches (freed in pieces: no completion).
    fn flush(&self, o: u64, l: u64) -> Result<(), Error> {
        self.populate(o, l)
    }
    fn teardown(&self) -> Result<(), Error> {
        Ok(())
    }
}

impl Tracker for AtomicBitmapPeer {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

/// The out-of-tree HugeTLB guest_memfd's "pages waiting to be merged": one
/// counter per huge page, one `fetch_add` per punched subpage, no bitmap.
/// A second punch of the same subpage is counted twice and frees the huge
/// page early (the floor: the price of the bitmap's safety); a populate
/// cannot tell which subpages were punched, and a conversion cannot see a
/// pending punch.
pub struct CounterOnly {
    counts: Vec<AtomicU64>,
    completions: AtomicU64,
}

impl CounterOnly {
    /// A file of `huge_pages` 2 MiB huge pages.
    pub fn new(huge_pages: u64) -> Self {
        CounterOnly {
            counts: (0..huge_pages).map(|_| AtomicU64::new(0)).collect(),
            completions: AtomicU64::new(0),
        }
    }
}

impl Target for CounterOnly {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, _, count) in parts(o, l) {
            for _ in 0..count {
                // ORDERING: Relaxed: a count, as the peer keeps it.
                if self.counts[h as usize].fetch_add(1, Ordering::Relaxed) + 1 == 512 {
                    // ORDERING: Relaxed, as above.
                    self.counts[h as usize].store(0, Ordering::Relaxed);
                    self.completions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
    /// Knows nothing of which subpages were punched.
    fn populate(&self, _: u64, _: u64) -> Result<(), Error> {
        Ok(())
    }
    /// Cannot see a pending punch.
    fn convert(&self, _: u64, _: u64, _: Attribute) -> Result<(), Error> {
        Ok(())
    }
    fn flush(&self, _: u64, _: u64) -> Result<(), Error> {
        Ok(())
    }
    fn teardown(&self) -> Result<(), Error> {
        Ok(())
    }
}

impl Tracker for CounterOnly {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

// ---- patterns -------------------------------------------------------------

/// The adversarial patterns, every one of hugepunch-workload's.
pub const PATTERNS: [Pattern; 8] = Pattern::ALL;

/// The operations of `pattern` with `seed` over `huge_pages` 2 MiB huge
/// pages starting at huge page `base` (of a file that ends with them).
pub fn pattern(pattern: Pattern, base: u64, huge_pages: u64, seed: u64) -> Vec<Op> {
    let geo = Geometry::new((base + huge_pages) << 21, 9).expect("whole 2 MiB huge pages");
    pattern.ops(geo, base << 21, huge_pages << 21, seed)
}

/// How threads share the huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Each thread has its own huge pages (far apart).
    Disjoint,
    /// All threads punch the same huge pages, interleaved subpage by subpage.
    Same,
}

/// The per-thread operation lists for `threads` threads, pattern seed
/// `seed`. With one thread, the list is the pattern over a file of
/// `huge_pages` huge pages: what `hugepunch gen` writes and `hugepunch
/// real` runs for that size and seed.
pub fn workload(
    p: Pattern,
    huge_pages: u64,
    threads: usize,
    sharing: Sharing,
    seed: u64,
) -> Vec<Vec<Op>> {
    match sharing {
        // Thread t: its own huge pages, its own seed.
        Sharing::Disjoint => (0..threads as u64)
            .map(|t| pattern(p, t * huge_pages, huge_pages, seed.wrapping_add(t)))
            .collect(),
        Sharing::Same => {
            // Thread t takes the operations whose first subpage is t modulo
            // `threads`: the same huge pages, and each subpage's operations
            // stay in order in one thread, so completions do not depend on
            // how the threads interleave.
            let all = pattern(p, 0, huge_pages, seed);
            let first = |op: &Op| op.range().map_or(0, |r| r.first_subpage());
            (0..threads)
                .map(|t| {
                    all.iter()
                        .copied()
                        .filter(|op| first(op) % threads as u64 == t as u64)
                        .collect()
                })
                .collect()
        }
    }
}

/// Every subpage of `huge_pages` 2 MiB huge pages as batches of `per`
/// scattered 4 KiB ranges, each batch inside one huge page (a
/// virtio-balloon request of `per` page frames), the subpages of each huge
/// page in a seeded random order.
pub fn balloon_batches(huge_pages: u64, per: usize, seed: u64) -> Vec<Vec<ByteRange>> {
    let mut x = seed | 1;
    let mut next = move || {
        // xorshift64: a fixed, seeded order.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::new();
    for h in 0..huge_pages {
        let mut subs: Vec<u64> = (0..512).collect();
        for i in (1..subs.len()).rev() {
            subs.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        for chunk in subs.chunks(per) {
            out.push(
                chunk
                    .iter()
                    .map(|&s| ByteRange::new((h * 512 + s) * SUB, SUB))
                    .collect(),
            );
        }
    }
    out
}

/// Punch `batches` with `punch_many`, one call per batch (what the report
/// counts with callgrind for the batch call: not inlined, so that
/// `--toggle-collect` can name it).
#[inline(never)]
pub fn run_batches(engine: &Engine, batches: &[Vec<ByteRange>]) {
    for b in batches {
        engine.0.punch_many(b).expect("valid batch");
    }
}

/// Huge pages a workload's file needs.
pub fn file_huge_pages(huge_pages: u64, threads: usize, sharing: Sharing) -> u64 {
    match sharing {
        Sharing::Disjoint => huge_pages * threads as u64,
        Sharing::Same => huge_pages,
    }
}

/// Run a workload on `tracker` with one thread per list; returns the
/// wall time.
pub fn run(tracker: &dyn Tracker, work: &[Vec<Op>]) -> std::time::Duration {
    let start = std::time::Instant::now();
    if work.len() == 1 {
        for op in &work[0] {
            let _ = apply(tracker, op);
        }
    } else {
        let barrier = std::sync::Barrier::new(work.len());
        std::thread::scope(|s| {
            for ops in work {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for op in ops {
                        let _ = apply(tracker, op);
                    }
                });
            }
        });
    }
    start.elapsed()
}

/// A fresh implementation by name.
pub fn make(name: &str, huge_pages: u64) -> Box<dyn Tracker> {
    match name {
        "hugepunch" => Box::new(Engine::new(huge_pages)),
        "hugepunch-private" => Box::new(Engine::with_host(huge_pages, Arc::new(PrivateHost))),
        "mutex-map" => Box::new(MutexMap::default()),
        "rwlock-map" => Box::new(RwLockMap::default()),
        "dashmap" => Box::new(DashMapTracker::default()),
        "single-partial" => Box::new(SinglePartial::default()),
        "atomic-bitmap" => Box::new(AtomicBitmapPeer::new(huge_pages)),
        "counter-only" => Box::new(CounterOnly::new(huge_pages)),
        other => panic!("unknown implementation {other}"),
    }
}

/// Every implementation, the engine first.
pub const IMPLEMENTATIONS: &[&str] = &[
    "hugepunch",
    "mutex-map",
    "rwlock-map",
    "dashmap",
    "single-partial",
    "atomic-bitmap",
    "counter-only",
];

/// Implementations that must report the engine's completions.
pub fn same_contract(name: &str) -> bool {
    !matches!(name, "single-partial" | "atomic-bitmap" | "counter-only")
}

/// The floor of the engine's punch protocol: the three read-modify-writes
/// a deferred 4 KiB punch makes (entry CAS on the state word, `fetch_or` on
/// a bitmap word, exit CAS), on the same memory layout, with nothing else.
/// What the engine costs above this is its bookkeeping (validation, the
/// callbacks and the shared-state check, index lookup, statistics).
pub fn protocol_floor(punches: u64) -> std::time::Duration {
    let state = AtomicU64::new(1);
    let words: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(0)).collect();
    let start = std::time::Instant::now();
    for i in 0..punches {
        let bit = i % 511;
        // ORDERING: as the engine's entry (Acquire), bit RMW (Release) and
        // exit (AcqRel).
        let s = state.load(Ordering::Relaxed);
        let _ = state.compare_exchange_weak(s, s + (1 << 8), Ordering::Acquire, Ordering::Acquire);
        let prev = words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
        let s = state.load(Ordering::Relaxed);
        let n = (prev >> (bit % 64) & 1) ^ 1;
        let _ = state.compare_exchange_weak(
            s,
            (s - (1 << 8)).wrapping_add(n << 44),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if bit == 510 {
            words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
        }
    }
    start.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_per_2mib_huge_page() {
        let split = |o, l| parts(o, l).collect::<Vec<_>>();
        assert_eq!(split(511 * SUB, 3 * SUB), vec![(0, 511, 1), (1, 0, 2)]);
        assert_eq!(split(8 << 20, 4 << 20), vec![(4, 0, 512), (5, 0, 512)]);
        assert_eq!(split(SUB, SUB), vec![(0, 1, 1)]);
    }

    /// What the criterion groups and the report check before they time
    /// anything, on a small file: the engine and the map baselines complete
    /// the same huge pages on every pattern.
    #[test]
    fn the_map_baselines_do_the_engines_work() {
        for p in PATTERNS {
            for (threads, sharing) in [(1, Sharing::Disjoint), (2, Sharing::Same)] {
                let work = workload(p, 8, threads, sharing, SEED);
                let pages = file_huge_pages(8, threads, sharing);
                let completions = |imp: &str| {
                    let t = make(imp, pages);
                    run(&*t, &work);
                    t.completions()
                };
                let expect = completions("hugepunch");
                for imp in IMPLEMENTATIONS.iter().filter(|i| same_contract(i)) {
                    assert_eq!(completions(imp), expect, "{p}: {imp}");
                }
            }
        }
    }
}
