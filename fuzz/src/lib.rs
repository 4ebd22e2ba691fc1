//! What the fuzz targets share: the byte encoding of a differential case
//! (a [`Setup`] and its [`CaseStep`]s), and the seeds' conversion from traces.
//!
//! # The differential encoding
//!
//! Every byte string decodes to a case, so no input is wasted:
//!
//! - byte 0, the file: order `1 + (b & 3) % 3` (huge pages of 2, 4 or 8
//!   subpages), policy `Reject` or `CancelAndZero` (bit 2), populated
//!   (bit 3), starting attribute shared (bit 4);
//! - byte 1: `1 + (b % 6)` huge pages, and the budget
//!   [`BUDGETS`]`[(b / 6) % 6]` (none, 0, 1, 3 or 8 subpages);
//! - then one step per 3 bytes `k a b` (a short tail is ignored), at most
//!   [`MAX_OPS`] steps, kind `k % 16` (see [`decode_op`]): a range is
//!   subpages `a % n ..` for `1 + b % (n - start)` subpages of a file of
//!   `n`, or, when `a == 255`, [`INVALID_RANGES`]`[b % len]`; an offset is
//!   `a % n` subpages or, when `a == 255`, [`INVALID_OFFSETS`]`[b % len]`.
//!
//! [`encode_case`] writes the canonical bytes of a case whose ranges are
//! valid subpage ranges of its file (the seeds).

use hugepunch::testing::{CaseStep, Setup};
use hugepunch::{Attribute, Policy, SUBPAGE_SIZE};
use hugepunch_workload::{Op, Trace};

const SUB: u64 = SUBPAGE_SIZE;

/// At most this many steps per case (the property test's tiny cases have
/// up to 60 and a tail of 5).
pub const MAX_OPS: usize = 96;

/// The budgets a case may have, in bytes (0 included: a real budget).
pub const BUDGETS: [Option<u64>; 6] =
    [None, None, Some(0), Some(SUB), Some(3 * SUB), Some(8 * SUB)];

/// Ranges that fail validation, besides those past the end of the file
/// (`(size, 4096)` and the like, decoded from a file-relative entry).
pub const INVALID_RANGES: [(u64, u64); 15] = [
    (0, 1),
    (0, 4095),
    (0, 4097),
    (1, 1),
    (1, 4096),
    (4096, 4095),
    (4096, 4097),
    (0, 0),
    (4096, 0),
    (u64::MAX - 4095, 8192),
    (8192, u64::MAX - 4095),
    (u64::MAX - 4095, 4096),
    // Relative to the file's size: (size, 4096), (size - 4096, 8192),
    // (0, size + 4096), filled in by `invalid_range`.
    (u64::MAX, 0),
    (u64::MAX, 1),
    (u64::MAX, 2),
];

/// Offsets that fail validation (the last two relative to the size).
pub const INVALID_OFFSETS: [u64; 6] = [1, 4095, 4097, u64::MAX, u64::MAX - 4095, u64::MAX - 1];

fn invalid_range(size: u64, i: u8) -> (u64, u64) {
    match INVALID_RANGES[i as usize % INVALID_RANGES.len()] {
        (u64::MAX, 0) => (size, 4096),
        (u64::MAX, 1) => (size - 4096, 8192),
        (u64::MAX, 2) => (0, size + 4096),
        r => r,
    }
}

fn invalid_offset(size: u64, i: u8) -> u64 {
    match INVALID_OFFSETS[i as usize % INVALID_OFFSETS.len()] {
        o if o == u64::MAX - 1 => size,
        o => o,
    }
}

/// The file of a case from its two header bytes.
pub fn decode_setup(b0: u8, b1: u8) -> Setup {
    Setup {
        order: 1 + (b0 & 3) % 3,
        huge_pages: 1 + u64::from(b1 % 6),
        budget: BUDGETS[(b1 / 6) as usize % BUDGETS.len()],
        policy: if b0 & 4 == 0 {
            Policy::Reject
        } else {
            Policy::CancelAndZero
        },
        populated: b0 & 8 != 0,
        start: if b0 & 16 == 0 {
            Attribute::Private
        } else {
            Attribute::Shared
        },
    }
}

