//! The C ABI called as C calls it (through the `extern "C"` functions, with
//! a host of `extern "C"` callbacks and an opaque pointer): every pointer
//! checked, every error a negative errno with its out-parameter, failed
//! callbacks following the `Host` trait's rules, no panic crossing, and
//! concurrent calls on one handle.

use hugepunch::testing::watchdog::Watchdog;
use hugepunch_capi::*;
use std::ffi::{c_int, c_void};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

const EINVAL: c_int = 22;
const EAGAIN: c_int = 11;
const EIO: c_int = 5;
const ENOMEM: c_int = 12;
const EBUSY: c_int = 16;
const ERANGE: c_int = 34;
const MIB2: u64 = 2 << 20;

/// What the C host saw, and what it is told to fail with (0: succeed).
#[derive(Default)]
struct Recorder {
    frees: AtomicU64,
    freed_bytes: AtomicU64,
    invalidations: AtomicU64,
    zeroed: AtomicU64,
    fail_free: AtomicI32,
    fail_zero: AtomicI32,
    fail_allocate: AtomicI32,
    fail_invalidate: AtomicI32,
    shared: AtomicI32,
}

// ORDERING (all of the recorder): Relaxed; the tests read it after the
// calls returned on the same thread, or after joining the threads.
fn rec<'a>(opaque: *mut c_void) -> &'a Recorder {
    // SAFETY: every host below is made with a pointer to a live Recorder
    // that outlives its file.
    unsafe { &*(opaque as *const Recorder) }
}

unsafe extern "C" fn is_shared(opaque: *mut c_void, _: u64, _: u64) -> bool {
    rec(opaque).shared.load(Ordering::Relaxed) != 0
}
unsafe extern "C" fn invalidate_begin(opaque: *mut c_void, _: u64, _: u64, _: u64, _: u8) -> c_int {
    rec(opaque).invalidations.fetch_add(1, Ordering::Relaxed);
    rec(opaque).fail_invalidate.load(Ordering::Relaxed)
}
unsafe extern "C" fn allocate(opaque: *mut c_void, _: u64, _: u64, _: u8) -> c_int {
    rec(opaque).fail_allocate.load(Ordering::Relaxed)
}
unsafe extern "C" fn free(opaque: *mut c_void, _: u64, len: u64, _: u8) -> c_int {
    let r = rec(opaque);
    let rc = r.fail_free.load(Ordering::Relaxed);
    if rc == 0 {
        r.frees.fetch_add(1, Ordering::Relaxed);
        r.freed_bytes.fetch_add(len, Ordering::Relaxed);
    }
    rc
}
unsafe extern "C" fn zero(opaque: *mut c_void, _: u64, len: u64) -> c_int {
    let r = rec(opaque);
    let rc = r.fail_zero.load(Ordering::Relaxed);
    if rc == 0 {
        r.zeroed.fetch_add(len, Ordering::Relaxed);
    }
    rc
}

fn host(r: &Recorder) -> hugepunch_host {
    hugepunch_host {
        opaque: r as *const Recorder as *mut c_void,
        is_shared: Some(is_shared),
        set_attributes: None,
        invalidate_begin: Some(invalidate_begin),
        invalidate_end: None,
        allocate: Some(allocate),
        free: Some(free),
        zero: Some(zero),
    }
}

fn config(size: u64) -> hugepunch_config {
    let mut c = std::mem::MaybeUninit::<hugepunch_config>::uninit();
    // SAFETY: a writable config.
    assert_eq!(unsafe { hugepunch_config_init(c.as_mut_ptr(), size) }, 0);
    // SAFETY: initialised by hugepunch_config_init.
    unsafe { c.assume_init() }
}

fn new_file(cfg: &hugepunch_config, r: &Recorder) -> *mut hugepunch_file {
    let mut f = null_mut();
    // SAFETY: valid pointers; the recorder outlives the file (each test
    // destroys it before the recorder goes).
    assert_eq!(unsafe { hugepunch_new(cfg, &host(r), &mut f) }, 0);
    assert!(!f.is_null());
    f
}

fn stats(f: *const hugepunch_file) -> hugepunch_stats {
    let mut s = hugepunch_stats::default();
    // SAFETY: a live handle and a writable struct.
    assert_eq!(unsafe { hugepunch_get_stats(f, &mut s) }, 0);
    s
}

#[test]
fn defaults_are_the_engines() {
    let c = config(4 << 20);
    assert_eq!((c.size, c.order, c.populated), (4 << 20, 9, true));
    assert_eq!(
        (c.policy, c.budget),
        (HUGEPUNCH_POLICY_REJECT, HUGEPUNCH_NO_BUDGET)
    );
}

