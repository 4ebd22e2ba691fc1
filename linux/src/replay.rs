//! The adversarial patterns on a real file: their operations (from
//! [`hugepunch_workload::Pattern`], the one generator every command uses)
//! over a file of 2 MiB huge pages, and the two ways of replaying them —
//! through the engine, or directly as a VMM does today ([`Direct`]).

use crate::host::{LinuxHost, HUGE_PAGE_SIZE};
use hugepunch::{
    Attribute, Backing, ByteRange, Geometry, Host, HostError, HugePunch, SubpageState, SUBPAGE_SIZE,
};
use hugepunch_workload::{apply_all, Op, Pattern, Target, DEFAULT_SEED};

/// Every pattern, by name (the names of [`Pattern::ALL`]).
pub const PATTERNS: [&str; 8] = Pattern::NAMES;

/// The operations of `pattern` with `seed` over a whole file of `size`
/// bytes of 2 MiB huge pages, every subpage starting private: what
/// `hugepunch real --pattern P --seed S` runs, and what `hugepunch gen P
/// --seed S` writes for the same size. Fails if `size` is not a positive
/// multiple of 2 MiB.
pub fn ops(pattern: Pattern, size: u64, seed: u64) -> Result<Vec<Op>, hugepunch::Error> {
    let order = (HUGE_PAGE_SIZE / SUBPAGE_SIZE).trailing_zeros() as u8;
    Ok(ops_in(pattern, Geometry::new(size, order)?, seed))
}

/// The operations of `pattern` with `seed` over a whole file of geometry
/// `geo` (its size and huge page size; [`ops`] is this for 2 MiB pages).
pub fn ops_in(pattern: Pattern, geo: Geometry, seed: u64) -> Vec<Op> {
    pattern.ops(geo, 0, geo.size(), seed)
}

/// Why [`pattern`] made no operations.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    /// Not a pattern.
    #[error(transparent)]
    Unknown(#[from] hugepunch_workload::UnknownPattern),
    /// Not a file of 2 MiB huge pages (the size).
    #[error("engine: {0}")]
    Geometry(#[from] hugepunch::Error),
}

/// The operations of the pattern named `name` over a whole file of `size`
/// bytes, with the default seed ([`DEFAULT_SEED`]); see [`ops`].
pub fn pattern(name: &str, size: u64) -> Result<Vec<Op>, PatternError> {
    Ok(ops(name.parse()?, size, DEFAULT_SEED)?)
}

/// Replay `ops` through the engine. Errors the engine returns (a refused
/// conversion, say) are counted in its statistics and the replay goes on,
/// as docs/CONTRACT.md §7 says a replay does.
pub fn replay_engine(engine: &HugePunch, ops: &[Op]) {
    apply_all(engine, ops);
}

/// A file punched directly, as a VMM does today without hugepunch: each
/// punch request is one `fallocate(PUNCH_HOLE)` of exactly its range, each
/// populate one `fallocate` allocation, a conversion only changes the
/// attribute, a flush does nothing (nothing is pending), teardown punches
/// the whole file.
#[derive(Clone, Copy)]
pub struct Direct<'a>(pub &'a LinuxHost);

impl Target for Direct<'_> {
    type Error = HostError;
    fn punch(&self, offset: u64, len: u64) -> Result<(), HostError> {
        self.0.free(ByteRange::new(offset, len), 0)
    }
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), HostError> {
        self.0.set_attributes(ByteRange::new(offset, len), to);
        Ok(())
    }
    fn populate(&self, offset: u64, len: u64) -> Result<(), HostError> {
        self.0.allocate(ByteRange::new(offset, len), 0)
    }
    fn flush(&self, _: u64, _: u64) -> Result<(), HostError> {
        Ok(())
    }
    fn teardown(&self) -> Result<(), HostError> {
        self.0.free(ByteRange::new(0, self.0.size()), 0)
    }
}

/// Replay `ops` directly ([`Direct`]). Returns how many the host refused.
pub fn replay_direct(host: &LinuxHost, ops: &[Op]) -> u64 {
    apply_all(&Direct(host), ops)
}

/// Bytes the engine says are allocated: whole `Huge` huge pages (their
/// pending punched subpages are still held), the present subpages of
/// `Split` ones, nothing for `Absent` ones. Call at a quiescent point on a
/// live (not torn down) file.
pub fn engine_allocated_bytes(engine: &HugePunch) -> u64 {
    let hps = engine.huge_page_size();
    (0..engine.huge_pages())
        .map(|h| match engine.backing(h).expect("a live file") {
            Backing::Huge => hps,
            Backing::Absent => 0,
            Backing::Split => {
                (0..hps / SUBPAGE_SIZE)
                    .filter(|s| {
                        engine
                            .subpage_state(h * hps + s * SUBPAGE_SIZE)
                            .expect("a live file")
                            == SubpageState::Present
                    })
                    .count() as u64
                    * SUBPAGE_SIZE
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_punches_every_subpage_but_pin() {
        let size = 4 * HUGE_PAGE_SIZE;
        for name in PATTERNS {
            let mut punched = vec![false; (size / SUBPAGE_SIZE) as usize];
            for op in pattern(name, size).unwrap() {
                if let Op::Punch { offset, len } = op {
                    for s in offset / SUBPAGE_SIZE..(offset + len) / SUBPAGE_SIZE {
                        punched[s as usize] = true;
                    }
                }
            }
            let count = punched.iter().filter(|&&p| p).count() as u64;
            let want = if name == "pin" {
                size / SUBPAGE_SIZE - 4
            } else {
                size / SUBPAGE_SIZE
            };
            assert_eq!(count, want, "{name}");
        }
        assert!(pattern("sideways", size).is_err());
    }

    #[test]
    fn straddling_really_straddles() {
        let ops = pattern("straddling", 2 * HUGE_PAGE_SIZE).unwrap();
        assert!(ops.iter().any(|op| matches!(*op, Op::Punch { offset, len }
            if offset / HUGE_PAGE_SIZE != (offset + len - 1) / HUGE_PAGE_SIZE)));
    }
}
