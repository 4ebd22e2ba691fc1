//! Invariant 4 (CONTRACT.md §4).

use super::*;

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
    // The whole free (a completion) holds until the test lets it go.
    let (freeing, go) = (Arc::new(Signal::default()), Arc::new(Signal::default()));
    let host = HookedHost::new(inner.clone());
    {
        let (freeing, go) = (freeing.clone(), go.clone());
        host.set(move |e| {
            if matches!(*e, Event::Free(_, o) if o == order) {
                freeing.raise();
                go.wait(5);
            }
            Action::Forward
        });
    }
    let e = Arc::new(HugePunch::new(Config::new(size).order(order), host.clone()).unwrap());
    e.punch(0, 3 * SUB).unwrap();
    let completer = {
        let e = e.clone();
        std::thread::spawn(move || e.punch(3 * SUB, SUB))
    };
    assert!(freeing.wait(5), "the completion never reached free");
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
    go.raise();
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
