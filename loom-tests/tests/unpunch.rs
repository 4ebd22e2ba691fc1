//! CONTRACT.md §5.5, race 3: populate (un-punch) racing the punch that completes
//! the huge page (invariants 4 and 5). Whoever is first on the state word
//! wins: either the completion frees the huge page and populate allocates
//! it anew, or populate un-punches and zeroes its subpage and the punch
//! claims nothing. Never a free of a subpage populate un-punched and handed
//! out; the populated subpage reads as zeros.
#![cfg(hugepunch_loom)]

use hugepunch::{Attribute, Backing, ByteRange, SubpageState};
use loom::thread;
use loom_tests::{file, model, sub, subs_len, Event};

const ORDER: u8 = 2;

/// Subpages 0..3 are punched; one thread punches subpage 3 (completing the
/// huge page), the other populates subpage 1. After populate returns, the
/// guest reads the subpage (it must be allocated and zero) and maps it,
/// and the end state is checked against the winner. (Found engine bug A,
/// docs/RELIABILITY.md.)
fn populate_races_completing_punch() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(0, subs_len(3));
        engine.punch(0, subs_len(3)).unwrap();

        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(3), subs_len(1));
                engine.punch(sub(3), subs_len(1)).unwrap();
                world.assert_unmapped(sub(3), subs_len(1));
            })
        };
        let populate = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                engine.populate(sub(1), subs_len(1)).unwrap();
                // Subpage 1 was punched before populate started: it must be
                // allocated and read as zeros (the host asserts both); then
                // the guest maps it and writes.
                world.guest_populated(sub(1), subs_len(1), true);
            })
        };
        punch.join().unwrap();
        populate.join().unwrap();

        let completed = world.whole_frees(0);
        assert!(
            completed <= 1,
            "invariant 1: one completion at most\n{:#?}",
            world.calls()
        );
        let whole = ByteRange::new(0, subs_len(4));
        assert_eq!(
            engine.backing(0).unwrap(),
            Backing::Huge,
            "invariant 4: populate returned, huge page not allocated"
        );
        if completed == 1 {
            // The completion won: populate waited for it, then allocated
            // the huge page anew.
            assert!(world
                .calls()
                .iter()
                .any(|c| c.event == Event::Allocate(whole, ORDER)));
            for s in 0..4 {
                assert_eq!(engine.subpage_state(sub(s)).unwrap(), SubpageState::Present);
            }
        } else {
            // Populate won: the punch claimed nothing.
            assert_eq!(engine.subpage_state(sub(1)).unwrap(), SubpageState::Present);
            for s in [0, 2, 3] {
                assert_eq!(engine.subpage_state(sub(s)).unwrap(), SubpageState::Punched);
            }
            assert_eq!(engine.stats().repopulated_subpages, 1);
        }
        world.assert_accounting(&engine);
    });
}

#[test]
fn populate_racing_completing_punch() {
    populate_races_completing_punch();
}

/// Planted bug `--cfg hugepunch_broken="unpunch"`: populate's un-punch is
/// not registered in the state word, so the completing punch's exit
/// claims the completion while the un-punch is in flight. Loom must find
/// the interleaving in which the completion frees what populate
/// un-punched (or populate zeroes freed memory).
#[cfg(hugepunch_broken = "unpunch")]
#[test]
#[should_panic(expected = "invariant")]
fn broken_unpunch_is_caught() {
    populate_races_completing_punch();
}

/// Two populates (two vCPUs faulting) of one punched subpage: one
/// un-punches and zeroes it; the other must not return before the zeroing
/// is done.
///
/// Found engine bugs A and C (docs/RELIABILITY.md); their regression model.
#[test]
fn two_populates_of_one_punched_subpage() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(sub(1), subs_len(1));
        engine.punch(sub(1), subs_len(1)).unwrap();

        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (engine, world) = (engine.clone(), world.clone());
                thread::spawn(move || {
                    engine.populate(sub(1), subs_len(1)).unwrap();
                    world.guest_read(sub(1), subs_len(1), true);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(engine.subpage_state(sub(1)).unwrap(), SubpageState::Present);
        assert_eq!(engine.stats().repopulated_subpages, 1);
        world.assert_accounting(&engine);
    });
}