/// One step from its three bytes, for the file of `setup`.
pub fn decode_op(setup: &Setup, k: u8, a: u8, b: u8) -> CaseStep {
    let n = setup.subpages();
    let size = setup.size();
    let range = || {
        if a == 255 {
            invalid_range(size, b)
        } else {
            let start = u64::from(a) % n;
            let len = 1 + u64::from(b) % (n - start);
            (start * SUB, len * SUB)
        }
    };
    let offset = || {
        if a == 255 {
            invalid_offset(size, b)
        } else {
            (u64::from(a) % n) * SUB
        }
    };
    let huge_page = || {
        if a == 255 {
            u64::MAX
        } else {
            u64::from(a) % (setup.huge_pages + 2)
        }
    };
    match k % 16 {
        0..=2 => {
            let (o, l) = range();
            CaseStep::Punch(o, l)
        }
        // A batch: up to 16 ranges of 4 KiB from subpage `a`,
        // 1 to 16 subpages apart (`b`'s halves); `a == 255`: the range at
        // index `b % 16` is invalid.
        3 => CaseStep::PunchMany {
            first: u64::from(a) % n,
            count: 1 + (b & 15),
            step: 1 + u64::from(b >> 4),
            invalid_at: if a == 255 { b & 15 } else { u8::MAX },
        },
        4 | 5 => {
            let (o, l) = range();
            CaseStep::Convert(o, l, Attribute::Private)
        }
        6 => {
            let (o, l) = range();
            CaseStep::Convert(o, l, Attribute::Shared)
        }
        7 | 8 => {
            let (o, l) = range();
            CaseStep::Populate(o, l)
        }
        9 => {
            let (o, l) = range();
            CaseStep::Flush(o, l)
        }
        10 => CaseStep::FailFrees(1 + u64::from(b % 3)),
        11 => CaseStep::SetPolicy(if b & 1 == 0 {
            Policy::Reject
        } else {
            Policy::CancelAndZero
        }),
        12 => match b % 3 {
            0 => CaseStep::SubpageState(offset()),
            1 => CaseStep::IsPunched(offset()),
            _ => {
                let (o, l) = range();
                CaseStep::PendingRanges(o, l)
            }
        },
        13 => CaseStep::Backing(huge_page()),
        14 => CaseStep::MaxMappingOrder(huge_page()),
        _ => CaseStep::Teardown,
    }
}

/// Any bytes as a case: a file and at most [`MAX_OPS`] steps.
pub fn decode_case(data: &[u8]) -> (Setup, Vec<CaseStep>) {
    let setup = decode_setup(
        data.first().copied().unwrap_or(0),
        data.get(1).copied().unwrap_or(0),
    );
    let ops = data
        .get(2..)
        .unwrap_or(&[])
        .chunks_exact(3)
        .take(MAX_OPS)
        .map(|c| decode_op(&setup, c[0], c[1], c[2]))
        .collect();
    (setup, ops)
}

