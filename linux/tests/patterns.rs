//! Every adversarial pattern replayed through the engine on a real file:
//! after the replay (and after populating, flushing and tearing down) the
//! memory the file really holds equals what the engine says is allocated
//! (invariant 6, "nothing leaked", measured by the kernel), and every
//! punched-then-populated subpage reads back as zeros (invariant 5, "no
//! stale data").
//!
//! memfd and THP: residency by `st_blocks` (fstat), reads by pread. guest_memfd:
//! residency by `mincore` over its mapping (its `st_blocks` is always 0),
//! reads through the mapping where resident. The guest_memfd and THP tests
//! are ignored, with the probe's reason, where the host lacks them
//! (hugepunch-probe's `needs!`).
#![cfg(target_os = "linux")]

hugepunch_probe::include_needs!();

mod common;

use common::watchdog::Watchdog;
use common::*;
use hugepunch::{ByteRange, Config, HugePunch};
use hugepunch_linux::replay::{pattern, replay_engine, PATTERNS};
use hugepunch_linux::Backend;
use std::sync::Arc;

fn check_pattern(backend: Backend, name: &str) {
    let host = host(backend.clone(), SIZE);
    let host = Arc::new(host);
    let engine = HugePunch::new(Config::new(SIZE), host.clone()).unwrap();
    let mut expect = Expect::new(SIZE);
    replay_engine(&engine, &pattern(name, SIZE).unwrap());
    assert_accounting(&host, &engine, &format!("{name}: after the replay"));

    let stats = engine.stats();
    let counts = host.counts();
    assert_eq!(
        counts.punch_calls, stats.free_calls,
        "{name}: one fallocate per engine free"
    );
    assert_eq!(counts.fallocate_errors, 0);
    assert_eq!(
        counts.invalidations_begun, stats.invalidations,
        "{name}: every invalidation reached the host"
    );
    if name == "conversion-churn" {
        // Every subpage taken back to private (the fourth of every eight)
        // was punched, then populated: it reads zeros.
        assert_eq!(stats.repopulated_subpages, SIZE / SUB / 8);
        for o in (3 * SUB..SIZE).step_by(8 * SUB as usize) {
            expect.zero(o);
            assert!(
                subpage(&host, o).iter().all(|&b| b == 0),
                "conversion-churn: subpage {o:#x} is not zero"
            );
        }
    }
    populate_and_check_zeros(
        &host,
        &engine,
        &mut expect,
        &probe_ranges(SIZE),
        &format!("{name}: populate after the replay"),
    );
    assert_accounting(&host, &engine, &format!("{name}: after populate"));

    engine.flush(0, SIZE).unwrap();
    assert_accounting(&host, &engine, &format!("{name}: after flush"));
    let later: Vec<ByteRange> = (0..SIZE / HP)
        .map(|h| ByteRange::new(h * HP + 8 * SUB, 4 * SUB))
        .collect();
    populate_and_check_zeros(
        &host,
        &engine,
        &mut expect,
        &later,
        &format!("{name}: populate after flush"),
    );
    if backend == Backend::Thp {
        // A populate into a huge page that flush split: the engine asks for
        // its 4 KiB pages, but a `huge=always` tmpfs may back an empty part
        // of the range with a larger folio (measured here: a 16 KiB
        // fallocate at subpage 8 of an emptied 2 MiB range allocated
        // 32 KiB). The file holds at least what the engine says, and at
        // most one such folio (64 KiB) more per huge page.
        let real = host.resident_bytes().unwrap();
        let said = hugepunch_linux::replay::engine_allocated_bytes(&engine);
        assert!(
            real >= said && real - said <= (SIZE / HP) * (64 << 10),
            "{name}: after the second populate: the file holds {real:#x} bytes, the engine says {said:#x}"
        );
    } else {
        assert_accounting(
            &host,
            &engine,
            &format!("{name}: after the second populate"),
        );
    }

    let report = engine.teardown();
    assert!(report.still_allocated.is_empty());
    let left = host.resident_bytes().unwrap();
    if backend == Backend::Thp {
        // Teardown frees what the engine allocated; the larger folios the
        // kernel chose for its 4 KiB populates (above) hold up to 64 KiB a
        // huge page more, which only the file's close returns (the file is
        // unnamed: dropping the host frees it, as tests/thp.rs checks).
        assert!(
            left <= (SIZE / HP) * (64 << 10),
            "{name}: teardown left {left:#x} bytes"
        );
    } else {
        assert_eq!(left, 0, "{name}: teardown freed everything");
    }
    assert_eq!(host.invalidations_open(), 0);
}

macro_rules! pattern_tests {
    ($($test:ident => ($backend:expr, $name:literal),)*) => {
        $(
            #[test]
            #[cfg_attr(miri, ignore)]
            fn $test() {
                check_pattern($backend, $name);
            }
        )*
    };
    // Tests that need a capability of the host (hugepunch-probe).
    ($($test:ident => ($backend:expr, $name:literal) needs $probe:ident,)*) => {
        $(
            needs! { $probe;
                #[test]
                #[cfg_attr(miri, ignore)]
                fn $test() {
                    check_pattern($backend, $name);
                }
            }
        )*
    };
}

