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
