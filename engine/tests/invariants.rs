//! One focused test per invariant of SPEC.md §4, each named for it, each
//! asserting on what the host saw (the [`RecordingHost`]'s events,
//! residency and attributes) and able to fail if the engine broke it.
//!
//! - Invariant 1: exactly-once completion.
//! - Invariant 2: no deferred invalidation of private memory.
//! - Invariant 3: no conversion to private over a pending punch (`Reject`),
//!   and a refused conversion changes nothing but its two counters.
//! - Invariant 4: no data loss (no free without an invalidation first; a
//!   completion never frees what a populate un-punched).
//! - Invariant 5: no stale data (a punched subpage populated again reads
//!   as zeros).
//! - Invariant 6: nothing leaked (freed + pending + live = allocated; after
//!   teardown everything was freed exactly once), with failing frees.
//! - Invariant 7: bounded deferral (pending within the budget after every
//!   operation; the shrinker's order).
//! - Invariant 8: bad input changes nothing (the bad-range matrix for every
//!   operation that takes a range; `TornDown` after teardown, first).

mod common;

use common::watchdog::Watchdog;
use common::{Event, RecordingHost};
use hugepunch::{
    Attribute, Backing, ByteRange, Config, Error, Hint, Host, HostError, HugePunch, Policy, Stats,
    SubpageState, EAGAIN, EINVAL, EIO, SUBPAGE_SIZE,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

const SUB: u64 = SUBPAGE_SIZE;

fn file(
    order: u8,
    huge_pages: u64,
    start: Attribute,
    populated: bool,
    budget: Option<u64>,
    policy: Policy,
) -> (HugePunch, Arc<RecordingHost>) {
    let size = huge_pages * (SUB << order);
    let host = RecordingHost::new(size, start, populated);
    let mut cfg = Config::new(size).order(order).policy(policy);
    cfg.populated = populated;
    cfg.budget = budget;
    (
        HugePunch::new(cfg, host.clone()).expect("valid config"),
        host,
    )
}

fn frees(events: &[Event]) -> Vec<(ByteRange, u8)> {
    events
        .iter()
        .filter_map(|e| {
            if let Event::Free(r, o) = e {
                Some((*r, *o))
            } else {
                None
            }
        })
        .collect()
}

fn invalidations(events: &[Event]) -> Vec<(ByteRange, Hint)> {
    events
        .iter()
        .filter_map(|e| {
            if let Event::InvalidateBegin(r, h) = e {
                Some((*r, *h))
            } else {
                None
            }
        })
        .collect()
}

fn hint(h: u64, order: u8) -> Hint {
    Hint {
        huge_page: h,
        order,
    }
}

fn covers(outer: ByteRange, inner: ByteRange) -> bool {
    outer.offset <= inner.offset && inner.end() <= outer.end()
}

/// Every subpage's state (the engine must be live).
fn states(e: &HugePunch) -> Vec<SubpageState> {
    (0..e.size() / SUB)
        .map(|s| e.subpage_state(s * SUB).unwrap())
        .collect()
}

fn backings(e: &HugePunch) -> Vec<Backing> {
    (0..e.huge_pages()).map(|h| e.backing(h).unwrap()).collect()
}

/// Stats with the named counter cleared, to compare "everything else".
fn without(mut s: Stats, counter: &str) -> Stats {
    match counter {
        "errors_invalid_range" => s.errors_invalid_range = 0,
        "errors_torn_down" => s.errors_torn_down = 0,
        other => panic!("unknown counter {other}"),
    }
    s
}

// ---------------------------------------------------------------------------
// Invariant 1
// ---------------------------------------------------------------------------

/// Sequential: a huge page punched 4 KiB at a time in a scrambled order is
/// freed once, whole, only by the punch of its last subpage, inside one
/// invalidation of the whole huge page with its hint; punching it again
/// afterwards frees nothing more.
#[test]
fn invariant_1_exactly_once_completion() {
    let order = 3;
    let (e, host) = file(order, 2, Attribute::Shared, true, None, Policy::Reject);
    let hp = SUB << order;
    let sequence = [5u64, 0, 7, 2, 2, 6, 1, 4, 3];
    for (i, &s) in sequence.iter().enumerate() {
        e.punch(hp + s * SUB, SUB).unwrap();
        let ev = host.take_events();
        if i + 1 < sequence.len() {
            assert!(
                frees(&ev).is_empty(),
                "invariant 1: freed before its last subpage was punched: {ev:?}"
            );
            assert_eq!(e.backing(1), Ok(Backing::Huge));
            assert_eq!(
                e.max_mapping_order(1),
                Ok(0),
                "a huge mapping over a punched subpage"
            );
        } else {
            let whole = ByteRange::new(hp, hp);
            let seq: Vec<Event> = ev
                .into_iter()
                .filter(|e| !matches!(e, Event::IsShared(_)))
                .collect();
            assert_eq!(
                seq,
                vec![Event::InvalidateBegin(whole, hint(1, order)), Event::Free(whole, order), Event::InvalidateEnd(whole)],
                "invariant 1: the completion is one whole invalidation around one free of the huge page's order"
            );
        }
    }
    assert_eq!(e.backing(1), Ok(Backing::Absent));
    assert_eq!(e.stats().huge_frees, 1);
    // Huge page 0 was never touched: still whole.
    assert_eq!(e.backing(0), Ok(Backing::Huge));
    assert_eq!(e.max_mapping_order(0), Ok(order));
    // A second life does not begin by punching: nothing more is freed.
    e.punch(hp, hp).unwrap();
    e.punch(hp + SUB, SUB).unwrap();
    assert!(
        frees(&host.take_events()).is_empty(),
        "invariant 1: an absent huge page freed again"
    );
    assert_eq!(e.stats().huge_frees, 1);
    assert_eq!(e.stats().free_calls, 1);
    // After a populate it lives again and is completed again, once.
    e.populate(hp, SUB).unwrap();
    e.punch(hp, hp).unwrap();
    assert_eq!(
        frees(&host.take_events()),
        vec![(ByteRange::new(hp, hp), order)]
    );
    assert_eq!(e.stats().huge_frees, 2);
}

/// A populate between punches un-punches a subpage: the huge page is not
/// completed until that subpage is punched again.
#[test]
fn invariant_1_no_completion_while_a_subpage_is_unpunched() {
    let order = 2;
    let (e, host) = file(order, 1, Attribute::Shared, true, None, Policy::Reject);
    e.punch(0, 3 * SUB).unwrap();
    e.populate(SUB, SUB).unwrap();
    e.punch(3 * SUB, SUB).unwrap();
    assert!(
        frees(&host.take_events()).is_empty(),
        "completed with subpage 1 un-punched"
    );
    assert_eq!(e.subpage_state(SUB), Ok(SubpageState::Present));
    e.punch(SUB, SUB).unwrap();
    assert_eq!(
        frees(&host.take_events()),
        vec![(ByteRange::new(0, 4 * SUB), order)]
    );
}

/// A host that checks, at every whole free, that the test had started a
/// punch of every subpage of the huge page (marked before calling punch).
struct WatchingHost {
    inner: Arc<RecordingHost>,
    order: u8,
    started: Vec<AtomicBool>,
    early: AtomicU64,
}

impl Host for WatchingHost {
    fn is_shared(&self, r: ByteRange) -> bool {
        self.inner.is_shared(r)
    }
    fn set_attributes(&self, r: ByteRange, to: Attribute) {
        self.inner.set_attributes(r, to)
    }
    fn invalidate_begin(&self, r: ByteRange, h: Hint) {
        self.inner.invalidate_begin(r, h)
    }
    fn invalidate_end(&self, r: ByteRange) {
        self.inner.invalidate_end(r)
    }
    fn allocate(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        self.inner.allocate(r, order)
    }
    fn free(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        if order == self.order {
            let subs = r.offset / SUB..r.end() / SUB;
            if !subs
                .clone()
                .all(|s| self.started[s as usize].load(Ordering::SeqCst))
            {
                self.early.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.inner.free(r, order)
    }
    fn zero(&self, r: ByteRange) {
        self.inner.zero(r)
    }
}

/// Concurrent: four threads punch the subpages of the same huge pages in
/// different orders; every huge page is freed exactly once (the recording
/// host panics on a double free), whole, and never before every one of its
/// subpages had been handed to `punch`.
#[test]
fn invariant_1_exactly_once_completion_under_concurrent_punches() {
    let _watchdog = Watchdog::arm("invariant_1_exactly_once_completion_under_concurrent_punches");
    let order = 3u8;
    let per = 1u64 << order;
    let hps = 4u64;
    let size = hps * per * SUB;
    for round in 0..150u64 {
        let inner = RecordingHost::new(size, Attribute::Shared, true);
        let host = Arc::new(WatchingHost {
            inner: inner.clone(),
            order,
            started: (0..hps * per).map(|_| AtomicBool::new(false)).collect(),
            early: AtomicU64::new(0),
        });
        let e = Arc::new(HugePunch::new(Config::new(size).order(order), host.clone()).unwrap());
        let start = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (e, host, start) = (e.clone(), host.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let mut subs: Vec<u64> = (0..hps * per).filter(|s| s % 4 == t).collect();
                    if (t + round) % 2 == 1 {
                        subs.reverse();
                    }
                    for s in subs {
                        host.started[s as usize].store(true, Ordering::SeqCst);
                        e.punch(s * SUB, SUB).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let ev = inner.events();
        let mut whole: Vec<u64> = frees(&ev)
            .iter()
            .map(|(r, o)| {
                assert_eq!(*o, order, "round {round}: a 4 KiB free without a budget");
                assert_eq!(r.len, per * SUB, "round {round}: a partial free");
                r.offset / (per * SUB)
            })
            .collect();
        whole.sort();
        assert_eq!(
            whole,
            (0..hps).collect::<Vec<_>>(),
            "round {round}: invariant 1: each huge page freed exactly once"
        );
        assert_eq!(
            host.early.load(Ordering::SeqCst),
            0,
            "round {round}: invariant 1: completed before every subpage was punched"
        );
        let s = e.stats();
        assert_eq!(
            (s.huge_frees, s.free_calls, s.pending_subpages),
            (hps, hps, 0),
            "round {round}"
        );
        assert_eq!(inner.resident_subpages(), 0);
    }
}

// ---------------------------------------------------------------------------
// Invariant 2
// ---------------------------------------------------------------------------

/// When `punch` returns, every possibly-private subpage of its range was
/// invalidated: one invalidation per huge page, exactly the part of the
/// range inside it, with that huge page's hint (the seed's example, a
/// range partly shared, a re-punch); an all-shared part is asked about and
/// deferred.
#[test]
fn invariant_2_no_deferred_invalidation_of_private_memory() {
    let (e, host) = file(9, 4, Attribute::Private, true, None, Policy::Reject);
    e.punch(0x1000, 0x401000).unwrap();
    let ev = host.take_events();
    assert_eq!(
        invalidations(&ev),
        vec![
            (ByteRange::new(0x1000, 0x1ff000), hint(0, 9)),
            (ByteRange::new(0x200000, 0x200000), hint(1, 9)),
            (ByteRange::new(0x400000, 0x2000), hint(2, 9)),
        ],
        "invariant 2: the seed's example"
    );
    // Each begin is closed by its end before punch returned.
    let ends: Vec<ByteRange> = ev
        .iter()
        .filter_map(|e| {
            if let Event::InvalidateEnd(r) = e {
                Some(*r)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        ends,
        invalidations(&ev)
            .iter()
            .map(|(r, _)| *r)
            .collect::<Vec<_>>()
    );
    assert_eq!(e.stats().invalidations_immediate, 2);

    // Re-punching already punched private subpages invalidates them again.
    e.punch(0x1000, 0x1000).unwrap();
    assert_eq!(
        invalidations(&host.take_events()),
        vec![(ByteRange::new(0x1000, 0x1000), hint(0, 9))]
    );

    // Huge page 3: one private subpage inside an otherwise shared range.
    let base = 0x600000;
    e.convert(base, 0x200000, Attribute::Shared).unwrap();
    e.convert(base + 0x5000, 0x1000, Attribute::Private)
        .unwrap();
    host.take_events();
    e.punch(base + 0x4000, 0x3000).unwrap();
    let ev = host.take_events();
    assert!(ev.contains(&Event::IsShared(ByteRange::new(base + 0x4000, 0x3000))));
    assert_eq!(
        invalidations(&ev),
        vec![(ByteRange::new(base + 0x4000, 0x3000), hint(3, 9))],
        "invariant 2: a partly private range must be invalidated now"
    );
    // An all-shared part: the check is asked, and the invalidation deferred.
    e.punch(base + 0x10000, 0x2000).unwrap();
    let ev = host.take_events();
    assert!(ev.contains(&Event::IsShared(ByteRange::new(base + 0x10000, 0x2000))));
    assert!(
        invalidations(&ev).is_empty(),
        "a shared partial punch is deferred: {ev:?}"
    );
    assert_eq!(e.stats().invalidations_immediate, 4);
}

/// Concurrent: two threads punch private subpages while a third converts
/// the last subpage of every huge page (never punched) back and forth: each
/// punch of a private subpage has issued its invalidation before it
/// returns (checked by the punching thread right after it returns).
#[test]
fn invariant_2_invalidation_issued_before_punch_returns_under_concurrency() {
    let _watchdog =
        Watchdog::arm("invariant_2_invalidation_issued_before_punch_returns_under_concurrency");
    let order = 3u8;
    let per = 1u64 << order;
    let size = 4 * per * SUB;
    for _ in 0..40 {
        let (e, host) = file(order, 4, Attribute::Private, true, None, Policy::Reject);
        let e = Arc::new(e);
        let converter = {
            let e = e.clone();
            std::thread::spawn(move || {
                for i in 0..4 * per {
                    let to = if i % 2 == 0 {
                        Attribute::Shared
                    } else {
                        Attribute::Private
                    };
                    e.convert(((i % 4) * per + per - 1) * SUB, SUB, to).unwrap();
                }
            })
        };
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let (e, host) = (e.clone(), host.clone());
                std::thread::spawn(move || {
                    for s in (0..size / SUB).filter(|s| s % 2 == t && s % per != per - 1) {
                        e.punch(s * SUB, SUB).unwrap();
                        let r = ByteRange::new(s * SUB, SUB);
                        let seen = host
                            .events()
                            .iter()
                            .any(|ev| matches!(ev, Event::InvalidateEnd(x) if covers(*x, r)));
                        assert!(
                            seen,
                            "invariant 2: punch of private {r:?} returned before its invalidation"
                        );
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        converter.join().unwrap();
        assert_eq!(e.stats().invalidations_immediate, 4 * (per - 1));
    }
}

// ---------------------------------------------------------------------------
// Invariant 3
// ---------------------------------------------------------------------------

/// Under `Reject`, a conversion to private over a pending punched bit is
/// refused with the offset of the first such subpage, whatever the
/// subpage's attribute; it calls no `set_attributes` and changes nothing
/// but `convert_calls` and `conversions_rejected`.
#[test]
fn invariant_3_no_conversion_to_private_over_pending_punch() {
    let order = 3;
    let hp = SUB << order;
    let (e, host) = file(order, 3, Attribute::Shared, true, None, Policy::Reject);
    e.punch(hp + 6 * SUB, SUB).unwrap(); // shared subpage, pending
    e.punch(hp + 2 * SUB, SUB).unwrap(); // the first pending one
    e.convert(2 * hp + SUB, SUB, Attribute::Private).unwrap();
    e.punch(2 * hp + SUB, SUB).unwrap(); // a private subpage, pending
    host.take_events();

    let cases = [
        (0, 3 * hp, hp + 2 * SUB),
        (hp + 3 * SUB, hp, hp + 6 * SUB),
        (2 * hp, SUB * 2, 2 * hp + SUB), // the subpage is already private
        (2 * hp + SUB, SUB, 2 * hp + SUB), // exactly it
        (hp - SUB, 4 * SUB, hp + 2 * SUB), // straddling into huge page 1
    ];
    for (offset, len, first) in cases {
        let before = e.stats();
        let states_before = states(&e);
        let attrs_before = host.attrs.lock().unwrap().clone();
        let res = e.convert(offset, len, Attribute::Private);
        assert_eq!(
            res,
            Err(Error::PendingPunch { offset: first }),
            "convert({offset:#x}, {len:#x})"
        );
        assert_eq!(res.unwrap_err().errno(), EAGAIN);
        let ev = host.take_events();
        assert!(
            !ev.iter().any(|e| matches!(e, Event::SetAttributes(..))),
            "invariant 3: refused but set_attributes called: {ev:?}"
        );
        assert!(
            !ev.iter().any(|e| matches!(
                e,
                Event::InvalidateBegin(..)
                    | Event::Free(..)
                    | Event::Zero(..)
                    | Event::Allocate(..)
            )),
            "{ev:?}"
        );
        let mut want = before;
        want.convert_calls += 1;
        want.conversions_rejected += 1;
        assert_eq!(
            e.stats(),
            want,
            "invariant 3: a refused conversion changes only its two counters"
        );
        assert_eq!(states(&e), states_before);
        assert_eq!(*host.attrs.lock().unwrap(), attrs_before);
    }
    // To shared is always allowed over pending punches.
    e.convert(hp, hp, Attribute::Shared).unwrap();
    assert_eq!(
        host.take_events(),
        vec![Event::SetAttributes(
            ByteRange::new(hp, hp),
            Attribute::Shared
        )]
    );
    assert_eq!(e.is_punched(hp + 2 * SUB), Ok(true));
    // Populate, and the retry succeeds.
    e.populate(hp, hp).unwrap();
    e.convert(hp, hp, Attribute::Private).unwrap();
    assert!(host.take_events().contains(&Event::SetAttributes(
        ByteRange::new(hp, hp),
        Attribute::Private
    )));
    let s = e.stats();
    assert_eq!(s.convert_calls, s.conversions_ok + s.conversions_rejected);
}

/// Concurrent: a punch of a shared subpage racing its conversion to
/// private. Either the conversion is refused (the punch's bit was pending)
/// or it succeeded and the punch, which left the subpage punched, saw it
/// private or converting and invalidated it before returning (invariants 2
/// and 3).
#[test]
fn invariant_3_punch_racing_conversion_to_private() {
    let _watchdog = Watchdog::arm("invariant_3_punch_racing_conversion_to_private");
    let order = 2u8;
    let target = ByteRange::new(SUB, SUB);
    let (mut refused, mut converted) = (0, 0);
    for round in 0..400 {
        let (e, host) = file(order, 1, Attribute::Shared, true, None, Policy::Reject);
        let e = Arc::new(e);
        let start = Arc::new(Barrier::new(2));
        let puncher = {
            let (e, start) = (e.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                e.punch(target.offset, SUB).unwrap()
            })
        };
        let converter = {
            let (e, start) = (e.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                e.convert(0, 2 * SUB, Attribute::Private)
            })
        };
        puncher.join().unwrap();
        let res = converter.join().unwrap();
        assert_eq!(e.is_punched(target.offset), Ok(true));
        let ev = host.events();
        match res {
            Err(err) => {
                assert_eq!(
                    err,
                    Error::PendingPunch {
                        offset: target.offset
                    },
                    "round {round}"
                );
                assert!(
                    !ev.iter().any(|x| matches!(x, Event::SetAttributes(..))),
                    "round {round}: refused, yet converted"
                );
                refused += 1;
            }
            Ok(()) => {
                let invalidated = ev
                    .iter()
                    .any(|x| matches!(x, Event::InvalidateEnd(r) if covers(*r, target)));
                assert!(
                    invalidated,
                    "round {round}: invariant 3: converted to private over a pending punch that was never invalidated: {ev:?}"
                );
                converted += 1;
            }
        }
        let s = e.stats();
        assert_eq!(s.convert_calls, s.conversions_ok + s.conversions_rejected);
    }
    assert_eq!(refused + converted, 400);
}

/// A flag one thread raises and another waits for (with a timeout, so a
/// broken engine fails the test instead of hanging it).
#[derive(Default)]
struct Signal(Mutex<bool>, std::sync::Condvar);

impl Signal {
    fn raise(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }
    fn wait(&self, secs: u64) -> bool {
        let g = self.0.lock().unwrap();
        let (g, _) = self
            .1
            .wait_timeout_while(g, std::time::Duration::from_secs(secs), |raised| !*raised)
            .unwrap();
        *g
    }
}

/// A host whose `set_attributes` (to private) holds the conversion open
/// until the test has punched.
struct SlowConversionHost {
    inner: Arc<RecordingHost>,
    converting: Signal,
    punched: Signal,
}

impl Host for SlowConversionHost {
    fn is_shared(&self, r: ByteRange) -> bool {
        self.inner.is_shared(r)
    }
    fn set_attributes(&self, r: ByteRange, to: Attribute) {
        if to == Attribute::Private {
            self.converting.raise();
            self.punched.wait(5);
        }
        self.inner.set_attributes(r, to)
    }
    fn invalidate_begin(&self, r: ByteRange, h: Hint) {
        self.inner.invalidate_begin(r, h)
    }
    fn invalidate_end(&self, r: ByteRange) {
        self.inner.invalidate_end(r)
    }
    fn allocate(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        self.inner.allocate(r, order)
    }
    fn free(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        self.inner.free(r, order)
    }
    fn zero(&self, r: ByteRange) {
        self.inner.zero(r)
    }
}

/// Deterministic form of the race above: a conversion to private has
/// checked the range (nothing pending) and is inside `set_attributes`, the
/// attribute still shared, when a punch of a subpage of that range runs.
/// The conversion goes ahead, so the punch must not trust the shared-state
/// check: it must invalidate now (and it must not wait for the conversion,
/// SPEC.md §5).
#[test]
fn invariant_3_punch_during_conversion_is_invalidated_now() {
    let _watchdog = Watchdog::arm("invariant_3_punch_during_conversion_is_invalidated_now");
    let order = 2u8;
    let size = SUB << order;
    let inner = RecordingHost::new(size, Attribute::Shared, true);
    let host = Arc::new(SlowConversionHost {
        inner: inner.clone(),
        converting: Signal::default(),
        punched: Signal::default(),
    });
    let e = Arc::new(HugePunch::new(Config::new(size).order(order), host.clone()).unwrap());
    let converter = {
        let e = e.clone();
        std::thread::spawn(move || e.convert(0, 2 * SUB, Attribute::Private))
    };
    assert!(
        host.converting.wait(5),
        "the conversion never reached set_attributes"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let e = e.clone();
        std::thread::spawn(move || tx.send(e.punch(SUB, SUB)).unwrap());
    }
    let punched = rx.recv_timeout(std::time::Duration::from_secs(3));
    host.punched.raise();
    assert_eq!(
        punched,
        Ok(Ok(())),
        "SPEC.md §5: a punch waited for a conversion in flight"
    );
    assert_eq!(converter.join().unwrap(), Ok(()));
    assert_eq!(e.is_punched(SUB), Ok(true));
    let ev = inner.events();
    let target = ByteRange::new(SUB, SUB);
    assert!(
        ev.iter().any(|x| matches!(x, Event::InvalidateEnd(r) if covers(*r, target))),
        "invariants 2 and 3: a punch during a conversion to private trusted the shared-state check: {ev:?}"
    );
    assert_eq!(e.stats().invalidations_immediate, 1);
}

/// `CancelAndZero` un-punches (zeroing) the pending subpages, then converts.
#[test]
fn invariant_3_cancel_and_zero_unpunches_then_converts() {
    let order = 2;
    let (e, host) = file(
        order,
        2,
        Attribute::Shared,
        true,
        None,
        Policy::CancelAndZero,
    );
    e.punch(SUB, 2 * SUB).unwrap();
    e.punch(5 * SUB, SUB).unwrap();
    host.take_events();
    e.convert(2 * SUB, 4 * SUB, Attribute::Private).unwrap();
    let ev: Vec<Event> = host
        .take_events()
        .into_iter()
        .filter(|e| !matches!(e, Event::IsShared(_)))
        .collect();
    let zeroed: Vec<u64> = ev
        .iter()
        .filter_map(|e| {
            if let Event::Zero(r) = e {
                Some(r)
            } else {
                None
            }
        })
        .flat_map(|r| r.offset / SUB..r.end() / SUB)
        .collect();
    assert_eq!(
        zeroed,
        vec![2, 5],
        "the pending subpages in the range are zeroed"
    );
    assert_eq!(
        ev.last(),
        Some(&Event::SetAttributes(
            ByteRange::new(2 * SUB, 4 * SUB),
            Attribute::Private
        )),
        "zero before converting"
    );
    assert_eq!(
        e.is_punched(SUB),
        Ok(true),
        "outside the range: still pending"
    );
    assert_eq!(e.is_punched(2 * SUB), Ok(false));
    let s = e.stats();
    assert_eq!(
        (
            s.conversions_ok,
            s.conversions_rejected,
            s.repopulated_subpages,
            s.pending_subpages
        ),
        (1, 0, 2, 1)
    );
}

// ---------------------------------------------------------------------------
// Invariant 4
// ---------------------------------------------------------------------------

/// Every free is covered by an invalidation issued before it in the same
/// operation, in every path that frees (completion, `Split` punch, forced
/// split by the shrinker and by `flush`, teardown); and a subpage populated
/// after its punch is never freed by a later forced split (of the shrinker
/// or of `flush`) nor completed away.
#[test]
fn invariant_4_no_free_without_invalidation_and_no_free_of_repopulated() {
    let order = 3;
    let hp = SUB << order;
    let (e, host) = file(
        order,
        4,
        Attribute::Shared,
        true,
        Some(4 * SUB),
        Policy::Reject,
    );
    let mut checked = 0;
    // The events of the last operation; each free covered by an earlier
    // invalidation of the same operation.
    let mut step = |what: &str| -> Vec<(ByteRange, u8)> {
        let ev = host.take_events();
        let mut seen: Vec<ByteRange> = Vec::new();
        for x in &ev {
            match x {
                Event::InvalidateBegin(r, _) => seen.push(*r),
                Event::Free(r, _) | Event::FreeFailed(r, _) => {
                    assert!(
                        seen.iter().any(|i| covers(*i, *r)),
                        "invariant 4: {what}: free of {r:?} not invalidated first: {ev:?}"
                    );
                    checked += 1;
                }
                _ => {}
            }
        }
        frees(&ev)
    };
    let repopulated = ByteRange::new(hp + 3 * SUB, SUB);
    // Huge page 1: subpages 0..4 punched, then 3 populated again.
    e.punch(hp, 4 * SUB).unwrap();
    e.populate(repopulated.offset, SUB).unwrap();
    assert_eq!(
        e.subpage_state(repopulated.offset),
        Ok(SubpageState::Present)
    );
    step("populate");
    // 4..8 punched: every subpage but 3 is punched; no completion; over
    // budget, the shrinker splits huge page 1 and must keep subpage 3.
    e.punch(hp + 4 * SUB, 4 * SUB).unwrap();
    let fr = step("shrinker");
    assert_eq!(
        fr,
        vec![
            (ByteRange::new(hp, 3 * SUB), 0),
            (ByteRange::new(hp + 4 * SUB, 4 * SUB), 0)
        ]
    );
    assert!(
        fr.iter().all(|(r, _)| !covers(*r, repopulated)),
        "invariant 4: the shrinker freed a repopulated subpage"
    );
    assert_eq!(e.backing(1), Ok(Backing::Split));
    assert_eq!(
        e.subpage_state(repopulated.offset),
        Ok(SubpageState::Present)
    );
    assert!(
        host.is_resident(repopulated.offset),
        "invariant 4: the repopulated subpage was freed"
    );
    e.punch(hp + 5 * SUB, SUB).unwrap(); // Split, absent already: nothing to free
    assert!(step("split punch of absent").is_empty());
    e.punch(hp + 2 * SUB, 2 * SUB).unwrap(); // Split: subpage 3, punched again, freed now
    assert_eq!(step("split punch"), vec![(repopulated, 0)]);
    assert!(!host.is_resident(repopulated.offset));
    assert_eq!(
        e.backing(1),
        Ok(Backing::Absent),
        "a Split huge page with nothing present is Absent"
    );
    // Huge page 2: completion.
    e.punch(2 * hp, hp).unwrap();
    assert_eq!(
        step("completion"),
        vec![(ByteRange::new(2 * hp, hp), order)]
    );
    // Huge page 3: two punched, one populated again, flush.
    e.punch(3 * hp, 2 * SUB).unwrap();
    e.populate(3 * hp + SUB, SUB).unwrap();
    e.flush(3 * hp, SUB).unwrap();
    assert_eq!(step("flush"), vec![(ByteRange::new(3 * hp, SUB), 0)]);
    assert_eq!(e.subpage_state(3 * hp + SUB), Ok(SubpageState::Present));
    assert!(
        host.is_resident(3 * hp + SUB),
        "invariant 4: flush freed a repopulated subpage"
    );
    e.teardown();
    assert_eq!(
        step("teardown").len(),
        2,
        "huge page 0 whole, huge page 3's present run"
    );
    assert!(checked >= 7, "only {checked} frees checked");
    assert_eq!(host.resident_subpages(), 0);
}

/// Concurrent: a populate racing the punch that completes the huge page.
/// Whoever wins, the populated subpage is allocated and present when
/// `populate` returns (a completion never frees a subpage a populate
/// un-punched; the populate retries after a completion in flight).
#[test]
fn invariant_4_populate_racing_the_completing_punch() {
    let _watchdog = Watchdog::arm("invariant_4_populate_racing_the_completing_punch");
    let order = 2u8;
    let size = 4 * SUB;
    for round in 0..400 {
        let (e, host) = file(order, 1, Attribute::Shared, true, None, Policy::Reject);
        e.punch(SUB, 3 * SUB).unwrap();
        let e = Arc::new(e);
        let start = Arc::new(Barrier::new(2));
        let puncher = {
            let (e, start) = (e.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                e.punch(0, SUB).unwrap()
            })
        };
        let populator = {
            let (e, host, start) = (e.clone(), host.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                e.populate(2 * SUB, SUB).unwrap();
                assert!(
                    host.is_resident(2 * SUB),
                    "round {round}: invariant 4: populated subpage not allocated"
                );
            })
        };
        puncher.join().unwrap();
        populator.join().unwrap();
        assert_eq!(
            e.subpage_state(2 * SUB),
            Ok(SubpageState::Present),
            "round {round}"
        );
        assert!(
            host.is_resident(2 * SUB),
            "round {round}: invariant 4: a completion freed a populated subpage"
        );
        let ev = host.events();
        let whole = frees(&ev).iter().filter(|(r, _)| r.len == size).count();
        let s = e.stats();
        assert!(
            whole <= 1 && s.huge_frees as usize == whole,
            "round {round}: {ev:?}"
        );
        if whole == 1 {
            // Completed first, then populate allocated a new life.
            assert!(ev.contains(&Event::Allocate(ByteRange::new(0, size), order)));
            assert_eq!(s.pending_subpages, 0);
        } else {
            assert_eq!(s.pending_subpages, 3);
            assert_eq!(e.subpage_state(0), Ok(SubpageState::Punched));
        }
    }
}

/// A host whose whole free (a completion) holds until the test lets it go.
struct SlowCompletionHost {
    inner: Arc<RecordingHost>,
    order: u8,
    freeing: Signal,
    go: Signal,
}

impl Host for SlowCompletionHost {
    fn is_shared(&self, r: ByteRange) -> bool {
        self.inner.is_shared(r)
    }
    fn set_attributes(&self, r: ByteRange, to: Attribute) {
        self.inner.set_attributes(r, to)
    }
    fn invalidate_begin(&self, r: ByteRange, h: Hint) {
        self.inner.invalidate_begin(r, h)
    }
    fn invalidate_end(&self, r: ByteRange) {
        self.inner.invalidate_end(r)
    }
    fn allocate(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        self.inner.allocate(r, order)
    }
    fn free(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        if order == self.order {
            self.freeing.raise();
            self.go.wait(5);
        }
        self.inner.free(r, order)
    }
    fn zero(&self, r: ByteRange) {
        self.inner.zero(r)
    }
}

/// Deterministic form of the race: a populate of a punched subpage arrives
/// while the completion of its huge page is freeing it. The populate must
/// not un-punch what is being freed; it waits for the completion and
/// allocates a new life, so when it returns the subpage is allocated.
#[test]
fn invariant_4_populate_during_completion_waits_and_reallocates() {
    let _watchdog = Watchdog::arm("invariant_4_populate_during_completion_waits_and_reallocates");
    let order = 2u8;
    let size = SUB << order;
    let inner = RecordingHost::new(size, Attribute::Shared, true);
    let host = Arc::new(SlowCompletionHost {
        inner: inner.clone(),
        order,
        freeing: Signal::default(),
        go: Signal::default(),
    });
    let e = Arc::new(HugePunch::new(Config::new(size).order(order), host.clone()).unwrap());
    e.punch(0, 3 * SUB).unwrap();
    let completer = {
        let e = e.clone();
        std::thread::spawn(move || e.punch(3 * SUB, SUB))
    };
    assert!(host.freeing.wait(5), "the completion never reached free");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (e, inner) = (e.clone(), inner.clone());
        std::thread::spawn(move || {
            let res = e.populate(SUB, SUB);
            tx.send((res, inner.is_resident(SUB))).unwrap();
        });
    }
    // Give a broken populate time to un-punch under the completion.
    let early = rx.recv_timeout(std::time::Duration::from_millis(100));
    host.go.raise();
    assert_eq!(completer.join().unwrap(), Ok(()));
    let (res, resident) = match early {
        Ok(v) => v,
        Err(_) => rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("populate never returned"),
    };
    assert_eq!(res, Ok(()));
    assert!(
        resident,
        "invariant 4: populate returned with its subpage not allocated"
    );
    assert_eq!(e.subpage_state(SUB), Ok(SubpageState::Present));
    assert!(
        inner.is_resident(SUB),
        "invariant 4: the completion freed a subpage the populate un-punched"
    );
    let ev = inner.events();
    let free_at = ev
        .iter()
        .position(|x| *x == Event::Free(ByteRange::new(0, size), order))
        .expect("the completion freed");
    let alloc_at = ev
        .iter()
        .position(|x| *x == Event::Allocate(ByteRange::new(0, size), order));
    assert!(
        alloc_at.is_some_and(|a| a > free_at),
        "invariant 4: populate must allocate a new life after the completion: {ev:?}"
    );
    let s = e.stats();
    assert_eq!(
        (s.huge_frees, s.repopulated_subpages, s.pending_subpages),
        (1, 0, 0)
    );
}

// ---------------------------------------------------------------------------
// Invariant 5
// ---------------------------------------------------------------------------

/// A host that keeps the content of every subpage (one byte stands for its
/// 4 KiB): allocation gives zeros, `zero` clears, the test writes.
struct DataHost {
    inner: Arc<RecordingHost>,
    data: Mutex<Vec<u8>>,
}

impl DataHost {
    fn write(&self, offset: u64, v: u8) {
        assert!(
            self.inner.is_resident(offset),
            "writing unallocated memory at {offset:#x}"
        );
        self.data.lock().unwrap()[(offset / SUB) as usize] = v;
    }
    fn read(&self, offset: u64) -> u8 {
        self.data.lock().unwrap()[(offset / SUB) as usize]
    }
    fn fill(&self, r: ByteRange, v: u8) {
        self.data.lock().unwrap()[(r.offset / SUB) as usize..(r.end() / SUB) as usize]
            .iter_mut()
            .for_each(|b| *b = v);
    }
}

impl Host for DataHost {
    fn is_shared(&self, r: ByteRange) -> bool {
        self.inner.is_shared(r)
    }
    fn set_attributes(&self, r: ByteRange, to: Attribute) {
        self.inner.set_attributes(r, to)
    }
    fn invalidate_begin(&self, r: ByteRange, h: Hint) {
        self.inner.invalidate_begin(r, h)
    }
    fn invalidate_end(&self, r: ByteRange) {
        self.inner.invalidate_end(r)
    }
    fn allocate(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        self.fill(r, 0);
        self.inner.allocate(r, order)
    }
    fn free(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        let res = self.inner.free(r, order);
        if res.is_ok() {
            // Freed memory holds garbage as far as this file is concerned.
            self.fill(r, 0xEE);
        }
        res
    }
    fn zero(&self, r: ByteRange) {
        self.fill(r, 0);
        self.inner.zero(r)
    }
}

/// A punched subpage that is populated again reads as zeros, and its
/// `zero` was called before `populate` returned; untouched neighbours keep
/// their data; a huge mapping never covers a punched subpage.
#[test]
fn invariant_5_repopulated_subpage_reads_as_zeros() {
    let order = 3u8;
    let per = 1u64 << order;
    let size = 2 * per * SUB;
    let inner = RecordingHost::new(size, Attribute::Private, true);
    let host = Arc::new(DataHost {
        inner: inner.clone(),
        data: Mutex::new(vec![0; (size / SUB) as usize]),
    });
    let e = HugePunch::new(Config::new(size).order(order), host.clone()).unwrap();
    for s in 0..size / SUB {
        host.write(s * SUB, 0xA0 + s as u8);
    }
    e.punch(2 * SUB, 3 * SUB).unwrap();
    assert_eq!(
        e.max_mapping_order(0),
        Ok(0),
        "a huge mapping would cover punched subpages"
    );
    assert_eq!(
        e.pending_ranges(0, size),
        Ok(vec![ByteRange::new(2 * SUB, 3 * SUB)])
    );
    inner.take_events();
    e.populate(0, 4 * SUB).unwrap();
    let ev = inner.take_events();
    let zeroed: Vec<u64> = ev
        .iter()
        .filter_map(|e| {
            if let Event::Zero(r) = e {
                Some(*r)
            } else {
                None
            }
        })
        .flat_map(|r| r.offset / SUB..r.end() / SUB)
        .collect();
    assert_eq!(
        zeroed,
        vec![2, 3],
        "invariant 5: populate must zero exactly the punched subpages it un-punches"
    );
    assert_eq!(
        host.read(2 * SUB),
        0,
        "invariant 5: stale data after populate"
    );
    assert_eq!(
        host.read(3 * SUB),
        0,
        "invariant 5: stale data after populate"
    );
    assert_eq!(host.read(SUB), 0xA1, "a present subpage was zeroed");
    assert_eq!(
        e.subpage_state(4 * SUB),
        Ok(SubpageState::Punched),
        "outside the range: still punched"
    );
    assert_eq!(e.stats().repopulated_subpages, 2);
    // Re-populating present memory does not zero it.
    e.populate(0, 4 * SUB).unwrap();
    assert!(!inner
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::Zero(_))));
    assert_eq!(host.read(SUB), 0xA1);
    // The last punched subpage, populated: whole again, huge mapping allowed.
    e.populate(4 * SUB, SUB).unwrap();
    assert_eq!(host.read(4 * SUB), 0);
    assert_eq!(e.max_mapping_order(0), Ok(order));
    // A Split huge page: punched subpages freed, repopulated as fresh (zero)
    // memory.
    let (e2, host2) = file(order, 1, Attribute::Shared, true, Some(0), Policy::Reject);
    e2.punch(SUB, SUB).unwrap();
    assert_eq!(e2.backing(0), Ok(Backing::Split));
    host2.take_events();
    e2.populate(0, per * SUB).unwrap();
    assert_eq!(
        host2.take_events(),
        vec![Event::Allocate(ByteRange::new(SUB, SUB), 0)]
    );
    assert_eq!(
        e2.backing(0),
        Ok(Backing::Split),
        "a Split huge page stays Split"
    );
    assert_eq!(e2.max_mapping_order(0), Ok(0));
}

/// A forced split whose 4 KiB free fails leaves the punched subpages
/// present: they must read as zeros.
#[test]
fn invariant_5_failed_small_free_leaves_zeros() {
    let order = 2u8;
    let (e, host) = file(order, 1, Attribute::Shared, true, None, Policy::Reject);
    e.punch(SUB, SUB).unwrap();
    host.take_events();
    host.fail_next_frees.store(1, Ordering::SeqCst);
    e.flush(0, SUB).unwrap();
    let ev = host.take_events();
    assert!(
        ev.contains(&Event::FreeFailed(ByteRange::new(SUB, SUB), 0)),
        "{ev:?}"
    );
    assert_eq!(e.subpage_state(SUB), Ok(SubpageState::Present));
    assert!(host.is_resident(SUB));
    assert!(
        ev.contains(&Event::Zero(ByteRange::new(SUB, SUB))),
        "invariant 5: punched data made present again unzeroed: {ev:?}"
    );
    assert_eq!(e.stats().free_errors, 1);
}

/// The same for a punch of a `Split` huge page whose 4 KiB free fails: the
/// subpage stays present (SPEC.md §2: "a failed 4 KiB free leaves those
/// subpages present"), so populate has nothing to un-punch, and the guest
/// that punched it would read its old content unless the engine zeroes it
/// when the free fails (as the forced split does).
#[test]
fn invariant_5_failed_split_punch_free_leaves_zeros() {
    let order = 2u8;
    let per = 1u64 << order;
    let size = per * SUB;
    let inner = RecordingHost::new(size, Attribute::Shared, true);
    let host = Arc::new(DataHost {
        inner: inner.clone(),
        data: Mutex::new(vec![0; per as usize]),
    });
    let e = HugePunch::new(Config::new(size).order(order), host.clone()).unwrap();
    for s in 0..per {
        host.write(s * SUB, 0xA0 + s as u8);
    }
    // Make huge page 0 Split: subpage 0 punched and force-split out.
    e.punch(0, SUB).unwrap();
    e.flush(0, SUB).unwrap();
    assert_eq!(e.backing(0), Ok(Backing::Split));
    inner.take_events();
    // Punch subpage 2; its free fails.
    inner.fail_next_frees.store(1, Ordering::SeqCst);
    e.punch(2 * SUB, SUB).unwrap();
    let ev = inner.take_events();
    assert!(
        ev.contains(&Event::FreeFailed(ByteRange::new(2 * SUB, SUB), 0)),
        "{ev:?}"
    );
    assert_eq!(
        e.subpage_state(2 * SUB),
        Ok(SubpageState::Present),
        "a failed 4 KiB free leaves the subpage present"
    );
    assert!(inner.is_resident(2 * SUB));
    // The guest faults it in again and reads it.
    e.populate(2 * SUB, SUB).unwrap();
    assert_eq!(
        host.read(2 * SUB),
        0,
        "invariant 5: a punched subpage whose free failed reads its old content after populate \
         (events of the punch: {ev:?})"
    );
}

// ---------------------------------------------------------------------------
// Invariant 6
// ---------------------------------------------------------------------------

/// Subpage accounting from the host's events: allocated (initial +
/// allocations) = freed + pending + live, live being present subpages.
fn check_balance(e: &HugePunch, host: &RecordingHost, initial: u64, what: &str) {
    let ev = host.events();
    let allocated: u64 = initial
        + ev.iter()
            .map(|x| {
                if let Event::Allocate(r, _) = x {
                    r.len / SUB
                } else {
                    0
                }
            })
            .sum::<u64>();
    let freed: u64 = ev
        .iter()
        .map(|x| {
            if let Event::Free(r, _) = x {
                r.len / SUB
            } else {
                0
            }
        })
        .sum();
    let pending = e.stats().pending_subpages;
    let st = states(e);
    let live = st.iter().filter(|s| **s == SubpageState::Present).count() as u64;
    let punched = st.iter().filter(|s| **s == SubpageState::Punched).count() as u64;
    assert_eq!(
        punched, pending,
        "{what}: pending_subpages vs punched subpages"
    );
    assert_eq!(
        freed + pending + live,
        allocated,
        "invariant 6: {what}: freed + pending + live != allocated"
    );
    assert_eq!(
        host.resident_subpages(),
        pending + live,
        "invariant 6: {what}: host residency"
    );
}

/// freed + pending + live = allocated after every operation of a mixed
/// sequence with failing frees; after teardown every allocated subpage was
/// freed exactly once (the recording host panics on a double free).
#[test]
fn invariant_6_nothing_leaked() {
    for (policy, budget, populated) in [
        (Policy::Reject, None, true),
        (Policy::CancelAndZero, Some(3 * SUB), false),
        (Policy::Reject, Some(0), true),
    ] {
        let order = 3u8;
        let hp = SUB << order;
        let (e, host) = file(order, 4, Attribute::Shared, populated, budget, policy);
        let initial = if populated { 4 << order } else { 0 };
        let mut rng = 0x9e3779b97f4a7c15u64;
        for step in 0..300 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = rng >> 33;
            let first = r % 32;
            let len = (1 + (r >> 5) % 6).min(32 - first);
            let (o, l) = (first * SUB, len * SUB);
            let _ = match (r >> 8) % 10 {
                0..=3 => e.punch(o, l),
                4 => e.punch((first % 4) * hp, hp),
                5 | 6 => e.populate(o, l),
                7 => e.convert(
                    o,
                    l,
                    if r & 1 == 0 {
                        Attribute::Private
                    } else {
                        Attribute::Shared
                    },
                ),
                8 => e.flush(o, l),
                _ => {
                    host.fail_next_frees.store(1 + r % 2, Ordering::SeqCst);
                    Ok(())
                }
            };
            check_balance(
                &e,
                &host,
                initial,
                &format!("{policy:?} {budget:?} step {step}"),
            );
        }
        // A teardown whose free fails says what is still allocated ...
        host.fail_next_frees.store(1, Ordering::SeqCst);
        let report = e.teardown();
        let left: u64 = report.still_allocated.iter().map(|r| r.len / SUB).sum();
        assert_eq!(
            host.resident_subpages(),
            left,
            "teardown's report names what is still allocated"
        );
        // ... and a second teardown frees it.
        let again = e.teardown();
        assert!(again.still_allocated.is_empty());
        assert_eq!(
            host.resident_subpages(),
            0,
            "invariant 6: leaked after teardown"
        );
        let ev = host.events();
        let allocated: u64 = initial
            + ev.iter()
                .map(|x| {
                    if let Event::Allocate(r, _) = x {
                        r.len / SUB
                    } else {
                        0
                    }
                })
                .sum::<u64>();
        let freed: u64 = ev
            .iter()
            .map(|x| {
                if let Event::Free(r, _) = x {
                    r.len / SUB
                } else {
                    0
                }
            })
            .sum();
        assert_eq!(
            freed, allocated,
            "invariant 6: every allocated subpage freed exactly once"
        );
        assert_eq!(e.stats().pending_subpages, 0);
        // A third teardown does nothing.
        host.take_events();
        assert!(e.teardown().still_allocated.is_empty());
        assert!(
            host.take_events().is_empty(),
            "a teardown after a complete one must do nothing"
        );
    }
}

/// A completion whose free fails loses nothing: the huge page stays `Huge`
/// with every subpage pending, counted in `free_errors`; a later `flush`
/// frees it whole (`huge_frees`, not a forced split).
#[test]
fn invariant_6_failed_completion_free_is_retried_by_flush() {
    let order = 3u8;
    let hp = SUB << order;
    let (e, host) = file(order, 2, Attribute::Shared, true, None, Policy::Reject);
    host.fail_next_frees.store(1, Ordering::SeqCst);
    e.punch(hp, hp).unwrap();
    let ev = host.take_events();
    assert!(ev.contains(&Event::FreeFailed(ByteRange::new(hp, hp), order)));
    assert_eq!(e.backing(1), Ok(Backing::Huge));
    assert_eq!(e.pending_ranges(hp, hp), Ok(vec![ByteRange::new(hp, hp)]));
    assert!((0..8).all(|s| e.is_punched(hp + s * SUB) == Ok(true)));
    assert_eq!(e.max_mapping_order(1), Ok(0));
    assert!(
        host.is_resident(hp) && host.is_resident(2 * hp - SUB),
        "a failed free lost memory"
    );
    let s = e.stats();
    assert_eq!(
        (
            s.free_errors,
            s.huge_frees,
            s.pending_subpages,
            s.free_calls
        ),
        (1, 0, 8, 1)
    );
    // Conversions over it are refused: it is pending.
    assert_eq!(
        e.convert(hp, SUB, Attribute::Private),
        Err(Error::PendingPunch { offset: hp })
    );

    e.flush(hp + SUB, SUB).unwrap();
    let ev = host.take_events();
    assert_eq!(
        ev,
        vec![
            Event::InvalidateBegin(ByteRange::new(hp, hp), hint(1, order)),
            Event::Free(ByteRange::new(hp, hp), order),
            Event::InvalidateEnd(ByteRange::new(hp, hp)),
        ],
        "flush frees a failed completion whole"
    );
    let s = e.stats();
    assert_eq!(
        (
            s.huge_frees,
            s.forced_splits,
            s.pending_subpages,
            s.free_calls
        ),
        (1, 0, 0, 2)
    );
    assert_eq!(e.backing(1), Ok(Backing::Absent));
    assert_eq!(host.resident_subpages(), 8, "huge page 0 only");
}

/// ... or teardown frees it whole (`teardown_frees`).
#[test]
fn invariant_6_failed_completion_free_is_retried_by_teardown() {
    let order = 2u8;
    let hp = SUB << order;
    let (e, host) = file(order, 2, Attribute::Private, true, None, Policy::Reject);
    host.fail_next_frees.store(1, Ordering::SeqCst);
    e.punch(0, 3 * SUB).unwrap();
    e.punch(3 * SUB, SUB).unwrap(); // completes, free fails
    assert_eq!(e.stats().free_errors, 1);
    assert_eq!(e.stats().pending_subpages, 4);
    host.take_events();
    let report = e.teardown();
    assert!(report.still_allocated.is_empty());
    let fr = frees(&host.take_events());
    assert_eq!(
        fr,
        vec![
            (ByteRange::new(0, hp), order),
            (ByteRange::new(hp, hp), order)
        ]
    );
    let s = e.stats();
    assert_eq!(
        (
            s.teardown_frees,
            s.huge_frees,
            s.pending_subpages,
            s.free_errors
        ),
        (2, 0, 0, 1)
    );
    assert_eq!(host.resident_subpages(), 0);
}

/// ... or the shrinker frees it whole (`huge_frees`), before splitting
/// anything else.
#[test]
fn invariant_6_failed_completion_free_is_retried_by_the_shrinker() {
    let order = 2u8;
    let hp = SUB << order;
    let (e, host) = file(
        order,
        2,
        Attribute::Shared,
        true,
        Some(4 * SUB),
        Policy::Reject,
    );
    host.fail_next_frees.store(1, Ordering::SeqCst);
    e.punch(0, hp).unwrap(); // completion fails: 4 pending, within budget
    assert_eq!(e.stats().pending_subpages, 4);
    host.take_events();
    e.punch(hp, SUB).unwrap(); // 5 pending: over budget
    let ev = host.take_events();
    assert_eq!(
        frees(&ev),
        vec![(ByteRange::new(0, hp), order)],
        "the shrinker frees the failed completion whole first"
    );
    let s = e.stats();
    assert_eq!(
        (s.huge_frees, s.forced_splits, s.pending_subpages),
        (1, 0, 1)
    );
    assert_eq!(e.backing(0), Ok(Backing::Absent));
    assert_eq!(e.backing(1), Ok(Backing::Huge));
}

// ---------------------------------------------------------------------------
// Invariant 7
// ---------------------------------------------------------------------------

/// With a budget, pending bytes after every operation of a random-ish
/// sequence are within it, and so is `pending_bytes_peak`.
#[test]
fn invariant_7_bounded_deferral() {
    for (order, hps, budget) in [
        (3u8, 6u64, 0u64),
        (3, 6, 5 * SUB),
        (2, 8, SUB),
        (9, 3, 700 * SUB),
        (9, 2, 1 << 20),
    ] {
        let per = 1u64 << order;
        let total = hps * per;
        let (e, host) = file(
            order,
            hps,
            Attribute::Shared,
            true,
            Some(budget),
            Policy::Reject,
        );
        let mut rng = 0x2545f4914f6cdd1du64 ^ budget;
        for step in 0..400 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let first = rng % total;
            let len = if rng >> 60 == 0 {
                per
            } else {
                1 + (rng >> 20) % per.min(9)
            };
            let len = len.min(total - first);
            let (o, l) = (first * SUB, len * SUB);
            match (rng >> 40) % 8 {
                0..=4 => e.punch(o, l).unwrap(),
                5 => e.populate(o, l).unwrap(),
                6 => {
                    let _ = e.convert(
                        o,
                        l,
                        if rng & 1 == 0 {
                            Attribute::Private
                        } else {
                            Attribute::Shared
                        },
                    );
                }
                _ => e.flush(o, l).unwrap(),
            }
            let s = e.stats();
            assert!(
                s.pending_subpages * SUB <= budget,
                "invariant 7: order {order} budget {budget}: step {step}: {} pending bytes",
                s.pending_subpages * SUB
            );
            assert!(
                s.pending_bytes_peak <= budget,
                "invariant 7: peak {} above budget {budget}",
                s.pending_bytes_peak
            );
        }
        assert!(e.stats().punch_calls > 100);
        if budget > 0 {
            assert!(
                e.stats().forced_splits > 0,
                "the sequence never reached the budget"
            );
        }
        e.teardown();
        assert_eq!(host.resident_subpages(), 0);
    }
}

/// The shrinker splits the huge page with the most punched subpages first,
/// the lowest-addressed between equals: one invalidation of the whole huge
/// page, then one free per punched run, and it is left `Split`.
#[test]
fn invariant_7_shrinker_order_and_shape() {
    let order = 3u8;
    let hp = SUB << order;
    let (e, host) = file(
        order,
        4,
        Attribute::Shared,
        true,
        Some(8 * SUB),
        Policy::Reject,
    );
    e.punch(0, 2 * SUB).unwrap(); // huge page 0: 2
    e.punch(hp + SUB, SUB).unwrap(); // huge page 1: 3, in two runs
    e.punch(hp + 4 * SUB, 2 * SUB).unwrap();
    e.punch(3 * hp + 2 * SUB, 3 * SUB).unwrap(); // huge page 3: 3 (8 pending: at the budget)
    assert_eq!(
        e.stats().forced_splits,
        0,
        "exactly at the budget is within it"
    );
    host.take_events();
    e.punch(2 * hp, SUB).unwrap(); // 9 pending: split one
    let ev = host.take_events();
    let whole = ByteRange::new(hp, hp);
    assert_eq!(
        ev.iter()
            .filter(|e| **e == Event::InvalidateEnd(whole))
            .count(),
        1
    );
    let ev: Vec<Event> = ev
        .into_iter()
        .filter(|e| !matches!(e, Event::IsShared(_) | Event::InvalidateEnd(_)))
        .collect();
    assert_eq!(
        ev,
        vec![
            Event::InvalidateBegin(whole, hint(1, order)),
            Event::Free(ByteRange::new(hp + SUB, SUB), 0),
            Event::Free(ByteRange::new(hp + 4 * SUB, 2 * SUB), 0),
        ],
        "invariant 7: most punched first, lowest address between equals; one invalidation, one free per run"
    );
    assert_eq!(e.backing(1), Ok(Backing::Split));
    assert_eq!(e.backing(3), Ok(Backing::Huge));
    let s = e.stats();
    assert_eq!(
        (
            s.forced_splits,
            s.small_freed_subpages,
            s.pending_subpages,
            s.pending_bytes_peak
        ),
        (1, 3, 6, 8 * SUB)
    );
}

// ---------------------------------------------------------------------------
// Invariant 8
// ---------------------------------------------------------------------------

/// The bad-range matrix of the issue, plus empty, overflowing and
/// past-the-end ranges, for a file of `size` bytes.
fn bad_ranges(size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 1),
        (0, 4095),
        (0, 4097),
        (1, 1),
        (1, 4095),
        (1, 4096),
        (1, 4097),
        (4096, 1),
        (4096, 4095),
        (4096, 4097),
        (0, 0),
        (4096, 0),
        (size, 0),
        (u64::MAX - 4095, 8192),
        (8192, u64::MAX - 4095),
        (u64::MAX - 4095, 4096),
        (size, 4096),
        (size - 4096, 8192),
        (0, size + 4096),
    ]
}

