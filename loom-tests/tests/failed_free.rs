//! CONTRACT.md §5.5, race 7: a completion whose host free fails, racing populate
//! and a later `flush` (invariants 1 and 6). The failed completion leaves
//! the huge page whole with every subpage pending; populate may un-punch
//! one of them; the flush then frees what is still pending (whole, or as
//! a split). Nothing is freed twice (the host asserts it), nothing is lost
//! (engine and host agree on every subpage at the end).
#![cfg(hugepunch_loom)]

use hugepunch::{Attribute, SubpageState};
use loom::thread;
use loom_tests::{file, model, sub, subs_len};

const ORDER: u8 = 2;

fn failed_completion(flush_in_own_thread: bool) {
    model(move || {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(0, subs_len(3));
        engine.punch(0, subs_len(3)).unwrap();
        world.fail_next_frees(1);

        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(3), subs_len(1));
                engine.punch(sub(3), subs_len(1)).unwrap();
                if !flush_in_own_thread {
                    // The later flush, after the punch returned.
                    engine.flush(0, subs_len(4)).unwrap();
                }
            })
        };
        let populate = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                engine.populate(sub(1), subs_len(1)).unwrap();
                world.guest_populated(sub(1), subs_len(1), true);
            })
        };
        let flush = flush_in_own_thread.then(|| {
            let engine = engine.clone();
            thread::spawn(move || engine.flush(0, subs_len(4)).unwrap())
        });
        punch.join().unwrap();
        populate.join().unwrap();
        if let Some(t) = flush {
            t.join().unwrap();
        }

        world.assert_accounting(&engine);
        assert!(
            world.whole_frees(0) <= 1,
            "invariant 1\n{:#?}",
            world.calls()
        );
        let stats = engine.stats();
        assert!(stats.free_errors <= 1);
        // Populate's subpage is present whatever happened before it.
        assert_eq!(
            engine.subpage_state(sub(1)).unwrap(),
            SubpageState::Present,
            "invariant 4: populate returned, subpage not present"
        );
        if !flush_in_own_thread && stats.free_errors == 1 {
            // The flush ran after the failed completion: it freed every
            // subpage still pending, so none is left.
            for s in [0, 2, 3] {
                assert_ne!(
                    engine.subpage_state(sub(s)).unwrap(),
                    SubpageState::Punched,
                    "subpage {s} still pending after flush"
                );
            }
        }
    });
}

#[test]
fn failed_completion_racing_populate_then_flush() {
    failed_completion(false);
}

#[test]
#[ignore = "three threads: run by ci/loom.sh --full"]
fn failed_completion_racing_populate_and_flush() {
    failed_completion(true);
}
