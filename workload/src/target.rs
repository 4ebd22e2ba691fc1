//! One way to apply an operation: a [`Target`] is anything that can punch,
//! convert, populate, flush and tear down (the engine, the simulated
//! kernel, a real file punched directly, a benchmark's tracker), and
//! [`apply`] is the only `match` over [`Op`] that drives one.

use crate::trace::Op;
use hugepunch::{Attribute, HugePunch};

/// What the operations of a trace act on.
///
/// Each method has the meaning of the engine's method of the same name
/// (docs/CONTRACT.md); a target that has nothing to do for one (a direct
/// punch has nothing pending to flush) returns `Ok(())`.
pub trait Target {
    /// What a refused or failed operation returns.
    type Error;
    /// Punch `offset .. offset + len`.
    fn punch(&self, offset: u64, len: u64) -> Result<(), Self::Error>;
    /// Convert `offset .. offset + len` to `to`.
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Self::Error>;
    /// Populate (allocate, un-punch) `offset .. offset + len`.
    fn populate(&self, offset: u64, len: u64) -> Result<(), Self::Error>;
    /// Free what is pending in `offset .. offset + len`.
    fn flush(&self, offset: u64, len: u64) -> Result<(), Self::Error>;
    /// Tear the file down.
    fn teardown(&self) -> Result<(), Self::Error>;
}

/// Apply one operation to `target`.
pub fn apply<T: Target + ?Sized>(target: &T, op: &Op) -> Result<(), T::Error> {
    match *op {
        Op::Punch { offset, len } => target.punch(offset, len),
        Op::Convert { offset, len, to } => target.convert(offset, len, to),
        Op::Populate { offset, len } => target.populate(offset, len),
        Op::Flush { offset, len } => target.flush(offset, len),
        Op::Teardown => target.teardown(),
    }
}

/// Apply every operation in turn, going on after an error (as a replay
/// does, docs/CONTRACT.md §7); returns how many returned one.
pub fn apply_all<'a, T: Target + ?Sized>(target: &T, ops: impl IntoIterator<Item = &'a Op>) -> u64 {
    ops.into_iter()
        .map(|op| apply(target, op).is_err() as u64)
        .sum()
}

/// The engine itself. Its teardown's report is dropped: what is still
/// allocated after it shows in the engine's statistics and in the host.
impl Target for HugePunch {
    type Error = hugepunch::Error;
    fn punch(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
        HugePunch::punch(self, offset, len)
    }
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Self::Error> {
        HugePunch::convert(self, offset, len, to)
    }
    fn populate(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
        HugePunch::populate(self, offset, len)
    }
    fn flush(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
        HugePunch::flush(self, offset, len)
    }
    fn teardown(&self) -> Result<(), Self::Error> {
        HugePunch::teardown(self);
        Ok(())
    }
}