/// Bad offsets for the one-subpage queries.
fn bad_offsets(size: u64) -> Vec<u64> {
    vec![1, 4095, 4097, size, size + 4096, u64::MAX, u64::MAX - 4095]
}

/// A file in a mixed state: punched, Split (with absent subpages), Absent,
/// private and shared subpages.
fn mixed_file() -> (HugePunch, Arc<RecordingHost>) {
    let order = 2u8;
    let hp = SUB << order;
    let (e, host) = file(order, 4, Attribute::Private, true, None, Policy::Reject);
    e.convert(hp, hp, Attribute::Shared).unwrap();
    e.punch(SUB, SUB).unwrap();
    e.punch(hp + 2 * SUB, SUB).unwrap();
    e.punch(2 * hp, SUB).unwrap();
    e.flush(2 * hp, SUB).unwrap();
    e.punch(3 * hp, hp).unwrap();
    assert_eq!(
        backings(&e),
        vec![
            Backing::Huge,
            Backing::Huge,
            Backing::Split,
            Backing::Absent
        ]
    );
    host.take_events();
    (e, host)
}

/// Every `InvalidRange` leaves everything as it was but
/// `errors_invalid_range`: no host event, same stats, same subpage states,
/// same attributes and residency.
#[test]
fn invariant_8_bad_input_changes_nothing() {
    let (e, host) = mixed_file();
    let size = e.size();
    let mut expected_errors = e.stats().errors_invalid_range;
    // Read-only queries move no counter, even when they fail (SPEC.md §6:
    // a VMM may poll them freely); every other call counts its error.
    let mut check = |what: String, res: Result<(), Error>, want: Error| {
        assert_eq!(res, Err(want), "{what}");
        assert_eq!(res.unwrap_err().errno(), EINVAL, "{what}: errno");
        let query = ["pending_ranges", "subpage_state", "is_punched"]
            .iter()
            .any(|q| what.starts_with(q));
        if !query {
            expected_errors += 1;
        }
        assert_eq!(
            e.stats().errors_invalid_range,
            expected_errors,
            "{what}: errors_invalid_range"
        );
    };
    let base_stats = e.stats();
    let base_states = states(&e);
    let base_attrs = host.attrs.lock().unwrap().clone();
    let base_resident = host.resident.lock().unwrap().clone();
    for (o, l) in bad_ranges(size) {
        let want = Error::InvalidRange { offset: o, len: l };
        check(format!("punch({o:#x}, {l:#x})"), e.punch(o, l), want);
        check(
            format!("convert({o:#x}, {l:#x}, private)"),
            e.convert(o, l, Attribute::Private),
            want,
        );
        check(
            format!("convert({o:#x}, {l:#x}, shared)"),
            e.convert(o, l, Attribute::Shared),
            want,
        );
        check(format!("populate({o:#x}, {l:#x})"), e.populate(o, l), want);
        check(format!("flush({o:#x}, {l:#x})"), e.flush(o, l), want);
        check(
            format!("pending_ranges({o:#x}, {l:#x})"),
            e.pending_ranges(o, l).map(|_| ()),
            want,
        );
    }
    for o in bad_offsets(size) {
        let want = Error::InvalidRange {
            offset: o,
            len: SUB,
        };
        check(
            format!("subpage_state({o:#x})"),
            e.subpage_state(o).map(|_| ()),
            want,
        );
        check(
            format!("is_punched({o:#x})"),
            e.is_punched(o).map(|_| ()),
            want,
        );
    }
    for h in [e.huge_pages(), e.huge_pages() + 1, u64::MAX] {
        assert!(
            matches!(e.backing(h), Err(Error::InvalidRange { .. })),
            "backing({h})"
        );
        assert!(
            matches!(e.max_mapping_order(h), Err(Error::InvalidRange { .. })),
            "max_mapping_order({h})"
        );
    }
    let after = e.stats();
    assert_eq!(
        after.errors_invalid_range, expected_errors,
        "queries count no error"
    );
    assert_eq!(
        without(after, "errors_invalid_range"),
        without(base_stats, "errors_invalid_range"),
        "invariant 8: stats moved"
    );
    assert_eq!(
        host.events(),
        vec![],
        "invariant 8: a bad range reached the host"
    );
    assert_eq!(
        states(&e),
        base_states,
        "invariant 8: subpage states changed"
    );
    assert_eq!(*host.attrs.lock().unwrap(), base_attrs);
    assert_eq!(*host.resident.lock().unwrap(), base_resident);
}

