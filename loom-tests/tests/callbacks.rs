//! CONTRACT.md §5.5, race 5: re-registering the host callbacks (and the policy)
//! while a punch runs. The punch uses one whole set of callbacks from start
//! to end: every call it makes goes to one host. Concurrent replacements
//! of the host and of the policy are both kept.
//!
//! What loom sees is the callback slot itself (an `AtomicPtr` to
//! an immutable set, every set kept until the file is dropped, in every
//! build; it replaced `arc-swap`, which loom could not see).
#![cfg(hugepunch_loom)]

use hugepunch::{Attribute, Policy};
use loom::thread;
use loom_tests::{file, model, sub, subs_len, Event, ModelHost};

const ORDER: u8 = 2;

fn host_swapped_during_punch(swap_policy_too: bool) {
    model(move || {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        // Subpages 1..4 punched: the racing punch of subpage 0 makes six
        // calls (the shared-state check, its immediate invalidation, the
        // completion's invalidation and free).
        world.guest_punch(sub(1), subs_len(3));
        engine.punch(sub(1), subs_len(3)).unwrap();
        let before = world.calls().len();

        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(0, subs_len(1));
                engine.punch(0, subs_len(1)).unwrap();
                thread::current().id()
            })
        };
        let set_host = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || engine.set_host(ModelHost::on("B", &world)))
        };
        let set_policy = swap_policy_too.then(|| {
            let engine = engine.clone();
            thread::spawn(move || engine.set_policy(Policy::CancelAndZero))
        });
        let puncher = punch.join().unwrap();
        set_host.join().unwrap();
        if let Some(t) = set_policy {
            t.join().unwrap();
        }

        let calls = world.calls();
        let mine: Vec<_> = calls[before..]
            .iter()
            .filter(|c| c.thread == puncher)
            .collect();
        assert_eq!(mine.len(), 6, "{mine:#?}");
        assert!(
            mine.iter().all(|c| c.host == mine[0].host),
            "a punch used two callback sets (torn set)\n{mine:#?}"
        );
        assert_eq!(world.whole_frees(0), 1);

        // Both replacements are in force for the next operation: populate
        // (allocates), punch, then a conversion that only CancelAndZero
        // lets through, all on host B.
        let n = world.calls().len();
        engine.populate(0, subs_len(4)).unwrap();
        world.guest_populated(0, subs_len(4), true);
        world.guest_punch(0, subs_len(1));
        engine.punch(0, subs_len(1)).unwrap();
        let converted = engine.convert(0, subs_len(1), Attribute::Private);
        assert_eq!(
            converted.is_ok(),
            swap_policy_too,
            "policy replacement lost: {converted:?}"
        );
        let calls = world.calls();
        assert!(
            calls[n..].iter().all(|c| c.host == "B"),
            "host replacement lost\n{:#?}",
            &calls[n..]
        );
        if swap_policy_too {
            assert!(calls[n..]
                .iter()
                .any(|c| matches!(c.event, Event::Zero(r) if r.offset == 0)));
        }
        world.assert_accounting(&engine);
    });
}

#[test]
fn host_replaced_while_punch_runs() {
    host_swapped_during_punch(false);
}

#[test]
fn host_and_policy_replaced_while_punch_runs() {
    host_swapped_during_punch(true);
}
