//! The only door to atomics, `Arc`, locks and thread yields.
//!
//! Under `--cfg hugepunch_loom` every primitive is loom's, so the loom models
//! in `loom-tests/` explore the engine itself, not a copy of it. Nothing else
//! in the crate names `std::sync::atomic` or `loom`.

// The one module allowed to name them (ci/sync-door/clippy.toml forbids
// them everywhere else in the crate).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

#[cfg(not(hugepunch_loom))]
mod imp {
    #[cfg(feature = "rmw-count")]
    pub(crate) use super::counting::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64};
    pub(crate) use std::sync::atomic::Ordering;
    #[cfg(not(feature = "rmw-count"))]
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64};
    pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

    /// Gives the other threads a chance while this one waits on one huge page.
    pub(crate) fn backoff(spins: &mut u32) {
        if *spins < 64 {
            *spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

#[cfg(hugepunch_loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, Ordering};
    pub(crate) use loom::sync::{Mutex, MutexGuard};

    /// Under loom a waiting thread must yield so the model can schedule the
    /// thread it waits for.
    pub(crate) fn backoff(_spins: &mut u32) {
        loom::thread::yield_now();
    }
}

pub(crate) use imp::*;

/// Locks a slow-path mutex, ignoring poisoning: the data it guards is `()`
/// (the mutex only serialises the slow paths), so a panic in another holder
/// leaves nothing inconsistent behind it.
pub(crate) fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The counting shim (feature `rmw-count`, tests only): the same atomics,
/// each read-modify-write (`fetch_*`, `swap`, `compare_exchange*`, failed
/// or not: each is one locked instruction on x86) counted in a per-thread
/// counter that [`crate::rmw_count`] reads. `engine/tests/rmw_count.rs`
/// asserts how many a deferred 4 KiB punch and a batch make.
/// Each wrapper passes its caller's orderings through unchanged (the call
/// sites carry the `ORDERING:` lines); the counter is a plain per-thread
/// `Cell`, no atomic.
#[cfg(all(feature = "rmw-count", not(hugepunch_loom)))]
mod counting {
    use std::cell::Cell;
    use std::sync::atomic::{self, Ordering};

    thread_local! {
        static RMWS: Cell<u64> = const { Cell::new(0) };
    }

    /// Read-modify-writes this thread has made so far.
    pub(crate) fn count() -> u64 {
        RMWS.with(Cell::get)
    }

    fn one() {
        RMWS.with(|c| c.set(c.get() + 1));
    }

    macro_rules! counting_int {
        ($name:ident, $t:ty) => {
            #[derive(Debug, Default)]
            pub(crate) struct $name(atomic::$name);

            #[allow(dead_code)]
            impl $name {
                pub const fn new(v: $t) -> Self {
                    $name(atomic::$name::new(v))
                }
                pub fn load(&self, o: Ordering) -> $t {
                    self.0.load(o)
                }
                pub fn store(&self, v: $t, o: Ordering) {
                    self.0.store(v, o)
                }
                pub fn swap(&self, v: $t, o: Ordering) -> $t {
                    one();
                    self.0.swap(v, o)
                }
                pub fn fetch_add(&self, v: $t, o: Ordering) -> $t {
                    one();
                    self.0.fetch_add(v, o)
                }
                pub fn fetch_sub(&self, v: $t, o: Ordering) -> $t {
                    one();
                    self.0.fetch_sub(v, o)
                }
                pub fn fetch_or(&self, v: $t, o: Ordering) -> $t {
                    one();
                    self.0.fetch_or(v, o)
                }
                pub fn fetch_and(&self, v: $t, o: Ordering) -> $t {
                    one();
                    self.0.fetch_and(v, o)
                }
                pub fn fetch_max(&self, v: $t, o: Ordering) -> $t {
                    one();
                    self.0.fetch_max(v, o)
                }
                pub fn compare_exchange(
                    &self,
                    c: $t,
                    n: $t,
                    s: Ordering,
                    f: Ordering,
                ) -> Result<$t, $t> {
                    one();
                    self.0.compare_exchange(c, n, s, f)
                }
                pub fn compare_exchange_weak(
                    &self,
                    c: $t,
                    n: $t,
                    s: Ordering,
                    f: Ordering,
                ) -> Result<$t, $t> {
                    one();
                    self.0.compare_exchange_weak(c, n, s, f)
                }
            }
        };
    }
    counting_int!(AtomicU64, u64);
    counting_int!(AtomicI64, i64);

    #[derive(Debug, Default)]
    pub(crate) struct AtomicBool(atomic::AtomicBool);

    #[allow(dead_code)]
    impl AtomicBool {
        pub const fn new(v: bool) -> Self {
            AtomicBool(atomic::AtomicBool::new(v))
        }
        pub fn load(&self, o: Ordering) -> bool {
            self.0.load(o)
        }
        pub fn store(&self, v: bool, o: Ordering) {
            self.0.store(v, o)
        }
        pub fn compare_exchange(
            &self,
            c: bool,
            n: bool,
            s: Ordering,
            f: Ordering,
        ) -> Result<bool, bool> {
            one();
            self.0.compare_exchange(c, n, s, f)
        }
    }

    #[derive(Debug)]
    pub(crate) struct AtomicPtr<T>(atomic::AtomicPtr<T>);

    #[allow(dead_code)]
    impl<T> AtomicPtr<T> {
        pub const fn new(p: *mut T) -> Self {
            AtomicPtr(atomic::AtomicPtr::new(p))
        }
        pub fn load(&self, o: Ordering) -> *mut T {
            self.0.load(o)
        }
        pub fn store(&self, p: *mut T, o: Ordering) {
            self.0.store(p, o)
        }
        pub fn compare_exchange(
            &self,
            c: *mut T,
            n: *mut T,
            s: Ordering,
            f: Ordering,
        ) -> Result<*mut T, *mut T> {
            one();
            self.0.compare_exchange(c, n, s, f)
        }
        pub fn compare_exchange_weak(
            &self,
            c: *mut T,
            n: *mut T,
            s: Ordering,
            f: Ordering,
        ) -> Result<*mut T, *mut T> {
            one();
            self.0.compare_exchange_weak(c, n, s, f)
        }
    }
}

#[cfg(all(feature = "rmw-count", not(hugepunch_loom)))]
pub(crate) use counting::count as rmw_count;
