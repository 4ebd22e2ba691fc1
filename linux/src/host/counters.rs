//! What the backend counts: [`Counts`], and the atomic counters behind it.

use crate::sync::{AtomicU64, Ordering};
use serde::Serialize;

/// Counts of what the backend did (exact when no call is in flight).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// `fallocate(PUNCH_HOLE)` calls that reached the kernel, including failed ones.
    pub punch_calls: u64,
    /// Bytes those punches covered (successful ones).
    pub punched_bytes: u64,
    /// `fallocate(KEEP_SIZE)` allocation calls that reached the kernel.
    pub allocate_calls: u64,
    /// `fallocate` calls that returned an error (after `EINTR` retries).
    pub fallocate_errors: u64,
    /// Nanoseconds spent inside `fallocate`.
    pub fallocate_nanos: u64,
    /// `zero` calls.
    pub zero_calls: u64,
    /// Bytes zeroed.
    pub zeroed_bytes: u64,
    /// Nanoseconds spent zeroing.
    pub zero_nanos: u64,
    /// 4 KiB pages faulted in after a guest_memfd allocation.
    pub faulted_pages: u64,
    /// Nanoseconds spent faulting them in.
    pub fault_nanos: u64,
    /// `invalidate_begin` calls.
    pub invalidations_begun: u64,
    /// `invalidate_end` calls.
    pub invalidations_ended: u64,
    /// Huge pages that a partial free broke into 4 KiB pieces (at least
    /// once) and that a whole free or allocation has not made whole again.
    pub huge_pages_split: u64,
}

impl Counts {
    /// Every `fallocate` call (punch or allocation).
    pub fn fallocate_calls(&self) -> u64 {
        self.punch_calls + self.allocate_calls
    }
}

/// The backend's counters, added to by any thread.
#[derive(Default)]
pub(super) struct Counters {
    pub punch_calls: AtomicU64,
    pub punched_bytes: AtomicU64,
    pub allocate_calls: AtomicU64,
    pub fallocate_errors: AtomicU64,
    pub fallocate_nanos: AtomicU64,
    pub zero_calls: AtomicU64,
    pub zeroed_bytes: AtomicU64,
    pub zero_nanos: AtomicU64,
    pub faulted_pages: AtomicU64,
    pub fault_nanos: AtomicU64,
    pub invalidations_begun: AtomicU64,
    pub invalidations_ended: AtomicU64,
}

pub(super) fn add(c: &AtomicU64, v: u64) {
    // ORDERING: Relaxed: a statistic; readers take it at quiescent points,
    // after joining the threads that counted (the join synchronises).
    c.fetch_add(v, Ordering::Relaxed);
}

pub(super) fn get(c: &AtomicU64) -> u64 {
    // ORDERING: Relaxed: see `add`.
    c.load(Ordering::Relaxed)
}

impl Counters {
    /// The counts now, with `huge_pages_split` (which the host tracks).
    pub fn snapshot(&self, huge_pages_split: u64) -> Counts {
        let Counters {
            punch_calls,
            punched_bytes,
            allocate_calls,
            fallocate_errors,
            fallocate_nanos,
            zero_calls,
            zeroed_bytes,
            zero_nanos,
            faulted_pages,
            fault_nanos,
            invalidations_begun,
            invalidations_ended,
        } = self;
        Counts {
            punch_calls: get(punch_calls),
            punched_bytes: get(punched_bytes),
            allocate_calls: get(allocate_calls),
            fallocate_errors: get(fallocate_errors),
            fallocate_nanos: get(fallocate_nanos),
            zero_calls: get(zero_calls),
            zeroed_bytes: get(zeroed_bytes),
            zero_nanos: get(zero_nanos),
            faulted_pages: get(faulted_pages),
            fault_nanos: get(fault_nanos),
            invalidations_begun: get(invalidations_begun),
            invalidations_ended: get(invalidations_ended),
            huge_pages_split,
        }
    }
}
