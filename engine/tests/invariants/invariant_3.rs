//! Invariant 3 (CONTRACT.md §4).

use super::*;

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

/// Deterministic form of the race above: a conversion to private has
/// checked the range (nothing pending) and is inside `set_attributes`, the
/// attribute still shared, when a punch of a subpage of that range runs.
/// The conversion goes ahead, so the punch must not trust the shared-state
/// check: it must invalidate now (and it must not wait for the conversion,
/// CONTRACT.md §5).
#[test]
fn invariant_3_punch_during_conversion_is_invalidated_now() {
    let _watchdog = Watchdog::arm("invariant_3_punch_during_conversion_is_invalidated_now");
    let order = 2u8;
    let size = SUB << order;
    let inner = RecordingHost::new(size, Attribute::Shared, true);
    // `set_attributes` (to private) holds the conversion open until the
    // test has punched.
    let (converting, go_on) = (Arc::new(Signal::default()), Arc::new(Signal::default()));
    let host = HookedHost::new(inner.clone());
    {
        let (converting, go_on) = (converting.clone(), go_on.clone());
        host.set(move |e| {
            if matches!(e, Event::SetAttributes(_, Attribute::Private)) {
                converting.raise();
                go_on.wait(5);
            }
            Action::Forward
        });
    }
    let e = Arc::new(HugePunch::new(Config::new(size).order(order), host.clone()).unwrap());
    let converter = {
        let e = e.clone();
        std::thread::spawn(move || e.convert(0, 2 * SUB, Attribute::Private))
    };
    assert!(
        converting.wait(5),
        "the conversion never reached set_attributes"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let e = e.clone();
        std::thread::spawn(move || tx.send(e.punch(SUB, SUB)).unwrap());
    }
    let punched = rx.recv_timeout(std::time::Duration::from_secs(3));
    go_on.raise();
    assert_eq!(
        punched,
        Ok(Ok(())),
        "CONTRACT.md §5: a punch waited for a conversion in flight"
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
