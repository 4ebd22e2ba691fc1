//! The implementations the benchmarks compare, the adversarial patterns they
//! replay, and the side-by-side runner shared by criterion and the report.
//!
//! Every implementation does the same work: it tracks punched 4 KiB
//! subpages per 2 MiB huge page of a populated, shared file and "frees" a
//! huge page (counts a completion) when its last subpage is punched;
//! `populate` un-punches; a conversion to private is refused over a
//! pending punch. The engine and the three map baselines must report the
//! same completions for the same pattern ([`run`] asserts it); the
//! single-partial tracker frees less by design.

#![forbid(unsafe_code)]

use bitvec::prelude::*;
use dashmap::DashMap;
use hugepunch::{Attribute, ByteRange, Config, Hint, Host, HostError, HugePunch};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Subpage size.
pub const SUB: u64 = 4096;

/// One operation of a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Punch `offset .. offset + len`.
    Punch(u64, u64),
    /// Populate (un-punch) `offset .. offset + len`.
    Populate(u64, u64),
    /// Convert to shared.
    Shared(u64, u64),
    /// Convert to private (may be refused).
    Private(u64, u64),
}

/// What the benchmarks compare.
pub trait Tracker: Sync {
    /// Apply one operation.
    fn apply(&self, op: Op);
    /// Huge pages freed whole so far.
    fn completions(&self) -> u64;
}

// ---- the engine -----------------------------------------------------------

/// A host that does nothing (all memory shared, frees succeed): the cost
/// measured is the engine's own.
pub struct NullHost;

impl Host for NullHost {
    fn is_shared(&self, _: ByteRange) -> bool {
        true
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
    /// A populated file of `huge_pages` 2 MiB huge pages.
    pub fn new(huge_pages: u64) -> Self {
        Engine(
            HugePunch::new(Config::new(huge_pages << 21), Arc::new(NullHost))
                .expect("valid config"),
        )
    }
}

impl Tracker for Engine {
    fn apply(&self, op: Op) {
        let _ = match op {
            Op::Punch(o, l) => self.0.punch(o, l),
            Op::Populate(o, l) => self.0.populate(o, l),
            Op::Shared(o, l) => self.0.convert(o, l, Attribute::Shared),
            Op::Private(o, l) => self.0.convert(o, l, Attribute::Private),
        };
    }
    fn completions(&self) -> u64 {
        self.0.stats().huge_frees
    }
}

// ---- the map baselines ------------------------------------------------------

/// The parts of a range per 2 MiB huge page: (huge page, first, count).
fn parts(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let (mut at, end) = (offset / SUB, (offset + len) / SUB);
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let h = at / 512;
            let stop = ((h + 1) * 512).min(end);
            let part = (h, (at % 512) as usize, (stop - at) as usize);
            at = stop;
            part
        })
    })
}

fn punch_bits(bits: &mut BitVec, first: usize, count: usize) -> bool {
    bits[first..first + count].fill(true);
    bits.all()
}

/// The obvious implementation: one mutex around a map of bit vectors.
#[derive(Default)]
pub struct MutexMap {
    map: Mutex<HashMap<u64, BitVec>>,
    completions: AtomicU64,
}

