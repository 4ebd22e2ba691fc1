//! One step of a workload: what the pattern generators make and the guest
//! runner plays (its own module, so that neither imports the other).

use crate::trace::Op;

/// One step of a workload: an operation, or a guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A VMM operation.
    Op(Op),
    /// The guest writes a fresh token to the subpage at this offset.
    GuestWrite(u64),
    /// The guest reads the subpage at this offset (and the target checks it).
    GuestRead(u64),
}
