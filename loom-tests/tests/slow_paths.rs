//! CONTRACT.md §5.5, race 6: the budget's shrinker and `flush` racing punches and
//! populates (invariants 4, 6 and 7). No punched subpage is lost (the
//! engine and the host agree on every subpage at the end: punched ones are
//! pending and allocated, or freed exactly once), no un-punched subpage is
//! freed (the host asserts it at each free), no huge page is both split
//! and completed (a whole free of a split huge page would free absent
//! subpages twice: the host asserts it), and pending bytes end within the
//! budget.
#![cfg(hugepunch_loom)]

use hugepunch::{Attribute, Backing, SUBPAGE_SIZE};
use loom::thread;
use loom_tests::{file, model, sub, subs_len};

const ORDER: u8 = 2;

/// Invariant 7 at a quiescent point.
fn within_budget(engine: &hugepunch::HugePunch, budget: u64) {
    let pending = engine.stats().pending_subpages * SUBPAGE_SIZE;
    assert!(
        pending <= budget,
        "invariant 7: {pending} pending bytes over the budget of {budget}"
    );
}

/// Budget of two subpages, two pending: a punch of subpage 2 goes over and
/// its shrinker splits the huge page, while a punch of subpage 3 would
/// complete it. Exactly one of split or completion happens to each
/// subpage.
#[test]
fn shrinker_racing_completing_punch() {
    model(|| {
        let budget = subs_len(2);
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c.budget(budget));
        world.guest_punch(0, subs_len(2));
        engine.punch(0, subs_len(2)).unwrap();

        let threads: Vec<_> = [2, 3]
            .into_iter()
            .map(|s| {
                let (engine, world) = (engine.clone(), world.clone());
                thread::spawn(move || {
                    world.guest_punch(sub(s), subs_len(1));
                    engine.punch(sub(s), subs_len(1)).unwrap();
                    world.assert_unmapped(sub(s), subs_len(1));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        within_budget(&engine, budget);
        world.assert_accounting(&engine);
        // Everything was punched: nothing is left, whichever path freed it.
        assert_eq!(engine.backing(0).unwrap(), Backing::Absent);
        let st = world.state();
        assert!(
            st.frees.iter().all(|&f| f == 1),
            "every subpage freed once: {:?}",
            st.frees
        );
    });
}

/// Budget of one subpage, one pending: a punch of subpage 1 goes over and
/// its shrinker splits the huge page, while populate un-punches subpage 0
/// (or, after the split, allocates it as a 4 KiB page).
#[test]
fn shrinker_racing_populate() {
    model(|| {
        let budget = subs_len(1);
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c.budget(budget));
        world.guest_punch(0, subs_len(1));
        engine.punch(0, subs_len(1)).unwrap();

        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(1), subs_len(1));
                engine.punch(sub(1), subs_len(1)).unwrap();
                world.assert_unmapped(sub(1), subs_len(1));
            })
        };
        let populate = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                engine.populate(0, subs_len(1)).unwrap();
                world.guest_populated(0, subs_len(1), true);
            })
        };
        punch.join().unwrap();
        populate.join().unwrap();
        within_budget(&engine, budget);
        world.assert_accounting(&engine);
    });
}

/// `flush` racing a populate that un-punches one of the pending subpages.
#[test]
fn flush_racing_populate() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(0, subs_len(2));
        engine.punch(0, subs_len(2)).unwrap();

        let flush = {
            let engine = engine.clone();
            thread::spawn(move || engine.flush(0, subs_len(4)).unwrap())
        };
        let populate = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                engine.populate(sub(1), subs_len(1)).unwrap();
                world.guest_populated(sub(1), subs_len(1), true);
            })
        };
        flush.join().unwrap();
        populate.join().unwrap();
        world.assert_accounting(&engine);
        // Subpage 0 was pending from the start and nobody populated it:
        // whenever the flush claimed the huge page, it freed it.
        assert!(!world.state().resident[0], "flush left subpage 0 pending");
    });
}

/// `flush` racing a punch that completes the huge page: the huge page is
/// freed once, whole (by the completion, or by the flush when it holds the
/// huge page as the last punch exits), or split by the flush and the rest
/// freed by the punch.
#[test]
fn flush_racing_completing_punch() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(0, subs_len(2));
        engine.punch(0, subs_len(2)).unwrap();

        let flush = {
            let engine = engine.clone();
            thread::spawn(move || engine.flush(0, subs_len(4)).unwrap())
        };
        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(2), subs_len(2));
                engine.punch(sub(2), subs_len(2)).unwrap();
                world.assert_unmapped(sub(2), subs_len(2));
            })
        };
        flush.join().unwrap();
        punch.join().unwrap();
        world.assert_accounting(&engine);
        assert_eq!(engine.backing(0).unwrap(), Backing::Absent);
        let st = world.state();
        assert!(
            st.frees.iter().all(|&f| f == 1),
            "every subpage freed once: {:?}",
            st.frees
        );
    });
}