impl Tracker for MutexMap {
    fn apply(&self, op: Op) {
        let mut map = self.map.lock().unwrap();
        match op {
            Op::Punch(o, l) => {
                for (h, first, count) in parts(o, l) {
                    let bits = map.entry(h).or_insert_with(|| bitvec![0; 512]);
                    if punch_bits(bits, first, count) {
                        map.remove(&h);
                        self.completions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Op::Populate(o, l) => {
                for (h, first, count) in parts(o, l) {
                    if let Some(bits) = map.get_mut(&h) {
                        bits[first..first + count].fill(false);
                    }
                }
            }
            Op::Private(o, l) => {
                let _refused =
                    parts(o, l).any(|(h, f, c)| map.get(&h).is_some_and(|b| b[f..f + c].any()));
            }
            Op::Shared(..) => {}
        }
    }
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

impl Tracker for RwLockMap {
    fn apply(&self, op: Op) {
        match op {
            Op::Punch(o, l) => {
                let mut map = self.map.write().unwrap();
                for (h, first, count) in parts(o, l) {
                    let bits = map.entry(h).or_insert_with(|| bitvec![0; 512]);
                    if punch_bits(bits, first, count) {
                        map.remove(&h);
                        self.completions.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Op::Populate(o, l) => {
                let mut map = self.map.write().unwrap();
                for (h, first, count) in parts(o, l) {
                    if let Some(bits) = map.get_mut(&h) {
                        bits[first..first + count].fill(false);
                    }
                }
            }
            Op::Private(o, l) => {
                let map = self.map.read().unwrap();
                let _refused =
                    parts(o, l).any(|(h, f, c)| map.get(&h).is_some_and(|b| b[f..f + c].any()));
            }
            Op::Shared(..) => {}
        }
    }
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

impl Tracker for DashMapTracker {
    fn apply(&self, op: Op) {
        match op {
            Op::Punch(o, l) => {
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
            }
            Op::Populate(o, l) => {
                for (h, first, count) in parts(o, l) {
                    if let Some(mut bits) = self.map.get_mut(&h) {
                        bits[first..first + count].fill(false);
                    }
                }
            }
            Op::Private(o, l) => {
                let _refused = parts(o, l)
                    .any(|(h, f, c)| self.map.get(&h).is_some_and(|b| b[f..f + c].any()));
            }
            Op::Shared(..) => {}
        }
    }
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

impl Tracker for SinglePartial {
    fn apply(&self, op: Op) {
        let mut tracked = self.tracked.lock().unwrap();
        let (o, l) = match op {
            Op::Punch(o, l) => (o, l),
            Op::Populate(o, l) => {
                // A re-used subpage of the tracked huge page is no longer
                // discarded.
                for (h, first, count) in parts(o, l) {
                    if let Some((t, bits)) = tracked.as_mut() {
                        if *t == h {
                            bits[first..first + count].fill(false);
                        }
                    }
                }
                return;
            }
            Op::Shared(..) | Op::Private(..) => return,
        };
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
    }
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

// ---- patterns -------------------------------------------------------------

/// The adversarial 4 KiB patterns.
pub const PATTERNS: &[&str] = &[
    "ascending",
    "descending",
    "random",
    "strided",
    "round-robin",
    "pin",
    "churn",
    "straddling",
];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The operations of `pattern` over `huge_pages` 2 MiB huge pages starting
/// at huge page `base`.
pub fn pattern(name: &str, base: u64, huge_pages: u64) -> Vec<Op> {
    let n = huge_pages * 512;
    let at = |s: u64| (base * 512 + s) * SUB;
    let punch = |s: u64| Op::Punch(at(s), SUB);
    match name {
        "ascending" => (0..n).map(punch).collect(),
        "descending" => (0..n).rev().map(punch).collect(),
        "random" => {
            let mut v: Vec<u64> = (0..n).collect();
            let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ base);
            for i in (1..v.len()).rev() {
                v.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            v.into_iter().map(punch).collect()
        }
        "strided" => (0..n)
            .filter(|s| s % 2 == 0)
            .chain((0..n).filter(|s| s % 2 == 1))
            .map(punch)
            .collect(),
        "round-robin" => (0..512)
            .flat_map(|i| (0..huge_pages).map(move |h| h * 512 + i))
            .map(punch)
            .collect(),
        "pin" => (0..n).filter(|s| s % 512 != 511).map(punch).collect(),
        "churn" => (0..n)
            .flat_map(|s| {
                let o = at(s);
                [
                    Op::Shared(o, SUB),
                    Op::Punch(o, SUB),
                    Op::Populate(o, SUB),
                    Op::Private(o, SUB),
                ]
            })
            .collect(),
        "straddling" => {
            // 3-subpage ranges, so every 512/3-th one straddles two huge pages.
            let mut v: Vec<Op> = (0..n / 3).map(|i| Op::Punch(at(i * 3), 3 * SUB)).collect();
            v.extend((n / 3 * 3..n).map(punch));
            v
        }
        other => panic!("unknown pattern {other}"),
    }
}

/// How threads share the huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Each thread has its own huge pages (far apart).
    Disjoint,
    /// All threads punch the same huge pages, interleaved subpage by subpage.
    Same,
}

/// The per-thread operation lists for `threads` threads.
pub fn workload(name: &str, huge_pages: u64, threads: usize, sharing: Sharing) -> Vec<Vec<Op>> {
    match sharing {
        Sharing::Disjoint => (0..threads as u64)
            .map(|t| pattern(name, t * huge_pages, huge_pages))
            .collect(),
        Sharing::Same => {
            // Thread t takes the operations whose first subpage is t modulo
            // `threads`: the same huge pages, and each subpage's operations
            // stay in order in one thread, so completions do not depend on
            // how the threads interleave.
            let all = pattern(name, 0, huge_pages);
            let first = |op: &Op| match *op {
                Op::Punch(o, _) | Op::Populate(o, _) | Op::Shared(o, _) | Op::Private(o, _) => {
                    o / SUB
                }
            };
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
        for &op in &work[0] {
            tracker.apply(op);
        }
    } else {
        let barrier = std::sync::Barrier::new(work.len());
        std::thread::scope(|s| {
            for ops in work {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for &op in ops {
                        tracker.apply(op);
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
        "mutex-map" => Box::new(MutexMap::default()),
        "rwlock-map" => Box::new(RwLockMap::default()),
        "dashmap" => Box::new(DashMapTracker::default()),
        "single-partial" => Box::new(SinglePartial::default()),
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
];

/// Implementations that must report the engine's completions.
pub fn same_contract(name: &str) -> bool {
    name != "single-partial"
}

/// The floor of the engine's punch protocol: the four read-modify-writes a
/// deferred 4 KiB punch makes (entry CAS on the state word, `fetch_or` on a
/// bitmap word, exit CAS, the global pending count), on the same memory
/// layout, with nothing else. What the engine costs above this is its
/// bookkeeping (validation, callbacks, index lookup, statistics).
pub fn protocol_floor(punches: u64) -> std::time::Duration {
    let state = AtomicU64::new(1);
    let words: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(0)).collect();
    let pending = crossbeam::utils::CachePadded::new(std::sync::atomic::AtomicI64::new(0));
    let start = std::time::Instant::now();
    for i in 0..punches {
        let bit = i % 511;
        // ORDERING: as the engine's entry (Acquire), bit RMW (Relaxed), exit
        // (AcqRel) and pending count (Relaxed).
        let s = state.load(Ordering::Relaxed);
        let _ = state.compare_exchange_weak(s, s + (1 << 8), Ordering::Acquire, Ordering::Acquire);
        let prev = words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        let s = state.load(Ordering::Relaxed);
        let _ = state.compare_exchange_weak(s, s - (1 << 8), Ordering::AcqRel, Ordering::Acquire);
        pending.fetch_add((prev >> (bit % 64) & 1) as i64, Ordering::Relaxed);
        if bit == 510 {
            words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
        }
    }
    start.elapsed()
}
