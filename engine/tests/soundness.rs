//! Soundness under an adversarial host and an adversarial caller:
//! each test forces one interleaving deterministically — a callback blocks
//! on a barrier while the test drives another thread, then panics or
//! returns — and checks, at the quiescent point after it:
//!
//! - never a double free (the recording host asserts on it: a second free
//!   of a subpage panics inside `free`, and that panic reaches the test);
//! - never a free of a subpage that is not punched (a `Present` subpage is
//!   still resident, [`assert_consistent`]);
//! - the statistics equal the bitmaps (`pending_subpages` is the number of
//!   `Punched` subpages);
//! - teardown accounts for every byte (after a final teardown nothing is
//!   resident, each byte freed exactly once).
//!
//! The contract under test is written on the `Host` trait ("Panic") and in
//! `engine/src/unwind.rs`: a panicking callback counts as a failed call,
//! the operation finishes through its ordinary failure path, then the first
//! panic is resumed.

mod common;

use common::watchdog::Watchdog;
use hugepunch::testing::{Action, Event, HookedHost, RecordingHost};
use hugepunch::{
    Attribute, Backing, ByteRange, Config, Host, HugePunch, Policy, SubpageState, SUBPAGE_SIZE,
};
use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

const SUB: u64 = SUBPAGE_SIZE;
/// Four subpages per huge page (order 2), as the loom models use.
const TINY: u64 = 4 * SUB;

/// A recording host (residency, attributes, double-free detection) behind
/// a hook that runs first in every callback: it may block or panic.
fn hooked(size: u64, attr: Attribute) -> Arc<HookedHost> {
    HookedHost::new(RecordingHost::new(size, attr, true))
}

/// Install a hook that only watches (blocks, panics), then forwards.
fn on(host: &HookedHost, f: impl Fn(&Event) + Send + Sync + 'static) {
    host.set(move |e| {
        f(e);
        Action::Forward
    })
}

/// The panic message the hooks raise.
const BOOM: &str = "host callback panics on purpose";

fn boom() -> ! {
    std::panic::panic_any(BOOM)
}

/// Run `f`, which must panic with the hooks' message (not with anything
/// else, such as the recording host's double-free assertion).
fn expect_boom<T>(what: &str, f: impl FnOnce() -> T) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(_) => panic!("{what}: the host's panic did not reach the caller"),
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            assert_eq!(msg, BOOM, "{what}: an unexpected panic");
        }
    }
}

fn file(size: u64, order: u8, host: &Arc<HookedHost>) -> Arc<HugePunch> {
    Arc::new(HugePunch::new(Config::new(size).order(order), host.clone()).unwrap())
}

fn file_with(config: Config, host: &Arc<HookedHost>) -> Arc<HugePunch> {
    Arc::new(HugePunch::new(config, host.clone()).unwrap())
}

/// At a quiescent point: every `Present` or `Punched` subpage is resident,
/// every `Absent` one is not, and `pending_subpages` counts the punched.
fn assert_consistent(file: &HugePunch, host: &HookedHost) {
    let mut punched = 0;
    for sub in 0..file.size() / SUB {
        let at = sub * SUB;
        let state = file.subpage_state(at).unwrap();
        let resident = host.inner().is_resident(at);
        match state {
            SubpageState::Punched => {
                punched += 1;
                assert!(resident, "punched subpage {sub} was freed while pending");
            }
            SubpageState::Present => {
                assert!(resident, "present (unpunched) subpage {sub} was freed")
            }
            SubpageState::Absent => assert!(!resident, "absent subpage {sub} still allocated"),
        }
    }
    assert_eq!(
        file.stats().pending_subpages,
        punched,
        "pending_subpages must equal the punched bits"
    );
}

/// A final teardown with a well-behaved host frees everything, once.
fn assert_teardown_frees_all(file: &HugePunch, host: &HookedHost) {
    host.clear();
    let report = file.teardown();
    assert!(report.still_allocated.is_empty(), "{report:?}");
    assert_eq!(host.inner().resident_subpages(), 0, "teardown leaked");
    let s = file.stats();
    assert_eq!(s.pending_subpages, 0);
}

