//! CONTRACT.md §5.5, race 4: teardown racing punch and populate (invariants 1
//! and 6). Every allocated byte is freed exactly once (the host asserts
//! no double free; `assert_all_freed` that nothing is left), operations
//! that lose the race get `TornDown`, and every call after teardown does.
#![cfg(hugepunch_loom)]

use hugepunch::{Attribute, Error};
use loom::thread;
use loom_tests::{file, model, sub, subs_len, World};
use std::sync::Arc as StdArc;

const ORDER: u8 = 2;

fn spawn_teardown(
    engine: &loom::sync::Arc<hugepunch::HugePunch>,
    world: &StdArc<World>,
) -> thread::JoinHandle<hugepunch::TeardownReport> {
    let (engine, world) = (engine.clone(), world.clone());
    thread::spawn(move || {
        world.guest_teardown();
        engine.teardown()
    })
}

/// After teardown: nothing allocated, each allocation freed once, every
/// operation refused with `TornDown`, a second teardown a no-op.
fn after_teardown(engine: &hugepunch::HugePunch, world: &World, report: hugepunch::TeardownReport) {
    assert!(report.still_allocated.is_empty(), "{report:?}");
    world.assert_all_freed();
    let calls = world.calls().len();
    assert_eq!(engine.punch(0, subs_len(1)), Err(Error::TornDown));
    assert_eq!(engine.populate(0, subs_len(1)), Err(Error::TornDown));
    assert_eq!(
        engine.convert(0, subs_len(1), Attribute::Private),
        Err(Error::TornDown)
    );
    assert_eq!(engine.flush(0, subs_len(1)), Err(Error::TornDown));
    assert!(engine.teardown().still_allocated.is_empty());
    assert_eq!(world.calls().len(), calls, "no host call after teardown");
}

/// A punch that completes the huge page racing teardown: one whole free,
/// by whichever is first.
#[test]
fn teardown_racing_completing_punch() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(0, subs_len(2));
        engine.punch(0, subs_len(2)).unwrap();

        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(2), subs_len(2));
                engine.punch(sub(2), subs_len(2))
            })
        };
        let teardown = spawn_teardown(&engine, &world);
        let punched = punch.join().unwrap();
        let report = teardown.join().unwrap();
        assert!(
            matches!(punched, Ok(()) | Err(Error::TornDown)),
            "{punched:?}"
        );
        assert_eq!(
            world.whole_frees(0),
            1,
            "invariant 1: one whole free\n{:#?}",
            world.calls()
        );
        after_teardown(&engine, &world, report);
    });
}

/// Populate un-punching a subpage racing teardown.
#[test]
fn teardown_racing_unpunch() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(0, subs_len(2));
        engine.punch(0, subs_len(2)).unwrap();

        let populate = {
            let engine = engine.clone();
            thread::spawn(move || engine.populate(sub(1), subs_len(1)))
        };
        let teardown = spawn_teardown(&engine, &world);
        let populated = populate.join().unwrap();
        let report = teardown.join().unwrap();
        assert!(
            matches!(populated, Ok(()) | Err(Error::TornDown)),
            "{populated:?}"
        );
        after_teardown(&engine, &world, report);
    });
}

/// Populate allocating an absent huge page racing teardown: the
/// allocation is either refused or freed by teardown, never leaked.
#[test]
fn teardown_racing_allocation() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c.empty());
        let populate = {
            let engine = engine.clone();
            thread::spawn(move || engine.populate(sub(1), subs_len(1)))
        };
        let teardown = spawn_teardown(&engine, &world);
        let populated = populate.join().unwrap();
        let report = teardown.join().unwrap();
        assert!(
            matches!(populated, Ok(()) | Err(Error::TornDown)),
            "{populated:?}"
        );
        after_teardown(&engine, &world, report);
    });
}

/// Teardown racing a completing punch and a populate of the same huge
/// page at once (three threads: the full-depth run only, see ci/loom.sh).
#[test]
#[ignore = "three threads: run by ci/loom.sh --full"]
fn teardown_racing_punch_and_populate() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(0, subs_len(2));
        engine.punch(0, subs_len(2)).unwrap();

        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(2), subs_len(2));
                engine.punch(sub(2), subs_len(2))
            })
        };
        let populate = {
            let engine = engine.clone();
            thread::spawn(move || engine.populate(sub(1), subs_len(1)))
        };
        let teardown = spawn_teardown(&engine, &world);
        let punched = punch.join().unwrap();
        let populated = populate.join().unwrap();
        let report = teardown.join().unwrap();
        assert!(
            matches!(punched, Ok(()) | Err(Error::TornDown)),
            "{punched:?}"
        );
        assert!(
            matches!(populated, Ok(()) | Err(Error::TornDown)),
            "{populated:?}"
        );
        after_teardown(&engine, &world, report);
    });
}
