//! Locked read-modify-writes on the hot path, counted by the
//! sync facade's counting shim: `cargo test -p hugepunch --features
//! rmw-count --test rmw_count`. A deferred 4 KiB punch without a budget
//! makes three (the entry CAS and the exit CAS on the huge page's state
//! word, the `fetch_or` on its bitmap word) and writes no cache line shared
//! with threads on other huge pages (the statistics go to this thread's
//! shard; the global pending count moves once per 64 punches); a batch
//! makes three per run of ranges on one huge page.
#![cfg(feature = "rmw-count")]

use hugepunch::testing::NullHost;
use hugepunch::{rmw_count, ByteRange, Config, HugePunch};
use std::sync::Arc;

fn file() -> HugePunch {
    HugePunch::new(Config::new(8 << 20), Arc::new(NullHost)).unwrap()
}

/// RMWs made by `f`.
fn rmws(f: impl FnOnce()) -> u64 {
    let before = rmw_count();
    f();
    rmw_count() - before
}

#[test]
fn a_deferred_4k_punch_makes_three_rmws() {
    let f = file();
    // The first operation of a thread registers its statistics shard.
    f.punch(0, 4096).unwrap();
    for sub in 1..63u64 {
        assert_eq!(
            rmws(|| f.punch(sub * 4096, 4096).unwrap()),
            3,
            "subpage {sub}"
        );
    }
    // The 64th deferred subpage of this thread moves the global pending
    // count: one more.
    assert_eq!(rmws(|| f.punch(63 * 4096, 4096).unwrap()), 4);
    assert_eq!(f.stats().pending_subpages, 64);
}

#[test]
fn a_batch_makes_three_rmws_per_huge_page_word_run() {
    let f = file();
    f.punch(0, 4096).unwrap();
    // 256 scattered subpages of huge page 1, all in bitmap words 0..4.
    let batch: Vec<ByteRange> = (0..256u64)
        .map(|i| ByteRange::new((2 << 20) + ((i * 37) % 256) * 4096, 4096))
        .collect();
    // Entry, 4 fetch_or (one per bitmap word), exit, and the global
    // pending count (256 subpages fill this thread's residue).
    assert_eq!(rmws(|| f.punch_many(&batch).unwrap()), 7);
    assert_eq!(f.stats().pending_subpages, 257);
}