#[test]
fn null_pointers_are_einval_and_change_nothing() {
    let r = Recorder::default();
    let cfg = config(4 << 20);
    let mut f = null_mut();
    // SAFETY: for every call of this test, null where the test says so, else
    // valid pointers.
    unsafe {
        assert_eq!(hugepunch_config_init(null_mut(), 1), -EINVAL);
        assert_eq!(hugepunch_new(null(), &host(&r), &mut f), -EINVAL);
        assert_eq!(hugepunch_new(&cfg, null(), &mut f), -EINVAL);
        assert_eq!(hugepunch_new(&cfg, &host(&r), null_mut()), -EINVAL);
        let no_free = hugepunch_host {
            free: None,
            ..host(&r)
        };
        assert_eq!(hugepunch_new(&cfg, &no_free, &mut f), -EINVAL);
        let bad_policy = hugepunch_config { policy: 7, ..cfg };
        assert_eq!(hugepunch_new(&bad_policy, &host(&r), &mut f), -EINVAL);
        let bad_size = hugepunch_config { size: 4096, ..cfg };
        assert_eq!(hugepunch_new(&bad_size, &host(&r), &mut f), -EINVAL);
        assert!(f.is_null(), "a failed hugepunch_new leaves *out alone");

        assert_eq!(hugepunch_punch(null(), 0, 4096), -EINVAL);
        assert_eq!(hugepunch_punch_many(null(), null(), 0, null_mut()), -EINVAL);
        assert_eq!(
            hugepunch_convert(null(), 0, 4096, HUGEPUNCH_SHARED, null_mut()),
            -EINVAL
        );
        assert_eq!(hugepunch_populate(null(), 0, 4096, null_mut()), -EINVAL);
        assert_eq!(hugepunch_flush(null(), 0, 4096), -EINVAL);
        assert_eq!(hugepunch_teardown(null(), null_mut()), -EINVAL);
        assert_eq!(hugepunch_get_stats(null(), null_mut()), -EINVAL);
        hugepunch_destroy(null_mut());

        let f = new_file(&cfg, &r);
        assert_eq!(hugepunch_punch_many(f, null(), 3, null_mut()), -EINVAL);
        assert_eq!(hugepunch_is_punched(f, 0, null_mut()), -EINVAL);
        assert_eq!(hugepunch_subpage_state(f, 0, null_mut()), -EINVAL);
        assert_eq!(hugepunch_max_mapping_order(f, 0, null_mut()), -EINVAL);
        assert_eq!(hugepunch_backing(f, 0, null_mut()), -EINVAL);
        assert_eq!(hugepunch_get_stats(f, null_mut()), -EINVAL);
        assert_eq!(
            hugepunch_pending_ranges(f, 0, 4096, null_mut(), 0, null_mut()),
            -EINVAL
        );
        assert_eq!(
            hugepunch_pending_ranges(f, 0, 4096, null_mut(), 1, &mut 0),
            -EINVAL
        );
        assert_eq!(hugepunch_set_host(f, null()), -EINVAL);
        assert_eq!(hugepunch_set_policy(f, 9), -EINVAL);
        assert_eq!(hugepunch_convert(f, 0, 4096, 2, null_mut()), -EINVAL);
        assert_eq!(stats(f), hugepunch_stats::default(), "nothing moved");
        hugepunch_destroy(f);
    }
}

