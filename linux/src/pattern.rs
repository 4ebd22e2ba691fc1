//! The adversarial 4 KiB patterns (the same names and shapes as the
//! benches), as trace operations over a file of 2 MiB huge pages, and the
//! two ways of replaying them on a real file: through the engine, or
//! directly as a VMM does today.

use crate::host::{LinuxHost, HUGE_PAGE_SIZE};
use hugepunch::trace::Op;
use hugepunch::{Attribute, Backing, ByteRange, Host, HugePunch, SubpageState, SUBPAGE_SIZE};

/// Every pattern, by name.
pub const PATTERNS: &[&str] = &[
    "ascending",
    "descending",
    "random",
    "strided",
    "round-robin",
    "pin",
    "churn",
    "straddling",
];

const PER: u64 = HUGE_PAGE_SIZE / SUBPAGE_SIZE;

/// An unknown pattern name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pattern {0:?} (one of: {list})", list = PATTERNS.join(", "))]
pub struct UnknownPattern(pub String);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The operations of pattern `name` over a file of `size` bytes (a
/// multiple of 2 MiB), every subpage starting private:
///
/// - `ascending`, `descending`: every subpage once, in order;
/// - `random`: every subpage once, in a fixed pseudo-random order;
/// - `strided`: even subpages, then odd ones;
/// - `round-robin`: subpage i of every huge page, for i = 0..512;
/// - `pin`: every subpage but the last of each huge page (nothing completes);
/// - `churn` (conversion churn): per subpage, convert to shared, punch,
///   populate, convert back to private;
/// - `straddling`: 12 KiB ranges back to back, so some straddle two huge
///   pages, then the tail 4 KiB at a time.
pub fn pattern(name: &str, size: u64) -> Result<Vec<Op>, UnknownPattern> {
    let n = size / SUBPAGE_SIZE;
    let huge_pages = size / HUGE_PAGE_SIZE;
    let punch = |s: u64| Op::Punch {
        offset: s * SUBPAGE_SIZE,
        len: SUBPAGE_SIZE,
    };
    Ok(match name {
        "ascending" => (0..n).map(punch).collect(),
        "descending" => (0..n).rev().map(punch).collect(),
        "random" => {
            let mut v: Vec<u64> = (0..n).collect();
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            for i in (1..v.len()).rev() {
                v.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            v.into_iter().map(punch).collect()
        }
        "strided" => (0..n)
            .filter(|s| s % 2 == 0)
            .chain((0..n).filter(|s| s % 2 == 1))
            .map(punch)
            .collect(),
        "round-robin" => (0..PER)
            .flat_map(|i| (0..huge_pages).map(move |h| h * PER + i))
            .map(punch)
            .collect(),
        "pin" => (0..n).filter(|s| s % PER != PER - 1).map(punch).collect(),
        "churn" | "conversion-churn" => (0..n)
            .flat_map(|s| {
                let (offset, len) = (s * SUBPAGE_SIZE, SUBPAGE_SIZE);
                [
                    Op::Convert {
                        offset,
                        len,
                        to: Attribute::Shared,
                    },
                    Op::Punch { offset, len },
                    Op::Populate { offset, len },
                    Op::Convert {
                        offset,
                        len,
                        to: Attribute::Private,
                    },
                ]
            })
            .collect(),
        "straddling" => {
            let mut v: Vec<Op> = (0..n / 3)
                .map(|i| Op::Punch {
                    offset: i * 3 * SUBPAGE_SIZE,
                    len: 3 * SUBPAGE_SIZE,
                })
                .collect();
            v.extend((n / 3 * 3..n).map(punch));
            v
        }
        other => return Err(UnknownPattern(other.to_string())),
    })
}

/// Replay `ops` through the engine. Errors the engine returns (a refused
/// conversion, say) are counted in its statistics and the replay goes on,
/// as SPEC.md §7 says a replay does.
pub fn replay_engine(engine: &HugePunch, ops: &[Op]) {
    for op in ops {
        let _ = match *op {
            Op::Punch { offset, len } => engine.punch(offset, len),
            Op::Convert { offset, len, to } => engine.convert(offset, len, to),
            Op::Populate { offset, len } => engine.populate(offset, len),
            Op::Flush { offset, len } => engine.flush(offset, len),
            Op::Teardown => {
                engine.teardown();
                Ok(())
            }
        };
    }
}

/// Replay `ops` directly, as a VMM does today without hugepunch: each punch
/// request is one `fallocate(PUNCH_HOLE)` of exactly its range, each
/// populate one `fallocate` allocation, a conversion only changes the
/// attribute, a flush does nothing (nothing is pending), teardown punches
/// the whole file. Returns the errors the host returned.
pub fn replay_direct(host: &LinuxHost, ops: &[Op]) -> u64 {
    let mut errors = 0;
    for op in ops {
        let res = match *op {
            Op::Punch { offset, len } => host.free(ByteRange::new(offset, len), 0),
            Op::Populate { offset, len } => host.allocate(ByteRange::new(offset, len), 0),
            Op::Convert { offset, len, to } => {
                host.set_attributes(ByteRange::new(offset, len), to);
                Ok(())
            }
            Op::Flush { .. } => Ok(()),
            Op::Teardown => host.free(ByteRange::new(0, host.size()), 0),
        };
        errors += res.is_err() as u64;
    }
    errors
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
            let want = if *name == "pin" {
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
