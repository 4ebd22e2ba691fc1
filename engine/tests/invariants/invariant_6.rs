//! Invariant 6 (CONTRACT.md §4).

use super::*;

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
        let mut rng = Rng::new(0x9e3779b97f4a7c15);
        for step in 0..300 {
            let first = rng.below(32);
            let len = (1 + rng.below(6)).min(32 - first);
            let (o, l) = (first * SUB, len * SUB);
            let _ = match rng.below(10) {
                0..=3 => e.punch(o, l),
                4 => e.punch((first % 4) * hp, hp),
                5 | 6 => e.populate(o, l),
                7 => e.convert(
                    o,
                    l,
                    if rng.below(2) == 0 {
                        Attribute::Private
                    } else {
                        Attribute::Shared
                    },
                ),
                8 => e.flush(o, l),
                _ => {
                    host.fail_next_frees
                        .store(1 + rng.below(2), Ordering::SeqCst);
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
