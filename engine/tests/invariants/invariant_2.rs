//! Invariant 2 (CONTRACT.md §4).

use super::*;

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

/// A partial punch that meets a completion in flight on its huge page (the
/// completion is blocked in `free`) does not wait for it: if the range may
/// be private it invalidates it now (invariant 2); if it is shared and no
/// conversion is marked, it issues nothing (the huge page is being freed
/// whole, with its own invalidation).
#[test]
fn invariant_2_a_punch_meeting_a_completion_invalidates_private_memory_only() {
    let _watchdog =
        Watchdog::arm("invariant_2_a_punch_meeting_a_completion_invalidates_private_memory_only");
    for attr in [Attribute::Private, Attribute::Shared] {
        let order = 2u8;
        let size = SUB << order;
        let inner = RecordingHost::new(size, attr, true);
        let host = HookedHost::new(inner.clone());
        let gate = Arc::new(Barrier::new(2));
        {
            let gate = gate.clone();
            host.set(move |e| {
                if matches!(*e, Event::Free(_, o) if o == order) {
                    gate.wait(); // the completion is inside `free`
                    gate.wait(); // let it go
                }
                Action::Forward
            });
        }
        let e = Arc::new(HugePunch::new(Config::new(size).order(order), host).unwrap());
        e.punch(0, 3 * SUB).unwrap();
        let completer = {
            let e = e.clone();
            std::thread::spawn(move || e.punch(3 * SUB, SUB).unwrap())
        };
        gate.wait();
        inner.take_events();
        let before = e.stats();
        e.punch(SUB, SUB).unwrap();
        let during = inner.take_events();
        let after = e.stats();
        gate.wait();
        completer.join().unwrap();
        let immediate = after.invalidations_immediate - before.invalidations_immediate;
        let mine = invalidations(&during);
        match attr {
            Attribute::Private => {
                assert_eq!(
                    mine,
                    vec![(ByteRange::new(SUB, SUB), hint(0, order))],
                    "invariant 2: a private punch meeting a completion invalidates now"
                );
                assert_eq!(immediate, 1);
            }
            Attribute::Shared => {
                assert_eq!(mine, vec![], "a shared punch meeting a completion defers");
                assert_eq!(immediate, 0);
            }
        }
        assert_eq!(e.stats().huge_frees, 1);
    }
}