#[test]
fn coalesced_punches_errors_and_queries() {
    let r = Recorder::default();
    r.shared.store(1, Ordering::Relaxed);
    let f = new_file(&config(4 << 20), &r);
    // SAFETY: for every call of this test, a live handle and valid pointers.
    unsafe {
        for sub in 0..511 {
            assert_eq!(hugepunch_punch(f, sub * 4096, 4096), 0);
        }
        assert_eq!(r.frees.load(Ordering::Relaxed), 0, "all deferred");
        let mut punched = false;
        assert_eq!(hugepunch_is_punched(f, 0, &mut punched), 0);
        assert!(punched);
        let mut state = 9;
        assert_eq!(hugepunch_subpage_state(f, 511 * 4096, &mut state), 0);
        assert_eq!(state, HUGEPUNCH_SUBPAGE_PRESENT);
        let mut order = 9;
        assert_eq!(hugepunch_max_mapping_order(f, 0, &mut order), 0);
        assert_eq!(order, 0, "a huge mapping must not cover a punched subpage");

        // A conversion to private over the pending punches: -EAGAIN and
        // the first pending subpage.
        let mut at = u64::MAX;
        assert_eq!(
            hugepunch_convert(f, 0x10000, 0x2000, HUGEPUNCH_PRIVATE, &mut at),
            -EAGAIN
        );
        assert_eq!(at, 0x10000);

        // The pending runs, with too little room, then enough.
        let mut count = 0;
        let mut one = [hugepunch_range::default(); 1];
        assert_eq!(
            hugepunch_pending_ranges(f, 0, 4 << 20, one.as_mut_ptr(), 1, &mut count),
            0
        );
        assert_eq!(
            (count, one[0]),
            (
                1,
                hugepunch_range {
                    offset: 0,
                    len: 511 * 4096
                }
            )
        );
        assert_eq!(hugepunch_punch(f, 0x200000 + 0x3000, 4096), 0);
        assert_eq!(
            hugepunch_pending_ranges(f, 0, 4 << 20, one.as_mut_ptr(), 1, &mut count),
            -ERANGE
        );
        assert_eq!(count, 2);

        // The last subpage completes: one free of 2 MiB.
        assert_eq!(hugepunch_punch(f, 511 * 4096, 4096), 0);
        assert_eq!(r.frees.load(Ordering::Relaxed), 1);
        assert_eq!(r.freed_bytes.load(Ordering::Relaxed), MIB2);
        let mut backing = 9;
        assert_eq!(hugepunch_backing(f, 0, &mut backing), 0);
        assert_eq!(backing, HUGEPUNCH_BACKING_ABSENT);

        // A batch with a bad range fails whole, naming it.
        let batch = [
            hugepunch_range {
                offset: 0x200000,
                len: 4096,
            },
            hugepunch_range {
                offset: 0x200800,
                len: 4096,
            },
        ];
        let mut index = usize::MAX;
        assert_eq!(
            hugepunch_punch_many(f, batch.as_ptr(), 2, &mut index),
            -EINVAL
        );
        assert_eq!(index, 1);
        // A batch larger than the stack buffer.
        let big: Vec<hugepunch_range> = (0..300)
            .map(|i| hugepunch_range {
                offset: 0x200000 + i * 4096,
                len: 4096,
            })
            .collect();
        assert_eq!(
            hugepunch_punch_many(f, big.as_ptr(), big.len(), null_mut()),
            0
        );
        assert_eq!(
            hugepunch_punch_many(f, null(), 0, null_mut()),
            0,
            "an empty batch"
        );

        let s = stats(f);
        assert_eq!(s.huge_frees, 1);
        assert_eq!(s.pending_subpages, 300);
        assert_eq!(s.conversions_rejected, 1);
        assert_eq!(s.errors_invalid_range, 1);
        assert_eq!(s.invalidations_immediate, 0, "the host says shared");

        let (mut size, mut order, mut huge) = (0, 0, 0);
        assert_eq!(hugepunch_geometry(f, &mut size, &mut order, &mut huge), 0);
        assert_eq!((size, order, huge), (4 << 20, 9, MIB2));

        let mut still = u64::MAX;
        assert_eq!(hugepunch_teardown(f, &mut still), 0);
        assert_eq!(still, 0);
        assert_eq!(hugepunch_punch(f, 0, 4096), -EIO);
        assert_eq!(hugepunch_is_punched(f, 0, &mut punched), -EIO);
        hugepunch_destroy(f);
    }
}

#[test]
fn failing_callbacks_follow_the_host_contract() {
    let r = Recorder::default();
    r.shared.store(1, Ordering::Relaxed);
    let cfg = hugepunch_config {
        policy: HUGEPUNCH_POLICY_CANCEL_AND_ZERO,
        ..config(4 << 20)
    };
    let f = new_file(&cfg, &r);
    // SAFETY: for every call of this test, a live handle and valid pointers.
    unsafe {
        // A failed free: counted, the memory stays pending, the punch
        // succeeds; flush frees it later.
        r.fail_free.store(-EIO, Ordering::Relaxed);
        for sub in 0..512 {
            assert_eq!(hugepunch_punch(f, sub * 4096, 4096), 0);
        }
        let s = stats(f);
        assert_eq!(
            (s.free_errors, s.huge_frees, s.pending_subpages),
            (1, 0, 512)
        );
        r.fail_free.store(0, Ordering::Relaxed);
        assert_eq!(hugepunch_flush(f, 0, MIB2), 0);
        assert_eq!(stats(f).pending_subpages, 0);

        // A failed zero: the populate returns the callback's errno and the
        // subpage stays punched (never read unzeroed).
        assert_eq!(hugepunch_punch(f, MIB2, 4096), 0);
        r.fail_zero.store(-ENOMEM, Ordering::Relaxed);
        assert_eq!(hugepunch_populate(f, MIB2, 4096, null_mut()), -ENOMEM);
        let mut punched = false;
        assert_eq!(hugepunch_is_punched(f, MIB2, &mut punched), 0);
        assert!(punched, "a failed zero leaves the subpage punched");
        // A positive return is a failure too (EIO).
        r.fail_zero.store(1, Ordering::Relaxed);
        assert_eq!(hugepunch_populate(f, MIB2, 4096, null_mut()), -EIO);
        r.fail_zero.store(0, Ordering::Relaxed);
        assert_eq!(hugepunch_populate(f, MIB2, 4096, null_mut()), 0);
        assert_eq!(hugepunch_is_punched(f, MIB2, &mut punched), 0);
        assert!(!punched);

        // A failed allocation: its errno and where it starts.
        r.fail_allocate.store(-ENOMEM, Ordering::Relaxed);
        let mut at = u64::MAX;
        assert_eq!(hugepunch_populate(f, 0x1000, 4096, &mut at), -ENOMEM);
        assert_eq!(
            at, 0,
            "an absent huge page is allocated whole, from its start"
        );
        r.fail_allocate.store(0, Ordering::Relaxed);

        // A failed invalidation during teardown: nothing freed under it;
        // the call reports the errno, a second teardown frees it.
        r.fail_invalidate.store(-EIO, Ordering::Relaxed);
        let before = r.frees.load(Ordering::Relaxed);
        let mut still = 7;
        assert_eq!(hugepunch_teardown(f, &mut still), -EIO);
        assert_eq!(still, 7, "not written when a callback failed");
        assert_eq!(
            r.frees.load(Ordering::Relaxed),
            before,
            "nothing freed unzapped"
        );
        r.fail_invalidate.store(0, Ordering::Relaxed);
        // A failed free at teardown: -EBUSY and the bytes left.
        r.fail_free.store(-EIO, Ordering::Relaxed);
        assert_eq!(hugepunch_teardown(f, &mut still), -EBUSY);
        assert_eq!(still, MIB2);
        r.fail_free.store(0, Ordering::Relaxed);
        assert_eq!(hugepunch_teardown(f, &mut still), 0);
        assert_eq!(still, 0);
        hugepunch_destroy(f);
    }
}