/// A callback that blocks: `hit` waits for the test, twice (entered, then
/// released).
fn gate() -> Arc<Barrier> {
    Arc::new(Barrier::new(2))
}

// ---------------------------------------------------------------------------
// Part 1: the statistics' thread-local cache
// ---------------------------------------------------------------------------

/// A thread-local value whose destructor punches the file, after the
/// engine's own thread-local (first used later, so destroyed first) is
/// gone, and after another thread made the registry fold the exited
/// thread's shard. Before the fix its punches went through a dangling
/// pointer: lost counts in a normal build, a heap use-after-free under
/// AddressSanitizer (ci/sanitizers.sh runs this test there).
#[test]
fn statistics_of_punches_from_a_thread_local_destructor_are_exact() {
    let _watchdog = Watchdog::arm("statistics_of_punches_from_a_thread_local_destructor_are_exact");
    struct PunchOnDrop {
        file: Arc<HugePunch>,
        dropping: mpsc::Sender<()>,
        go: mpsc::Receiver<()>,
    }
    impl Drop for PunchOnDrop {
        fn drop(&mut self) {
            self.dropping.send(()).unwrap();
            self.go
                .recv_timeout(Duration::from_secs(60))
                .expect("the test let the destructor go on");
            for i in 0..1000u64 {
                let (h, sub) = (i % 32, 2 + i / 32);
                self.file.punch(h * (2 << 20) + sub * SUB, SUB).unwrap();
            }
        }
    }
    thread_local! {
        static USER: RefCell<Option<PunchOnDrop>> = const { RefCell::new(None) };
    }

    let host = hooked(64 << 20, Attribute::Shared);
    let file = file(64 << 20, 9, &host);
    let (dropping_tx, dropping) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let worker = {
        let file = file.clone();
        std::thread::spawn(move || {
            // First use of the user's thread-local, then of the engine's.
            USER.with(|u| {
                *u.borrow_mut() = Some(PunchOnDrop {
                    file: file.clone(),
                    dropping: dropping_tx,
                    go: go_rx,
                })
            });
            file.punch(0, SUB).unwrap();
        })
    };
    dropping
        .recv_timeout(Duration::from_secs(60))
        .expect("the worker's thread-local destructor runs");
    // The worker's engine thread-local is gone now. Another thread
    // registers with the file: the registry folds and drops the exited
    // thread's shard.
    {
        let file = file.clone();
        std::thread::spawn(move || file.punch(SUB, SUB).unwrap())
            .join()
            .unwrap();
    }
    go.send(()).unwrap();
    worker.join().unwrap();

    let s = file.stats();
    assert_eq!(s.punch_calls, 1002, "every punch counted exactly once");
    assert_eq!(s.punched_subpages, 1002);
    assert_eq!(s.pending_subpages, 1002);
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// Threads come and go (each exiting thread releases its statistics shard,
/// the next one takes it over) while another thread reads the statistics
/// all the time: the totals are exact at the end.
#[test]
fn statistics_stay_exact_as_threads_come_and_go() {
    let _watchdog = Watchdog::arm("statistics_stay_exact_as_threads_come_and_go");
    let host = hooked(256 << 20, Attribute::Shared);
    let file = file(256 << 20, 9, &host);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (file, stop) = (file.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !stop.load(Ordering::SeqCst) {
                let now = file.stats().punch_calls;
                assert!(now >= last, "punch_calls went back: {last} -> {now}");
                last = now;
            }
        })
    };
    // Eight threads a round start together and each takes over a shard
    // the previous round released: two threads that took the same shard
    // would lose counts (its writes are plain loads and stores).
    const ROUNDS: u64 = 50;
    const THREADS: u64 = 8;
    const PUNCHES: u64 = 100;
    for round in 0..ROUNDS {
        let start = Arc::new(Barrier::new(THREADS as usize));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (file, start) = (file.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..PUNCHES {
                        // Never subpage 0 of a huge page: nothing completes.
                        let n = (round * THREADS + t) * PUNCHES + i;
                        let sub = (n / 511) * 512 + 1 + n % 511;
                        file.punch(sub * SUB, SUB).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    let s = file.stats();
    let n = ROUNDS * THREADS * PUNCHES;
    assert_eq!((s.punch_calls, s.punched_subpages), (n, n));
    assert_consistent(&file, &host);
}

// ---------------------------------------------------------------------------
// Part 1b: panicking callbacks
// ---------------------------------------------------------------------------

/// Subpages 0-2 punched; a populate of 0 clears bit 0 and blocks in
/// `zero`; a punch of 0 sets the bit again; `zero` panics. Before the fix
/// the populate's guard committed a count of 4 over 3 bits, claimed the
/// completion, and the next punch of subpage 1 freed subpage 3, never
/// punched.
#[test]
fn panicking_zero_under_a_racing_punch_never_frees_an_unpunched_subpage() {
    let _watchdog =
        Watchdog::arm("panicking_zero_under_a_racing_punch_never_frees_an_unpunched_subpage");
    let host = hooked(TINY, Attribute::Shared);
    let file = file(TINY, 2, &host);
    file.punch(0, 3 * SUB).unwrap();
    let g = gate();
    {
        let g = g.clone();
        on(&host, move |c| {
            if *c == Event::Zero(ByteRange::new(0, SUB)) {
                g.wait();
                g.wait();
                boom();
            }
        });
    }
    let populate = {
        let file = file.clone();
        std::thread::spawn(move || expect_boom("populate", || file.populate(0, SUB)))
    };
    g.wait(); // the populate is inside `zero`
    file.punch(0, SUB).unwrap();
    g.wait(); // let `zero` panic
    populate.join().unwrap();
    host.clear();

    assert_eq!(file.backing(0).unwrap(), Backing::Huge);
    assert_eq!(file.stats().pending_subpages, 3);
    assert_eq!(file.subpage_state(3 * SUB).unwrap(), SubpageState::Present);
    assert_consistent(&file, &host);
    // Re-punching subpage 1 completes nothing: subpage 3 is not punched.
    file.punch(SUB, SUB).unwrap();
    assert_eq!(file.stats().huge_frees, 0);
    assert_consistent(&file, &host);
    file.punch(3 * SUB, SUB).unwrap();
    assert_eq!(file.stats().huge_frees, 1);
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// Populate A clears bit 0 and blocks in `zero`; a punch sets bit 0 again;
/// populate B un-punches it, zeroes it, and waits for A to leave; A's
/// `zero` panics and A sets the bit again. B must not return with its
/// subpage punched (its caller is about to write it: a later completion
/// would free the data).
#[test]
fn a_populate_waiting_for_a_panicking_unpunch_looks_again() {
    let _watchdog = Watchdog::arm("a_populate_waiting_for_a_panicking_unpunch_looks_again");
    let host = hooked(TINY, Attribute::Shared);
    let file = file(TINY, 2, &host);
    file.punch(0, SUB).unwrap();
    let g = gate();
    let zeroes = Arc::new(AtomicU32::new(0));
    {
        let (g, zeroes) = (g.clone(), zeroes.clone());
        on(&host, move |c| {
            if matches!(c, Event::Zero(..)) && zeroes.fetch_add(1, Ordering::SeqCst) == 0 {
                g.wait();
                g.wait();
                boom();
            }
        });
    }
    let a = {
        let file = file.clone();
        std::thread::spawn(move || expect_boom("populate A", || file.populate(0, SUB)))
    };
    g.wait(); // A is inside `zero`
    file.punch(0, SUB).unwrap();
    let b = {
        let file = file.clone();
        std::thread::spawn(move || file.populate(0, SUB).unwrap())
    };
    // B zeroes (the second `zero`) and then waits for A.
    while zeroes.load(Ordering::SeqCst) < 2 {
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(20));
    g.wait(); // A's `zero` panics
    a.join().unwrap();
    b.join().unwrap();
    host.clear();
    assert_eq!(
        file.subpage_state(0).unwrap(),
        SubpageState::Present,
        "B returned: its subpage is populated"
    );
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// `invalidate_end` panics after the completion's free succeeded: the huge
/// page was freed, and must never be freed again.
#[test]
fn invalidate_end_panicking_after_a_completion_free_frees_once() {
    let host = hooked(2 * TINY, Attribute::Private);
    let file = file(2 * TINY, 2, &host);
    file.punch(0, 3 * SUB).unwrap();
    on(&host, |c| {
        if *c == Event::InvalidateEnd(ByteRange::new(0, TINY)) {
            boom()
        }
    });
    expect_boom("completing punch", || file.punch(3 * SUB, SUB));
    host.clear();
    assert_eq!(file.backing(0).unwrap(), Backing::Absent);
    let s = file.stats();
    assert_eq!((s.huge_frees, s.free_calls, s.free_errors), (1, 1, 0));
    assert_consistent(&file, &host);
    file.flush(0, 2 * TINY).unwrap();
    assert_teardown_frees_all(&file, &host);
    assert_eq!(
        file.stats().free_calls,
        2,
        "one completion, one teardown free"
    );
}

/// The same in a forced split's whole-page free (`flush` of a huge page
/// whose completion's free had failed).
#[test]
fn invalidate_end_panicking_after_a_flush_free_frees_once() {
    let host = hooked(TINY, Attribute::Shared);
    let file = file(TINY, 2, &host);
    host.inner().fail_next_frees.store(1, Ordering::Relaxed);
    file.punch(0, TINY - SUB).unwrap();
    file.punch(TINY - SUB, SUB).unwrap();
    assert_eq!(file.stats().free_errors, 1);
    assert_eq!(file.stats().pending_subpages, 4);
    on(&host, |c| {
        if matches!(c, Event::InvalidateEnd(..)) {
            boom()
        }
    });
    expect_boom("flush", || file.flush(0, TINY));
    host.clear();
    assert_eq!(file.backing(0).unwrap(), Backing::Absent);
    assert_eq!(file.stats().huge_frees, 1);
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// The same in teardown, of a huge page an operation touched (a live
/// chunk) and of one nobody touched (a closed chunk).
#[test]
fn invalidate_end_panicking_in_teardown_frees_once() {
    for touched in [true, false] {
        let host = hooked(2 * TINY, Attribute::Shared);
        let file = file(2 * TINY, 2, &host);
        if touched {
            file.punch(0, SUB).unwrap();
        }
        on(&host, |c| {
            if *c == Event::InvalidateEnd(ByteRange::new(0, TINY)) {
                boom()
            }
        });
        expect_boom("teardown", || file.teardown());
        host.clear();
        assert_eq!(host.inner().resident_subpages(), 0, "touched {touched}");
        let report = file.teardown();
        assert!(
            report.still_allocated.is_empty(),
            "touched {touched}: the freed huge page is not still allocated: {report:?}"
        );
        let s = file.stats();
        assert_eq!(
            (s.teardown_frees, s.free_calls),
            (2, 2),
            "touched {touched}"
        );
        assert_eq!(s.pending_subpages, 0);
    }
}

/// A big untouched file: teardown's closed chunks. The panic on one huge
/// page does not keep the others allocated, and a second teardown finds
/// nothing to free.
#[test]
fn a_panicking_free_in_teardown_of_untouched_huge_pages_is_retried_once() {
    let size = 64 * TINY;
    let host = hooked(size, Attribute::Shared);
    let file = file(size, 2, &host);
    on(&host, |c| {
        if *c == Event::Free(ByteRange::new(5 * TINY, TINY), 2) {
            boom()
        }
    });
    expect_boom("teardown", || file.teardown());
    host.clear();
    assert_eq!(host.inner().resident_subpages(), 4, "only huge page 5 left");
    let report = file.teardown();
    assert!(report.still_allocated.is_empty(), "{report:?}");
    assert_eq!(host.inner().resident_subpages(), 0);
    let before = file.stats();
    assert!(file.teardown().still_allocated.is_empty());
    assert_eq!(file.stats(), before, "a third teardown does nothing");
    let s = file.stats();
    assert_eq!((s.teardown_frees, s.free_errors), (64, 1));
}

/// `flush` frees run 0 of a huge page as 4 KiB pages, then `free` of run 2
/// panics. Before the fix the huge page went back to `Huge` with every
/// punched bit set, and punching the rest freed run 0 again.
#[test]
fn a_forced_split_whose_run_free_panics_never_frees_twice() {
    let host = hooked(TINY, Attribute::Shared);
    let file = file(TINY, 2, &host);
    file.punch(0, SUB).unwrap();
    file.punch(2 * SUB, SUB).unwrap();
    on(&host, |c| {
        if *c == Event::Free(ByteRange::new(2 * SUB, SUB), 0) {
            boom()
        }
    });
    expect_boom("flush", || file.flush(0, TINY));
    host.clear();
    assert_eq!(file.backing(0).unwrap(), Backing::Split);
    assert_eq!(file.subpage_state(0).unwrap(), SubpageState::Absent);
    assert_eq!(file.subpage_state(2 * SUB).unwrap(), SubpageState::Present);
    assert!(
        host.inner()
            .events()
            .contains(&Event::Zero(ByteRange::new(2 * SUB, SUB))),
        "the subpage that stays present was punched: it is zeroed"
    );
    let s = file.stats();
    assert_eq!(
        (s.forced_splits, s.small_freed_subpages, s.free_errors),
        (1, 1, 1)
    );
    assert_consistent(&file, &host);
    file.punch(0, TINY).unwrap();
    assert_consistent(&file, &host);
    assert_eq!(file.backing(0).unwrap(), Backing::Absent);
    assert_teardown_frees_all(&file, &host);
}

/// A `CancelAndZero` conversion whose `set_attributes` panics: the
/// un-punch happened and is counted, so `pending_subpages` is 0.
#[test]
fn a_cancel_and_zero_conversion_whose_set_attributes_panics_keeps_exact_counts() {
    let host = hooked(TINY, Attribute::Shared);
    let file = file_with(
        Config::new(TINY).order(2).policy(Policy::CancelAndZero),
        &host,
    );
    file.punch(0, 2 * SUB).unwrap();
    on(&host, |c| {
        if matches!(c, Event::SetAttributes(..)) {
            boom()
        }
    });
    expect_boom("convert", || file.convert(0, TINY, Attribute::Private));
    host.clear();
    let s = file.stats();
    assert_eq!(s.pending_subpages, 0);
    assert_eq!(s.repopulated_subpages, 2);
    assert_eq!(s.convert_calls, s.conversions_ok + s.conversions_rejected);
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// A `CancelAndZero` conversion whose `zero` panics leaves the subpages
/// punched, so it must not convert them to private (invariant 3).
#[test]
fn a_cancel_and_zero_conversion_whose_zero_panics_does_not_convert() {
    let host = hooked(TINY, Attribute::Shared);
    let file = file_with(
        Config::new(TINY).order(2).policy(Policy::CancelAndZero),
        &host,
    );
    file.punch(0, 2 * SUB).unwrap();
    on(&host, |c| {
        if matches!(c, Event::Zero(..)) {
            boom()
        }
    });
    expect_boom("convert", || file.convert(0, TINY, Attribute::Private));
    host.clear();
    assert!(
        host.inner().is_shared(ByteRange::new(0, TINY)),
        "not converted"
    );
    let s = file.stats();
    assert_eq!((s.pending_subpages, s.repopulated_subpages), (2, 0));
    assert_eq!((s.conversions_ok, s.conversions_rejected), (0, 1));
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// A `free` that panics in a punch of a `Split` huge page: the subpages
/// that stay present were punched, so they are zeroed, as on `Err`.
#[test]
fn a_panicking_free_of_a_split_punch_zeroes_what_stays_present() {
    let host = hooked(TINY, Attribute::Shared);
    let file = file(TINY, 2, &host);
    file.punch(0, SUB).unwrap();
    file.flush(0, TINY).unwrap();
    assert_eq!(file.backing(0).unwrap(), Backing::Split);
    on(&host, |c| {
        if matches!(c, Event::Free(..)) {
            boom()
        }
    });
    expect_boom("punch", || file.punch(SUB, SUB));
    host.clear();
    assert!(host
        .inner()
        .events()
        .contains(&Event::Zero(ByteRange::new(SUB, SUB))));
    assert_eq!(file.subpage_state(SUB).unwrap(), SubpageState::Present);
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// `invalidate_begin` panics in a completion: nothing may be freed under
/// an invalidation that did not happen; the huge page stays pending whole
/// and a later `flush` frees it once.
#[test]
fn a_panicking_invalidate_begin_frees_nothing() {
    let host = hooked(TINY, Attribute::Shared);
    let file = file(TINY, 2, &host);
    file.punch(0, 3 * SUB).unwrap();
    on(&host, |c| {
        if matches!(c, Event::InvalidateBegin(..)) {
            boom()
        }
    });
    expect_boom("completing punch", || file.punch(3 * SUB, SUB));
    assert_eq!(host.inner().resident_subpages(), 4, "nothing freed");
    host.clear();
    assert_eq!(file.stats().pending_subpages, 4);
    assert_consistent(&file, &host);
    file.flush(0, TINY).unwrap();
    assert_eq!(file.stats().huge_frees, 1);
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// `is_shared` panics: the punch treats the range as possibly private and
/// invalidates it now (invariant 2), its bits are pending and counted.
#[test]
fn a_panicking_shared_state_check_counts_as_private() {
    let host = hooked(TINY, Attribute::Shared);
    let file = file(TINY, 2, &host);
    on(&host, |c| {
        if matches!(c, Event::IsShared(..)) {
            boom()
        }
    });
    expect_boom("punch", || file.punch(SUB, SUB));
    host.clear();
    let s = file.stats();
    assert_eq!((s.punch_calls, s.pending_subpages), (1, 1));
    assert_eq!((s.invalidations, s.invalidations_immediate), (1, 1));
    assert!(host
        .inner()
        .events()
        .iter()
        .any(|e| matches!(e, Event::InvalidateBegin(r, _) if *r == ByteRange::new(SUB, SUB))));
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

/// `allocate` panics: the huge page stays `Absent`, nothing is counted as
/// allocated, and a later populate allocates it.
#[test]
fn a_panicking_allocation_leaves_the_huge_page_absent() {
    let host = HookedHost::new(RecordingHost::new(TINY, Attribute::Shared, false));
    let file = file_with(Config::new(TINY).order(2).empty(), &host);
    on(&host, |c| {
        if matches!(c, Event::Allocate(..)) {
            boom()
        }
    });
    expect_boom("populate", || file.populate(0, SUB));
    host.clear();
    assert_eq!(file.backing(0).unwrap(), Backing::Absent);
    assert_consistent(&file, &host);
    file.populate(0, SUB).unwrap();
    assert_eq!(file.backing(0).unwrap(), Backing::Huge);
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}

// ---------------------------------------------------------------------------
// Part 1c: a shared punch meeting a completion in flight
// ---------------------------------------------------------------------------

/// A completion of huge page 0 is in flight (blocked in `free`); a shared
/// punch of subpage 0 meets it and blocks in `is_shared`; the completion
/// ends; a conversion of subpage 0 to private marks the huge page and
/// blocks in `set_attributes`; `is_shared` answers "shared" (the attribute
/// has not changed yet). CONTRACT.md §5: either the conversion is refused, or the
/// punch invalidated the subpage now. The conversion goes ahead here (the
/// huge page is `Absent`, nothing is pending), so the punch must
/// invalidate.
#[test]
fn a_shared_punch_meeting_a_completion_invalidates_when_a_conversion_is_marked() {
    let _watchdog = Watchdog::arm(
        "a_shared_punch_meeting_a_completion_invalidates_when_a_conversion_is_marked",
    );
    let host = hooked(TINY, Attribute::Shared);
    let file = file(TINY, 2, &host);
    file.punch(0, 3 * SUB).unwrap();
    let (free_gate, shared_gate, attr_gate) = (gate(), gate(), gate());
    {
        let (f, s, a) = (free_gate.clone(), shared_gate.clone(), attr_gate.clone());
        on(&host, move |c| match *c {
            Event::Free(r, _) if r == ByteRange::new(0, TINY) => {
                f.wait();
                f.wait();
            }
            Event::IsShared(r) if r == ByteRange::new(0, SUB) => {
                s.wait();
                s.wait();
            }
            Event::SetAttributes(..) => {
                a.wait();
                a.wait();
            }
            _ => {}
        });
    }
    let completion = {
        let file = file.clone();
        std::thread::spawn(move || file.punch(3 * SUB, SUB).unwrap())
    };
    free_gate.wait(); // the completion is inside `free`
    let punch = {
        let file = file.clone();
        std::thread::spawn(move || file.punch(0, SUB).unwrap())
    };
    shared_gate.wait(); // the punch met the completion, is inside `is_shared`
    free_gate.wait(); // the completion ends
    completion.join().unwrap();
    let convert = {
        let file = file.clone();
        std::thread::spawn(move || file.convert(0, SUB, Attribute::Private))
    };
    attr_gate.wait(); // the conversion is marked, inside `set_attributes`
    host.inner().take_events();
    shared_gate.wait(); // `is_shared` answers "shared"
    punch.join().unwrap();
    let invalidated = host
        .inner()
        .events()
        .iter()
        .any(|e| matches!(e, Event::InvalidateBegin(r, _) if *r == ByteRange::new(0, SUB)));
    attr_gate.wait();
    let converted = convert.join().unwrap();
    host.clear();
    assert!(
        converted.is_err() || invalidated,
        "the conversion went ahead ({converted:?}) and the punch did not invalidate"
    );
    assert_eq!(file.stats().invalidations_immediate, 1);
}

/// SPEC §5: a punch never waits for another operation's registration. A
/// populate is registered on huge page 0 (blocked in `zero`); a punch of
/// huge page 1 goes over the budget and runs the shrinker, whose best
/// victim is huge page 0: it must skip it (and mark it), not wait, and
/// split huge page 1 instead. When the populate leaves, pending bytes are
/// within the budget (invariant 7).
#[test]
fn the_shrinker_a_punch_runs_never_waits_for_a_registered_operation() {
    let _watchdog =
        Watchdog::arm("the_shrinker_a_punch_runs_never_waits_for_a_registered_operation");
    let host = hooked(2 * TINY, Attribute::Shared);
    let file = file_with(Config::new(2 * TINY).order(2).budget(2 * SUB), &host);
    file.punch(SUB, 2 * SUB).unwrap();
    let g = gate();
    {
        let g = g.clone();
        on(&host, move |c| {
            if *c == Event::Zero(ByteRange::new(SUB, SUB)) {
                g.wait();
                g.wait();
            }
        });
    }
    let populate = {
        let file = file.clone();
        std::thread::spawn(move || file.populate(SUB, SUB).unwrap())
    };
    g.wait(); // the populate is registered on huge page 0, inside `zero`
    let (done, punched) = mpsc::channel();
    let puncher = {
        let file = file.clone();
        std::thread::spawn(move || done.send(file.punch(TINY + SUB, SUB)).unwrap())
    };
    let res = punched.recv_timeout(Duration::from_secs(10));
    g.wait();
    populate.join().unwrap();
    puncher.join().unwrap();
    assert_eq!(
        res,
        Ok(Ok(())),
        "a punch over the budget waited for a populate registered on the shrinker's victim"
    );
    host.clear();
    assert_eq!(
        file.backing(0).unwrap(),
        Backing::Huge,
        "skipped, not split"
    );
    assert_eq!(file.backing(1).unwrap(), Backing::Split);
    let s = file.stats();
    assert_eq!(s.forced_splits, 1);
    assert!(s.pending_subpages * SUB <= 2 * SUB, "invariant 7: {s:?}");
    assert_consistent(&file, &host);
    assert_teardown_frees_all(&file, &host);
}
