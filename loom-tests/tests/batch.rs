//! `punch_many` in the races of CONTRACT.md §5.5: a batch's
//! group follows the same protocol as a punch (one entry, a `fetch_or` per
//! bitmap word, one exit, the shared-state check after the exit), once for
//! all the subpages it gathered. The models: a batch and a 4 KiB punch (the
//! fast path) completing one huge page (invariant 1; invariant 2 for
//! private memory), a batch racing a conversion of one of its subpages to
//! private (invariants 2 and 3), and populate racing the batch that
//! completes the huge page (invariants 4 and 5). Each has a planted-bug
//! variant the model must catch (`ci/loom.sh`).
#![cfg(hugepunch_loom)]

use hugepunch::{Attribute, Backing, ByteRange, Error, SubpageState};
use loom::thread;
use loom_tests::{file, model, sub, subs_len};

const ORDER: u8 = 2; // 4 subpages per huge page

fn four_k(subs: &[u64]) -> Vec<ByteRange> {
    subs.iter()
        .map(|&s| ByteRange::new(sub(s), subs_len(1)))
        .collect()
}

/// Subpage 3 is punched first; then a batch of subpages 0 and 2 races a
/// 4 KiB punch of subpage 1 (the fast path). Exactly one whole free, after
/// every subpage was punched (the host asserts that at the free), and
/// every subpage of private memory invalidated before its call returned.
fn batch_and_punch_complete_once() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(sub(3), subs_len(1));
        engine.punch(sub(3), subs_len(1)).unwrap();
        let batch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                for s in [0, 2] {
                    world.guest_punch(sub(s), subs_len(1));
                }
                engine.punch_many(&four_k(&[0, 2])).unwrap();
                world.assert_unmapped(sub(0), subs_len(1));
                world.assert_unmapped(sub(2), subs_len(1));
            })
        };
        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(1), subs_len(1));
                engine.punch(sub(1), subs_len(1)).unwrap();
                world.assert_unmapped(sub(1), subs_len(1));
            })
        };
        batch.join().unwrap();
        punch.join().unwrap();
        assert_eq!(
            world.whole_frees(0),
            1,
            "invariant 1: exactly one completion\n{:#?}",
            world.calls()
        );
        assert_eq!(world.frees(), 1, "no other free\n{:#?}", world.calls());
        let stats = engine.stats();
        assert_eq!((stats.huge_frees, stats.pending_subpages), (1, 0));
        assert_eq!(stats.punch_calls, 4);
        assert_eq!(engine.backing(0).unwrap(), Backing::Absent);
        world.assert_accounting(&engine);
    });
}

#[test]
fn batch_and_4k_punch_complete_once() {
    batch_and_punch_complete_once();
}

/// Planted bug `--cfg hugepunch_broken="completion"` (a completion decided
/// by a load after the exit): both the batch's exit and the fast path's
/// may claim it.
#[cfg(hugepunch_broken = "completion")]
#[test]
#[should_panic(expected = "invariant")]
fn broken_completion_batch_is_caught() {
    batch_and_punch_complete_once();
}

/// A batch of shared subpages 1 and 2 (no immediate invalidation needed)
/// races a conversion of subpage 1 to private: either the conversion is
/// refused, or the batch saw the conversion (or the private attribute) and
/// invalidated before returning.
fn batch_races_convert() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Shared, |c| c);
        let batch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(1), subs_len(2));
                engine.punch_many(&four_k(&[1, 2])).unwrap();
                thread::current().id()
            })
        };
        let convert = {
            let engine = engine.clone();
            thread::spawn(move || engine.convert(sub(1), subs_len(1), Attribute::Private))
        };
        let puncher = batch.join().unwrap();
        let converted = convert.join().unwrap();
        let pending = engine.subpage_state(sub(1)).unwrap() == SubpageState::Punched;
        match converted {
            Ok(()) => {
                if pending {
                    assert!(
                        world.invalidated_by(puncher, sub(1)),
                        "invariant 3: conversion to private succeeded over a pending punch of a batch that was not invalidated\n{:#?}",
                        world.calls()
                    );
                }
            }
            Err(e) => {
                assert_eq!(e, Error::PendingPunch { offset: sub(1) });
                assert!(
                    pending,
                    "invariant 3: refused over a punch that is not pending"
                );
                assert_eq!(world.state().attrs[1], Attribute::Shared);
            }
        }
        world.assert_accounting(&engine);
    });
}

#[test]
fn batch_racing_convert_to_private() {
    batch_races_convert();
}

/// Planted bug `--cfg hugepunch_broken="conversion"`: the batch ignores a
/// conversion marked on the huge page and trusts `is_shared` alone.
#[cfg(hugepunch_broken = "conversion")]
#[test]
#[should_panic(expected = "invariant")]
fn broken_conversion_batch_is_caught() {
    batch_races_convert();
}

/// Subpages 0 and 3 are punched; a batch of subpages 1 and 2 (completing
/// the huge page) races a populate of subpage 0. Never a free of what
/// populate un-punched and handed out; the populated subpage reads as
/// zeros (the host asserts both).
fn populate_races_completing_batch() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        for s in [0, 3] {
            world.guest_punch(sub(s), subs_len(1));
            engine.punch(sub(s), subs_len(1)).unwrap();
        }
        let batch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(1), subs_len(2));
                engine.punch_many(&four_k(&[1, 2])).unwrap();
                world.assert_unmapped(sub(1), subs_len(2));
            })
        };
        let populate = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                engine.populate(sub(0), subs_len(1)).unwrap();
                world.guest_populated(sub(0), subs_len(1), true);
            })
        };
        batch.join().unwrap();
        populate.join().unwrap();
        assert!(
            world.whole_frees(0) <= 1,
            "invariant 1\n{:#?}",
            world.calls()
        );
        assert_eq!(
            engine.backing(0).unwrap(),
            Backing::Huge,
            "invariant 4: populate returned, huge page not allocated"
        );
        assert_eq!(engine.subpage_state(sub(0)).unwrap(), SubpageState::Present);
        world.assert_accounting(&engine);
    });
}

#[test]
fn populate_racing_completing_batch() {
    populate_races_completing_batch();
}

/// Planted bug `--cfg hugepunch_broken="unpunch"`: populate's un-punch is
/// not registered, so the batch's exit claims the completion while it is
/// in flight.
#[cfg(hugepunch_broken = "unpunch")]
#[test]
#[should_panic(expected = "invariant")]
fn broken_unpunch_batch_is_caught() {
    populate_races_completing_batch();
}