#[test]
fn a_budget_and_a_policy_reach_the_engine() {
    let r = Recorder::default();
    r.shared.store(1, Ordering::Relaxed);
    let cfg = hugepunch_config {
        budget: 8 * 4096,
        ..config(4 << 20)
    };
    let f = new_file(&cfg, &r);
    // SAFETY: for every call of this test, a live handle and valid pointers.
    unsafe {
        for sub in 0..9 {
            assert_eq!(hugepunch_punch(f, sub * 8192, 4096), 0);
        }
        let s = stats(f);
        assert_eq!(
            s.forced_splits, 1,
            "the ninth pending subpage is over the budget"
        );
        assert_eq!(s.pending_subpages, 0);
        assert_eq!(hugepunch_set_policy(f, HUGEPUNCH_POLICY_CANCEL_AND_ZERO), 0);
        assert_eq!(hugepunch_punch(f, MIB2, 4096), 0);
        assert_eq!(
            hugepunch_convert(f, MIB2, 4096, HUGEPUNCH_PRIVATE, null_mut()),
            0
        );
        assert_eq!(stats(f).repopulated_subpages, 1);
        // A new host for later operations.
        let r2 = Recorder::default();
        assert_eq!(hugepunch_set_host(f, &host(&r2)), 0);
        assert_eq!(hugepunch_punch(f, 3 * 4096, 4096), 0);
        assert!(
            r2.invalidations.load(Ordering::Relaxed) > 0,
            "the new host is called"
        );
        hugepunch_destroy(f);
    }
}

#[test]
fn concurrent_calls_on_one_handle() {
    let _watchdog = Watchdog::start("concurrent_calls_on_one_handle", Duration::from_secs(60));
    let r = Recorder::default();
    r.shared.store(1, Ordering::Relaxed);
    const HUGE: u64 = 8;
    let f = new_file(&config(HUGE * MIB2), &r);
    struct Handle(*mut hugepunch_file);
    // SAFETY: every function but destroy is thread-safe (the header's
    // promise, tested here); destroy runs after the scope joins.
    unsafe impl Sync for Handle {}
    let h = Handle(f);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let h = &h;
            s.spawn(move || {
                // Each thread punches every other subpage of every huge page.
                for sub in (t..HUGE * 512).step_by(2) {
                    // SAFETY: a live handle, shared as the header allows.
                    assert_eq!(unsafe { hugepunch_punch(h.0, sub * 4096, 4096) }, 0);
                    let mut s = hugepunch_stats::default();
                    // SAFETY: as above.
                    assert_eq!(unsafe { hugepunch_get_stats(h.0, &mut s) }, 0);
                }
            });
        }
    });
    let s = stats(f);
    assert_eq!(s.huge_frees, HUGE, "every huge page completed exactly once");
    assert_eq!(r.frees.load(Ordering::Relaxed), HUGE);
    assert_eq!(s.pending_subpages, 0);
    // SAFETY: no call in flight; the last call on the handle.
    unsafe { hugepunch_destroy(f) };
}
