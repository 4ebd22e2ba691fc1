//! CONTRACT.md §5.5, race 2: a punch of a shared subpage (the shared path: no
//! immediate invalidation) racing a conversion of the same subpage to
//! private (invariants 2 and 3). In every interleaving either the
//! conversion is refused, or the punch saw the subpage as private or
//! converting and invalidated it before returning: never a successful
//! conversion over a silently pending punch.
#![cfg(hugepunch_loom)]

use hugepunch::{Attribute, Error, Policy, SubpageState};
use loom::thread;
use loom_tests::{file, model, sub, subs_len, Event};

const ORDER: u8 = 2;

fn punch_races_convert(policy: Policy) {
    model(move || {
        let (engine, world) = file(1, ORDER, Attribute::Shared, |c| c.policy(policy));
        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(1), subs_len(1));
                engine.punch(sub(1), subs_len(1)).unwrap();
                thread::current().id()
            })
        };
        let convert = {
            let engine = engine.clone();
            thread::spawn(move || engine.convert(sub(1), subs_len(1), Attribute::Private))
        };
        let puncher = punch.join().unwrap();
        let converted = convert.join().unwrap();

        let pending = engine.subpage_state(sub(1)).unwrap() == SubpageState::Punched;
        let attr = world.state().attrs[1];
        let stats = engine.stats();
        assert_eq!(stats.convert_calls, 1);
        match converted {
            Ok(()) => {
                assert_eq!(attr, Attribute::Private);
                assert_eq!(stats.conversions_ok, 1);
                if pending {
                    // Invariants 2 and 3: the conversion went ahead while
                    // the punch's bit was (or became) pending, so the punch
                    // must have treated the subpage as private.
                    assert!(
                        world.invalidated_by(puncher, sub(1)),
                        "invariant 3: conversion to private succeeded over a pending punch that was not invalidated\n{:#?}",
                        world.calls()
                    );
                }
            }
            Err(e) => {
                assert_eq!(policy, Policy::Reject, "CancelAndZero never refuses");
                assert_eq!(e, Error::PendingPunch { offset: sub(1) });
                assert!(
                    pending,
                    "invariant 3: refused over a punch that is not pending"
                );
                // A refused conversion changes nothing but its counters.
                assert_eq!(
                    attr,
                    Attribute::Shared,
                    "invariant 3: a refused conversion changed the attribute"
                );
                assert!(!world
                    .calls()
                    .iter()
                    .any(|c| matches!(c.event, Event::SetAttributes(..))));
                assert_eq!((stats.conversions_ok, stats.conversions_rejected), (0, 1));
            }
        }
        if policy == Policy::CancelAndZero && !pending {
            // The conversion un-punched the subpage: it was zeroed.
            let st = world.state();
            assert!(st.resident[1]);
            assert_eq!(
                st.content[1],
                loom_tests::Content::Zero,
                "invariant 5: un-punched subpage not zeroed"
            );
        }
        world.assert_accounting(&engine);
    });
}

#[test]
fn shared_punch_racing_convert_to_private_reject() {
    punch_races_convert(Policy::Reject);
}

#[test]
fn shared_punch_racing_convert_to_private_cancel_and_zero() {
    punch_races_convert(Policy::CancelAndZero);
}

/// Planted bug `--cfg hugepunch_broken="conversion"`: the punch ignores a
/// conversion in flight. Loom must find the interleaving in which the
/// conversion checks the bits before the punch sets them and changes the
/// attribute after the punch's `is_shared` said "shared": a successful
/// conversion over a pending punch that nobody invalidated.
#[cfg(hugepunch_broken = "conversion")]
#[test]
#[should_panic(expected = "invariant 3")]
fn broken_conversion_is_caught() {
    punch_races_convert(Policy::Reject);
}

/// Planted bug `--cfg hugepunch_broken="mark"`: the conversion's mark is a
/// Relaxed RMW. Loom must find the interleaving in which the mark comes
/// after the punch's exit (so the punch does not invalidate) and the
/// conversion's bit check, no longer ordered after the punch's bit, reads
/// it clear: a successful conversion over a pending punch. (Before the
/// check was a plain Acquire load, nothing caught this: loom lets an RMW
/// read only the latest value.)
#[cfg(hugepunch_broken = "mark")]
#[test]
#[should_panic(expected = "invariant 3")]
fn broken_mark_is_caught() {
    punch_races_convert(Policy::Reject);
}
