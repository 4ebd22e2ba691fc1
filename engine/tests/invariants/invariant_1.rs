//! Invariant 1 (CONTRACT.md §4).

use super::*;

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
        // At every whole free: had the test started a punch of every
        // subpage of the huge page (marked before calling punch)?
        let started: Arc<Vec<AtomicBool>> =
            Arc::new((0..hps * per).map(|_| AtomicBool::new(false)).collect());
        let early = Arc::new(AtomicU64::new(0));
        let host = HookedHost::new(inner.clone());
        {
            let (started, early) = (started.clone(), early.clone());
            host.set(move |e| {
                if let Event::Free(r, o) = *e {
                    let all = (r.offset / SUB..r.end() / SUB)
                        .all(|s| started[s as usize].load(Ordering::SeqCst));
                    if o == order && !all {
                        early.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Action::Forward
            });
        }
        let e = Arc::new(HugePunch::new(Config::new(size).order(order), host).unwrap());
        let start = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (e, started, start) = (e.clone(), started.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let mut subs: Vec<u64> = (0..hps * per).filter(|s| s % 4 == t).collect();
                    if (t + round) % 2 == 1 {
                        subs.reverse();
                    }
                    for s in subs {
                        started[s as usize].store(true, Ordering::SeqCst);
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
            early.load(Ordering::SeqCst),
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
