//! Unit tests of the per-huge-page protocol (`page/mod.rs`): word masks,
//! runs, the completion claim, un-punch registration, `COUNT` wrapping.

use super::*;

#[test]
fn word_masks_cover_exactly_the_range() {
    let m: Vec<_> = word_masks(60, 10).collect();
    assert_eq!(m, vec![(0, 0xf << 60), (1, 0x3f)]);
    let m: Vec<_> = word_masks(0, 128).collect();
    assert_eq!(m, vec![(0, u64::MAX), (1, u64::MAX)]);
    let m: Vec<_> = word_masks(3, 1).collect();
    assert_eq!(m, vec![(0, 1 << 3)]);
}

#[test]
fn runs_merge_across_words() {
    assert_eq!(runs([(0, 0b1011u64)]).to_vec(), vec![(0, 2), (3, 1)]);
    assert_eq!(runs([(0, 1u64 << 63), (1, 1)]).to_vec(), vec![(63, 2)]);
    assert_eq!(
        runs([(0, u64::MAX), (1, u64::MAX)]).to_vec(),
        vec![(0, 128)]
    );
    assert_eq!(runs([(1, 1u64 << 63)]).to_vec(), vec![(127, 1)]);
}

#[test]
fn completion_is_claimed_once_by_the_filling_exit() {
    let state = AtomicU64::new(HUGE);
    let words = [AtomicU64::new(0)];
    let page = Page::new(&state, &words, 4);
    assert!(matches!(page.enter(PUNCH_ONE), Entry::Registered));
    assert!(matches!(page.enter(PUNCH_ONE), Entry::Registered));
    let a = page.set_bits(0, 3);
    let b = page.set_bits(2, 2);
    assert_eq!((a, b), (3, 1));
    // The first exit leaves a registration behind: no claim yet.
    assert!(!page.exit(PUNCH_ONE, a as i64).claimed_completion);
    let last = page.exit(PUNCH_ONE, b as i64);
    assert!(last.claimed_completion);
    assert_eq!(page.enter(PUNCH_ONE), Entry::Completing);
    page.end_completion(true);
    assert_eq!(page.load().mode(), ABSENT);
    assert!(page.read_bits(0, 4).is_empty());
}

#[test]
fn unpunch_in_flight_blocks_the_claim() {
    let state = AtomicU64::new(HUGE);
    let words = [AtomicU64::new(0)];
    let page = Page::new(&state, &words, 4);
    assert!(matches!(page.enter(PUNCH_ONE), Entry::Registered));
    let n = page.set_bits(0, 3);
    assert!(!page.exit(PUNCH_ONE, n as i64).claimed_completion);
    assert!(matches!(page.enter(UNPUNCH_ONE), Entry::Registered));
    assert!(matches!(page.enter(PUNCH_ONE), Entry::Registered));
    let n = page.set_bits(3, 1);
    let e = page.exit(PUNCH_ONE, n as i64);
    assert!(!e.claimed_completion, "an un-punch is registered");
    let cleared = page.clear_bits(0, 1);
    assert_eq!(cleared.to_vec(), vec![(0, 1)]);
    assert!(!page.exit(UNPUNCH_ONE, -1).claimed_completion);
    assert_eq!(page.load().count(), 3);
}

#[test]
fn count_wraps_transiently_negative_and_recovers() {
    let state = AtomicU64::new(HUGE);
    let words = [AtomicU64::new(0)];
    let page = Page::new(&state, &words, 4);
    assert!(matches!(page.enter(PUNCH_ONE), Entry::Registered));
    assert!(matches!(page.enter(UNPUNCH_ONE), Entry::Registered));
    assert_eq!(page.set_bits(1, 1), 1);
    assert_eq!(page.clear_bits(1, 1).len(), 1);
    let e = page.exit(UNPUNCH_ONE, -1);
    assert!(e.after.count() >= 1 << 19, "transiently negative: {e:?}");
    let e = page.exit(PUNCH_ONE, 1);
    assert_eq!(e.after.count(), 0);
    assert_eq!(e.after.mode(), HUGE);
}

/// A saturated registration field (1023 operations registered on one huge
/// page) makes the next entry wait, never carry into the next field: the
/// entry registers once another operation leaves.
#[test]
fn a_saturated_field_makes_entry_wait_instead_of_overflowing() {
    use std::sync::{mpsc, Arc};
    use std::time::Duration;
    for (one, field) in [
        (PUNCH_ONE, PUNCHING_SHIFT),
        (UNPUNCH_ONE, UNPUNCHING_SHIFT),
        (CONVERT_ONE, CONVERTING_SHIFT),
    ] {
        let state = Arc::new(AtomicU64::new(HUGE | (FIELD_MAX << field)));
        let (done, entered) = mpsc::channel();
        let enterer = {
            let state = state.clone();
            std::thread::spawn(move || {
                let words = [AtomicU64::new(0)];
                let page = Page::new(&state, &words, 4);
                // A conversion registers through `mark_converting`, the
                // others through `enter`; both must wait for room.
                if one == CONVERT_ONE {
                    let _ = page.mark_converting();
                } else {
                    assert!(matches!(page.enter(one), Entry::Registered));
                }
                done.send(()).unwrap();
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            entered.try_recv().is_err(),
            "entered a saturated field without waiting"
        );
        // ORDERING: SeqCst: a test, simplest is best. Another operation
        // leaves the field.
        state.fetch_sub(one, Ordering::SeqCst);
        entered
            .recv_timeout(Duration::from_secs(60))
            .expect("watchdog: the waiting entry never registered");
        enterer.join().unwrap();
        let s = Snapshot(state.load(Ordering::SeqCst));
        assert_eq!(
            (s.punching(), s.unpunching(), s.converting()),
            match field {
                PUNCHING_SHIFT => (FIELD_MAX, 0, 0),
                UNPUNCHING_SHIFT => (0, FIELD_MAX, 0),
                _ => (0, 0, FIELD_MAX),
            },
            "{s:?}"
        );
        assert_eq!((s.mode(), s.count()), (HUGE, 0));
    }
}

/// `Snapshot`'s `Debug` names every field (what a failing assertion on a
/// state word prints).
#[test]
fn snapshot_debug_names_every_field() {
    let s = Snapshot(HUGE | BUSY | (3 << PUNCHING_SHIFT) | CONVERT_ONE | (5 << COUNT_SHIFT));
    assert_eq!(
        format!("{s:?}"),
        "Snapshot { mode: \"HUGE\", completing: false, busy: true, torn: false, wanted: false, \
         punching: 3, unpunching: 0, converting: 1, count: 5 }"
    );
}
