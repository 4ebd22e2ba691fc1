//! The VMM's own view racing a completion (CONTRACT.md §3.10, "Queries for the
//! VMM's own accesses"): a VMM that reads guest memory itself asks
//! `is_punched` / `subpage_state` first and treats punched subpages as
//! zeros. While the huge page is being completed, a punched subpage is
//! `Punched` (before) or `Absent` (after), never `Present`: a VMM told
//! `Present` would read memory that is being freed.
#![cfg(hugepunch_loom)]

use hugepunch::{Attribute, SubpageState};
use loom::thread;
use loom_tests::{file, model, sub, subs_len};

const ORDER: u8 = 2;

///
/// Found engine bugs A and B (docs/RELIABILITY.md); their regression model.
#[test]
fn subpage_state_racing_completion() {
    model(|| {
        let (engine, world) = file(1, ORDER, Attribute::Private, |c| c);
        world.guest_punch(0, subs_len(3));
        engine.punch(0, subs_len(3)).unwrap();

        let punch = {
            let (engine, world) = (engine.clone(), world.clone());
            thread::spawn(move || {
                world.guest_punch(sub(3), subs_len(1));
                engine.punch(sub(3), subs_len(1)).unwrap();
            })
        };
        let query = {
            let engine = engine.clone();
            thread::spawn(move || engine.subpage_state(sub(1)).unwrap())
        };
        punch.join().unwrap();
        let seen = query.join().unwrap();
        assert_ne!(
            seen,
            SubpageState::Present,
            "invariant 5 (no stale data): a punched subpage reported present while its huge page is freed"
        );
        assert_eq!(world.whole_frees(0), 1);
        world.assert_accounting(&engine);
    });
}