/// After teardown, every operation but teardown is `TornDown` (EIO), ahead
/// of `InvalidRange`, and changes nothing but `errors_torn_down`; a second
/// teardown is no error and does nothing.
#[test]
fn invariant_8_torn_down_takes_precedence_and_changes_nothing() {
    let (e, host) = mixed_file();
    let size = e.size();
    e.teardown();
    assert_eq!(host.resident_subpages(), 0);
    host.take_events();
    let base = e.stats();
    let mut n = 0;
    // Read-only queries move no counter, even when they fail (SPEC.md §6).
    let mut check = |what: String, res: Result<(), Error>| {
        assert_eq!(res, Err(Error::TornDown), "{what}");
        assert_eq!(res.unwrap_err().errno(), EIO);
        let query = [
            "pending_ranges",
            "subpage_state",
            "is_punched",
            "backing",
            "max_mapping_order",
        ]
        .iter()
        .any(|q| what.starts_with(q));
        if !query {
            n += 1;
        }
    };
    let mut ranges = bad_ranges(size);
    ranges.extend([(0, SUB), (0, size), (SUB << 2, SUB << 2)]);
    for (o, l) in ranges {
        check(format!("punch({o:#x}, {l:#x})"), e.punch(o, l));
        check(
            format!("convert({o:#x}, {l:#x}, private)"),
            e.convert(o, l, Attribute::Private),
        );
        check(
            format!("convert({o:#x}, {l:#x}, shared)"),
            e.convert(o, l, Attribute::Shared),
        );
        check(format!("populate({o:#x}, {l:#x})"), e.populate(o, l));
        check(format!("flush({o:#x}, {l:#x})"), e.flush(o, l));
        check(
            format!("pending_ranges({o:#x}, {l:#x})"),
            e.pending_ranges(o, l).map(|_| ()),
        );
    }
    for o in bad_offsets(size).into_iter().chain([0, SUB]) {
        check(
            format!("subpage_state({o:#x})"),
            e.subpage_state(o).map(|_| ()),
        );
        check(format!("is_punched({o:#x})"), e.is_punched(o).map(|_| ()));
    }
    for h in [0, 1, e.huge_pages(), u64::MAX] {
        check(format!("backing({h})"), e.backing(h).map(|_| ()));
        check(
            format!("max_mapping_order({h})"),
            e.max_mapping_order(h).map(|_| ()),
        );
    }
    let after = e.stats();
    assert_eq!(after.errors_torn_down, base.errors_torn_down + n);
    assert_eq!(
        without(after, "errors_torn_down"),
        without(base, "errors_torn_down"),
        "invariant 8: stats moved after teardown"
    );
    assert!(
        host.events().is_empty(),
        "invariant 8: a refused call reached the host: {:?}",
        host.events()
    );
    // A second teardown: no error, nothing done.
    assert!(e.teardown().still_allocated.is_empty());
    assert!(host.events().is_empty());
    assert_eq!(e.stats(), after);
}

/// The errno of each error an operation returns (SPEC.md §3).
#[test]
fn invariant_8_errno_mapping() {
    let (e, _host) = file(2, 1, Attribute::Shared, true, None, Policy::Reject);
    let invalid = e.punch(1, SUB).unwrap_err();
    assert!(matches!(
        invalid,
        Error::InvalidRange {
            offset: 1,
            len: 4096
        }
    ));
    assert_eq!((invalid.errno(), EINVAL), (22, 22));
    e.punch(0, SUB).unwrap();
    let pending = e.convert(0, SUB, Attribute::Private).unwrap_err();
    assert_eq!(pending, Error::PendingPunch { offset: 0 });
    assert_eq!((pending.errno(), EAGAIN), (11, 11));
    e.teardown();
    let torn = e.punch(0, SUB).unwrap_err();
    assert_eq!(torn, Error::TornDown);
    assert_eq!((torn.errno(), EIO), (5, 5));
}