/// The canonical bytes of a case whose ranges are valid subpage ranges of
/// its file of at most 255 subpages, or `None`. Queries, knobs and invalid
/// ranges are not encoded (the seeds have none: the fuzzer adds them).
pub fn encode_case(setup: &Setup, ops: &[CaseStep]) -> Option<Vec<u8>> {
    let n = setup.subpages();
    if !(1..=3).contains(&setup.order) || !(1..=6).contains(&setup.huge_pages) || n > 254 {
        return None;
    }
    let budget = BUDGETS.iter().position(|b| *b == setup.budget)? as u8;
    let mut out = vec![
        (setup.order - 1)
            | if setup.policy == Policy::CancelAndZero {
                4
            } else {
                0
            }
            | if setup.populated { 8 } else { 0 }
            | if setup.start == Attribute::Shared {
                16
            } else {
                0
            },
        (setup.huge_pages - 1) as u8 + 6 * budget,
    ];
    let range = |o: u64, l: u64| -> Option<(u8, u8)> {
        let (start, len) = (o / SUB, l / SUB);
        let valid = o.is_multiple_of(SUB) && l.is_multiple_of(SUB) && len > 0 && start + len <= n;
        valid.then(|| (start as u8, (len - 1) as u8))
    };
    for op in ops.iter().take(MAX_OPS) {
        let (k, (a, b)) = match *op {
            CaseStep::Punch(o, l) => (0, range(o, l)?),
            CaseStep::Convert(o, l, Attribute::Private) => (4, range(o, l)?),
            CaseStep::Convert(o, l, Attribute::Shared) => (6, range(o, l)?),
            CaseStep::Populate(o, l) => (7, range(o, l)?),
            CaseStep::Flush(o, l) => (9, range(o, l)?),
            CaseStep::Teardown => (15, (0, 0)),
            _ => return None,
        };
        out.extend([k, a, b]);
    }
    Some(out)
}

/// A parsed trace as a differential case (the trace's own file), if it
/// fits the encoding.
pub fn case_of_trace(trace: &Trace, budget: Option<u64>, policy: Policy) -> Option<Vec<u8>> {
    let setup = Setup {
        order: trace.order,
        huge_pages: trace.size >> (12 + u32::from(trace.order)),
        budget,
        policy,
        populated: trace.populated,
        start: trace.start,
    };
    if setup.size() != trace.size {
        return None;
    }
    let ops: Vec<CaseStep> = trace
        .ops
        .iter()
        .map(|(_, op)| match *op {
            Op::Punch { offset, len } => CaseStep::Punch(offset, len),
            Op::Convert { offset, len, to } => CaseStep::Convert(offset, len, to),
            Op::Populate { offset, len } => CaseStep::Populate(offset, len),
            Op::Flush { offset, len } => CaseStep::Flush(offset, len),
            Op::Teardown => CaseStep::Teardown,
        })
        .collect();
    encode_case(&setup, &ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips() {
        let setup = decode_setup(2 | 8, 3 + 6 * 2);
        assert_eq!(setup.order, 3);
        assert_eq!(setup.huge_pages, 4);
        assert_eq!(setup.budget, Some(0));
        let ops = vec![
            CaseStep::Punch(SUB, 30 * SUB),
            CaseStep::Convert(0, SUB, Attribute::Shared),
            CaseStep::Populate(0, 32 * SUB),
            CaseStep::Teardown,
        ];
        let bytes = encode_case(&setup, &ops).unwrap();
        let (s2, ops2) = decode_case(&bytes);
        assert_eq!(format!("{setup:?}"), format!("{s2:?}"));
        assert!(ops == ops2);
    }

    #[test]
    fn any_bytes_decode_to_valid_files() {
        for b0 in 0..=255u8 {
            for b1 in 0..=255u8 {
                let (s, ops) = decode_case(&[b0, b1, 255, 255, 255, 3, 255, 2, 12, 255, 7]);
                assert!((1..=3).contains(&s.order) && (1..=6).contains(&s.huge_pages));
                assert_eq!(ops.len(), 3);
            }
        }
    }

    /// The text seeds are traces the parser accepts (a grammar change that
    /// refuses one would leave the fuzzer starting from nothing).
    #[test]
    fn text_seeds_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        for target in ["trace_parse", "replay"] {
            let mut n = 0;
            for entry in std::fs::read_dir(dir.join(target)).unwrap() {
                let path = entry.unwrap().path();
                let text = std::fs::read_to_string(&path).unwrap();
                if let Err(e) = Trace::parse(&text) {
                    panic!("{}: {e}", path.display());
                }
                n += 1;
            }
            assert!(n >= 20, "{target}: only {n} seeds");
        }
    }
}
