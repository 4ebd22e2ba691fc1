//! The host contract beyond the invariants: replacing the host and the
//! policy at run time, failing allocations, and panicking callbacks (the
//! engine releases its marks and treats the call as failed: nothing is
//! stuck, nothing freed twice, nothing lost).

mod common;

use common::{Event, RecordingHost};
use hugepunch::testing::{Action, HookedHost};
use hugepunch::{
    Attribute, Backing, ByteRange, Config, Error, Hint, HostError, HugePunch, Policy, SubpageState,
};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB2: u64 = 2 << 20;

#[test]
fn replaced_host_serves_operations_that_start_after() {
    let a = RecordingHost::new(4 << 20, Attribute::Private, true);
    let b = RecordingHost::new(4 << 20, Attribute::Private, true);
    let file = HugePunch::new(Config::new(4 << 20), a.clone()).unwrap();
    file.punch(0, 4096).unwrap();
    file.set_host(b.clone());
    file.punch(4096, 4096).unwrap();
    let inval = |h: &RecordingHost| {
        h.events()
            .into_iter()
            .filter(|e| matches!(e, Event::InvalidateBegin(..)))
            .count()
    };
    assert_eq!((inval(&a), inval(&b)), (1, 1), "each punch used one host");
    assert!(b.events().contains(&Event::InvalidateBegin(
        ByteRange::new(4096, 4096),
        Hint {
            huge_page: 0,
            order: 9
        }
    )));
}

#[test]
fn replaced_policy_applies_to_later_conversions() {
    let host = RecordingHost::new(MIB2, Attribute::Shared, true);
    let file = HugePunch::new(Config::new(MIB2), host.clone()).unwrap();
    file.punch(0, 4096).unwrap();
    assert_eq!(
        file.convert(0, MIB2, Attribute::Private),
        Err(Error::PendingPunch { offset: 0 })
    );
    file.set_policy(Policy::CancelAndZero);
    file.convert(0, MIB2, Attribute::Private).unwrap();
    assert_eq!(file.subpage_state(0).unwrap(), SubpageState::Present);
    assert_eq!(file.stats().repopulated_subpages, 1);
}

#[test]
fn failed_allocation_fails_populate_and_changes_nothing() {
    let rec = RecordingHost::new(4 << 20, Attribute::Shared, false);
    // A host whose allocations fail.
    let host = HookedHost::new(rec);
    host.set(|e| match e {
        Event::Allocate(..) => Action::Fail(HostError { errno: 12 }),
        _ => Action::Forward,
    });
    let file = HugePunch::new(Config::new(4 << 20).empty(), host).unwrap();
    let err = file.populate(0, 4096).unwrap_err();
    assert_eq!(
        err,
        Error::AllocationFailed {
            offset: 0,
            errno: 12
        }
    );
    assert_eq!(err.errno(), 12);
    assert_eq!(file.backing(0).unwrap(), Backing::Absent);
    assert_eq!(file.stats().populate_calls, 1);
    // Nothing is stuck: the huge page can still be punched and torn down.
    file.punch(0, 4096).unwrap();
    assert!(file.teardown().still_allocated.is_empty());
}

/// Flags that make the next `free` (or `zero`) panic once.
#[derive(Default)]
struct Panicky {
    panic_free: AtomicBool,
    panic_zero: AtomicBool,
}

fn panicky(size: u64) -> (HugePunch, Arc<Panicky>, Arc<RecordingHost>) {
    let inner = RecordingHost::new(size, Attribute::Shared, true);
    let flags = Arc::new(Panicky::default());
    let host = HookedHost::new(inner.clone());
    {
        let flags = flags.clone();
        host.set(move |e| {
            if matches!(e, Event::Free(..)) && flags.panic_free.swap(false, Ordering::SeqCst) {
                panic!("free panics");
            }
            if matches!(e, Event::Zero(..)) && flags.panic_zero.swap(false, Ordering::SeqCst) {
                panic!("zero panics");
            }
            Action::Forward
        });
    }
    let file = HugePunch::new(Config::new(size).order(2), host).unwrap();
    (file, flags, inner)
}

#[test]
fn panicking_free_of_a_completion_counts_as_failed_and_is_retried() {
    let (file, host, inner) = panicky(16 << 10);
    file.punch(0, 12 << 10).unwrap();
    host.panic_free.store(true, Ordering::SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| file.punch(12 << 10, 4096))).is_err());
    // Not stuck in a completion: every subpage is still punched, and a
    // populate (which would wait for a completion in flight) returns.
    assert_eq!(file.backing(0).unwrap(), Backing::Huge);
    assert_eq!(file.subpage_state(0).unwrap(), SubpageState::Punched);
    file.flush(0, 4096).unwrap();
    assert_eq!(file.backing(0).unwrap(), Backing::Absent);
    assert_eq!(inner.resident_subpages(), 0, "retried exactly once");
    file.populate(0, 4096).unwrap();
    assert_eq!(file.backing(0).unwrap(), Backing::Huge);
}

#[test]
fn panicking_zero_leaves_the_subpages_punched() {
    let (file, host, _) = panicky(16 << 10);
    file.punch(0, 4096).unwrap();
    host.panic_zero.store(true, Ordering::SeqCst);
    assert!(catch_unwind(AssertUnwindSafe(|| file.populate(0, 4096))).is_err());
    assert_eq!(file.subpage_state(0).unwrap(), SubpageState::Punched);
    // Nothing is registered any more: a forced split can claim the page.
    file.flush(0, 4096).unwrap();
    assert_eq!(file.backing(0).unwrap(), Backing::Split);
    assert_eq!(file.subpage_state(0).unwrap(), SubpageState::Absent);
}
