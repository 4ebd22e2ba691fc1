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
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, Ordering};
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
