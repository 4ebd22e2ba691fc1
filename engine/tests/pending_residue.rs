//! The pending count without a budget: each thread batches its
//! changes in a residue of fewer than 64 subpages in its own statistics
//! shard and hands it to the shared count when it reaches 64 or when the
//! thread exits. These tests fail if a residue is lost (at a thread's
//! exit, or in `stats`), if `pending_bytes_peak` stops being exact for one
//! thread at a time, or if a residue's flush double-counts. Every
//! multi-threaded test arms a watchdog.

mod common;

use common::watchdog::Watchdog;
use hugepunch::testing::NullHost;
use hugepunch::{Config, HugePunch, SUBPAGE_SIZE};
use std::sync::Arc;

const SUB: u64 = SUBPAGE_SIZE;

fn file(huge_pages: u64) -> Arc<HugePunch> {
    Arc::new(HugePunch::new(Config::new(huge_pages << 21), Arc::new(NullHost)).unwrap())
}

/// Threads that punch fewer than 64 subpages each keep them in their
/// residues; once they exit, the shared count holds them, so the next
/// punch (from another thread) sees the exact total for its peak.
#[test]
fn residues_of_exited_threads_reach_the_count_and_the_peak() {
    let _watchdog = Watchdog::arm("residues_of_exited_threads_reach_the_count_and_the_peak");
    let f = file(8);
    // Four threads, one after another or together: 10 subpages each.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                for s in 0..10 {
                    f.punch((t * 512 + s) * SUB, SUB).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = f.stats();
    assert_eq!(s.pending_subpages, 40);
    assert_eq!(s.punched_subpages, 40);
    assert_eq!(s.punch_calls, 40);
    // One caller now: its peak is exact, residues of the exited threads
    // included.
    f.punch(7 * 512 * SUB, SUB).unwrap();
    let s = f.stats();
    assert_eq!(s.pending_subpages, 41);
    assert_eq!(s.pending_bytes_peak, 41 * SUB);
}

/// One thread: the peak is exact across residue flushes (at 64) and
/// completions (a residue of -512 + ...).
#[test]
fn one_thread_peak_is_exact_across_flushes_and_completions() {
    let f = file(4);
    // 511 subpages of huge page 0 (7 flushes of 64, a residue of 63).
    for s in 0..511 {
        f.punch(s * SUB, SUB).unwrap();
    }
    assert_eq!(f.stats().pending_bytes_peak, 511 * SUB);
    // The last one completes it: pending 0, the peak stays.
    f.punch(511 * SUB, SUB).unwrap();
    let s = f.stats();
    assert_eq!((s.pending_subpages, s.huge_frees), (0, 1));
    assert_eq!(s.pending_bytes_peak, 511 * SUB);
    // 100 of huge page 1, then populate 30 of them back: pending 70.
    for s in 512..612 {
        f.punch(s * SUB, SUB).unwrap();
    }
    for s in 512..542 {
        f.populate(s * SUB, SUB).unwrap();
    }
    let s = f.stats();
    assert_eq!(s.pending_subpages, 70);
    assert_eq!(s.repopulated_subpages, 30);
    assert_eq!(s.pending_bytes_peak, 511 * SUB);
}

/// Threads punching and populating at once, each on its own huge page:
/// the count is exact once they are joined, and the peak is never below
/// the final count nor above what was ever punched.
#[test]
fn concurrent_residues_are_exact_at_the_quiescent_point() {
    let _watchdog = Watchdog::arm("concurrent_residues_are_exact_at_the_quiescent_point");
    let f = file(4);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                let base = t * 512;
                for round in 0..5u64 {
                    for s in 0..300 {
                        f.punch((base + s) * SUB, SUB).unwrap();
                    }
                    // Give back all but `round * 10 + 7`.
                    for s in round * 10 + 7..300 {
                        f.populate((base + s) * SUB, SUB).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = f.stats();
    // After the last round each thread keeps 47 subpages punched.
    assert_eq!(s.pending_subpages, 4 * 47);
    assert!(s.pending_bytes_peak >= 4 * 47 * SUB);
    assert!(s.pending_bytes_peak <= 4 * 300 * SUB);
    assert_eq!(s.punch_calls, 4 * 5 * 300);
}
