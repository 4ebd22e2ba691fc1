//! The patterns the benches replay and the per-thread workloads made of
//! them.

use crate::SUB;
use hugepunch::{ByteRange, Geometry};
use hugepunch_workload::{Op, Pattern};

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

/// Huge pages a workload's file needs.
pub fn file_huge_pages(huge_pages: u64, threads: usize, sharing: Sharing) -> u64 {
    match sharing {
        Sharing::Disjoint => huge_pages * threads as u64,
        Sharing::Same => huge_pages,
    }
}