pattern_tests! {
    memfd_ascending => (Backend::Memfd, "ascending"),
    memfd_descending => (Backend::Memfd, "descending"),
    memfd_random => (Backend::Memfd, "random"),
    memfd_strided => (Backend::Memfd, "strided"),
    memfd_round_robin => (Backend::Memfd, "round-robin"),
    memfd_pin => (Backend::Memfd, "pin"),
    memfd_conversion_churn => (Backend::Memfd, "conversion-churn"),
    memfd_straddling => (Backend::Memfd, "straddling"),
}

pattern_tests! {
    guest_memfd_ascending => (Backend::GuestMemfd, "ascending") needs guest_memfd,
    guest_memfd_descending => (Backend::GuestMemfd, "descending") needs guest_memfd,
    guest_memfd_random => (Backend::GuestMemfd, "random") needs guest_memfd,
    guest_memfd_strided => (Backend::GuestMemfd, "strided") needs guest_memfd,
    guest_memfd_round_robin => (Backend::GuestMemfd, "round-robin") needs guest_memfd,
    guest_memfd_pin => (Backend::GuestMemfd, "pin") needs guest_memfd,
    guest_memfd_conversion_churn => (Backend::GuestMemfd, "conversion-churn") needs guest_memfd,
    guest_memfd_straddling => (Backend::GuestMemfd, "straddling") needs guest_memfd,
}

pattern_tests! {
    // Real transparent huge pages (a private huge=always tmpfs; ignored,
    // saying why, where the process may not mount). The kernel's own
    // counts of splits and whole frees are asserted in tests/thp.rs.
    thp_ascending => (Backend::Thp, "ascending") needs mount,
    thp_descending => (Backend::Thp, "descending") needs mount,
    thp_random => (Backend::Thp, "random") needs mount,
    thp_strided => (Backend::Thp, "strided") needs mount,
    thp_round_robin => (Backend::Thp, "round-robin") needs mount,
    thp_pin => (Backend::Thp, "pin") needs mount,
    thp_conversion_churn => (Backend::Thp, "conversion-churn") needs mount,
    thp_straddling => (Backend::Thp, "straddling") needs mount,
}

#[test]
fn every_pattern_has_a_test() {
    // The macro above names each pattern; keep it in step with PATTERNS.
    assert_eq!(PATTERNS.len(), 8);
}

/// A budget of 64 KiB forces splits while the patterns run: the engine
/// frees punched subpages 4 KiB at a time, and the file still holds
/// exactly what the engine says.
fn check_budget(backend: Backend, name: &str) {
    let host = host(backend, SIZE);
    let host = Arc::new(host);
    let engine = HugePunch::new(Config::new(SIZE).budget(64 << 10), host.clone()).unwrap();
    let mut expect = Expect::new(SIZE);
    replay_engine(&engine, &pattern(name, SIZE).unwrap());
    let stats = engine.stats();
    assert!(stats.forced_splits > 0, "{name}: the budget forced splits");
    assert!(
        stats.pending_subpages * SUB <= 64 << 10,
        "{name}: invariant 7, pending within the budget"
    );
    assert_accounting(
        &host,
        &engine,
        &format!("{name} with a budget: after the replay"),
    );
    populate_and_check_zeros(
        &host,
        &engine,
        &mut expect,
        &probe_ranges(SIZE),
        &format!("{name} with a budget: populate"),
    );
    assert_accounting(
        &host,
        &engine,
        &format!("{name} with a budget: after populate"),
    );
    engine.teardown();
    assert_eq!(host.resident_bytes().unwrap(), 0);
}

#[test]
#[cfg_attr(miri, ignore)]
fn memfd_random_with_budget_splits_and_accounts() {
    check_budget(Backend::Memfd, "random");
}

#[test]
#[cfg_attr(miri, ignore)]
fn memfd_pin_with_budget_splits_and_accounts() {
    check_budget(Backend::Memfd, "pin");
}

needs! { guest_memfd;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn guest_memfd_random_with_budget_splits_and_accounts() {
        check_budget(Backend::GuestMemfd, "random");
    }
}

/// Two threads replay halves of the random pattern (each taking every
/// other operation) on the same huge pages: the real file still holds
/// exactly what the engine says, and every completion freed its huge page
/// once (invariant 1: the kernel would have seen a second punch of the same
/// range as a no-op, so count the frees instead).
#[test]
#[cfg_attr(miri, ignore)]
fn memfd_two_threads_share_huge_pages() {
    let _watchdog = Watchdog::arm("memfd_two_threads_share_huge_pages");
    let host = host(Backend::Memfd, SIZE);
    let host = Arc::new(host);
    let engine = HugePunch::new(Config::new(SIZE), host.clone()).unwrap();
    let ops = pattern("random", SIZE).unwrap();
    std::thread::scope(|s| {
        for t in 0..2 {
            let (engine, ops) = (&engine, &ops);
            s.spawn(move || {
                let mine: Vec<_> = ops.iter().copied().skip(t).step_by(2).collect();
                replay_engine(engine, &mine);
            });
        }
    });
    let stats = engine.stats();
    assert_eq!(stats.huge_frees, SIZE / HP, "each huge page completed once");
    assert_eq!(
        host.counts().punch_calls,
        SIZE / HP,
        "one fallocate per huge page"
    );
    assert_accounting(&host, &engine, "after two threads");
    assert_eq!(host.resident_bytes().unwrap(), 0);
}
