//! One focused test per invariant of CONTRACT.md §4, each named for it, each
//! asserting on what the host saw (the [`RecordingHost`]'s events,
//! residency and attributes) and able to fail if the engine broke it.
//!
//! - Invariant 1: exactly-once completion.
//! - Invariant 2: no deferred invalidation of private memory.
//! - Invariant 3: no conversion to private over a pending punch (`Reject`),
//!   and a refused conversion changes nothing but its two counters.
//! - Invariant 4: no data loss (no free without an invalidation first; a
//!   completion never frees what a populate un-punched).
//! - Invariant 5: no stale data (a punched subpage populated again reads
//!   as zeros).
//! - Invariant 6: nothing leaked (freed + pending + live = allocated; after
//!   teardown everything was freed exactly once), with failing frees.
//! - Invariant 7: bounded deferral (pending within the budget after every
//!   operation; the shrinker's order).
//! - Invariant 8: bad input changes nothing (the bad-range matrix for every
//!   operation that takes a range; `TornDown` after teardown, first).

#[path = "../common/mod.rs"]
mod common;

use common::watchdog::Watchdog;
use common::{Event, RecordingHost};
use hugepunch::testing::{Action, HookedHost};
use hugepunch::{
    Attribute, Backing, ByteRange, Config, Error, Hint, HugePunch, Policy, Stats, SubpageState,
    EAGAIN, EINVAL, EIO, SUBPAGE_SIZE,
};
use hugepunch_workload::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

const SUB: u64 = SUBPAGE_SIZE;

fn file(
    order: u8,
    huge_pages: u64,
    start: Attribute,
    populated: bool,
    budget: Option<u64>,
    policy: Policy,
) -> (HugePunch, Arc<RecordingHost>) {
    let size = huge_pages * (SUB << order);
    let host = RecordingHost::new(size, start, populated);
    let mut cfg = Config::new(size).order(order).policy(policy);
    cfg.populated = populated;
    cfg.budget = budget;
    (
        HugePunch::new(cfg, host.clone()).expect("valid config"),
        host,
    )
}

fn frees(events: &[Event]) -> Vec<(ByteRange, u8)> {
    events
        .iter()
        .filter_map(|e| {
            if let Event::Free(r, o) = e {
                Some((*r, *o))
            } else {
                None
            }
        })
        .collect()
}

fn invalidations(events: &[Event]) -> Vec<(ByteRange, Hint)> {
    events
        .iter()
        .filter_map(|e| {
            if let Event::InvalidateBegin(r, h) = e {
                Some((*r, *h))
            } else {
                None
            }
        })
        .collect()
}

fn hint(h: u64, order: u8) -> Hint {
    Hint {
        huge_page: h,
        order,
    }
}

fn covers(outer: ByteRange, inner: ByteRange) -> bool {
    outer.offset <= inner.offset && inner.end() <= outer.end()
}

/// Every subpage's state (the engine must be live).
fn states(e: &HugePunch) -> Vec<SubpageState> {
    (0..e.size() / SUB)
        .map(|s| e.subpage_state(s * SUB).unwrap())
        .collect()
}

fn backings(e: &HugePunch) -> Vec<Backing> {
    (0..e.huge_pages()).map(|h| e.backing(h).unwrap()).collect()
}

/// Stats with the named counter cleared, to compare "everything else".
fn without(mut s: Stats, counter: &str) -> Stats {
    match counter {
        "errors_invalid_range" => s.errors_invalid_range = 0,
        "errors_torn_down" => s.errors_torn_down = 0,
        other => panic!("unknown counter {other}"),
    }
    s
}

/// A flag one thread raises and another waits for (with a timeout, so a
/// broken engine fails the test instead of hanging it).
#[derive(Default)]
struct Signal(Mutex<bool>, std::sync::Condvar);

impl Signal {
    fn raise(&self) {
        *self.0.lock().unwrap() = true;
        self.1.notify_all();
    }
    fn wait(&self, secs: u64) -> bool {
        let g = self.0.lock().unwrap();
        let (g, _) = self
            .1
            .wait_timeout_while(g, std::time::Duration::from_secs(secs), |raised| !*raised)
            .unwrap();
        *g
    }
}

// One module per invariant of CONTRACT.md §4, in this one test binary.
mod invariant_1;
mod invariant_2;
mod invariant_3;
mod invariant_4;
mod invariant_5;
mod invariant_6;
mod invariant_7;
mod invariant_8;
