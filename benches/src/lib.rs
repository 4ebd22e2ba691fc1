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

use hugepunch::{ByteRange, Error};
use hugepunch_workload::{apply, Op, Target, DEFAULT_SEED};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

mod atomic;
mod engine;
mod maps;
mod patterns;

pub use atomic::{AtomicBitmapPeer, CounterOnly};
pub use engine::{Engine, NullHost, PrivateHost};
pub use maps::{DashMapTracker, MutexMap, RwLockMap, SinglePartial};
pub use patterns::{balloon_batches, file_huge_pages, pattern, workload, Sharing, PATTERNS};

// ---- the runner -------------------------------------------------------------
//
// In the crate root: the report's callgrind counts name `run` and
// `run_batches` by their paths (`hugepunch_benches::run`).

/// Punch `batches` with `punch_many`, one call per batch (what the report
/// counts with callgrind for the batch call: not inlined, so that
/// `--toggle-collect` can name it).
#[inline(never)]
pub fn run_batches(engine: &Engine, batches: &[Vec<ByteRange>]) {
    for b in batches {
        engine.0.punch_many(b).expect("valid batch");
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
