//! Invariant 7 (CONTRACT.md §4).

use super::*;

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
        let mut rng = Rng::new(0x2545f4914f6cdd1d ^ budget);
        for step in 0..400 {
            let first = rng.below(total);
            // A whole huge page's worth one time in 16, else 1 to 9 subpages.
            let len = if rng.below(16) == 0 {
                per
            } else {
                1 + rng.below(per.min(9))
            };
            let len = len.min(total - first);
            let (o, l) = (first * SUB, len * SUB);
            match rng.below(8) {
                0..=4 => e.punch(o, l).unwrap(),
                5 => e.populate(o, l).unwrap(),
                6 => {
                    let _ = e.convert(
                        o,
                        l,
                        if rng.below(2) == 0 {
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
