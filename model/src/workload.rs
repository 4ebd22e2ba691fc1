//! Adversarial workloads: the patterns `hugepunch gen` writes as traces,
//! and the demo's workloads (the same patterns over a window of a guest,
//! with guest writes and reads around them so lost or stale data shows).

use crate::geometry::Geometry;
use crate::kernel::Kernel;
use hugepunch::trace::Op;
use hugepunch::{Attribute, Error, SUBPAGE_SIZE};
use std::fmt::Write as _;

/// An adversarial punch pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// 4 KiB punches, ascending.
    Ascending,
    /// 4 KiB punches, descending.
    Descending,
    /// 4 KiB punches in a random order.
    Random,
    /// Even subpages first, then odd ones.
    Strided,
    /// One subpage of each huge page in turn.
    RoundRobin,
    /// Every subpage but one of each huge page: nothing can be freed whole.
    Pin,
    /// Private->shared and punch, 4 KiB at a time; some subpages go back to
    /// private, first without populating (refused while pending), then
    /// with.
    ConversionChurn,
    /// Ranges straddling huge page boundaries, then the gaps between them.
    Straddling,
}

impl Pattern {
    /// Every pattern.
    pub const ALL: [Pattern; 8] = [
        Pattern::Ascending,
        Pattern::Descending,
        Pattern::Random,
        Pattern::Strided,
        Pattern::RoundRobin,
        Pattern::Pin,
        Pattern::ConversionChurn,
        Pattern::Straddling,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Ascending => "ascending",
            Pattern::Descending => "descending",
            Pattern::Random => "random",
            Pattern::Strided => "strided",
            Pattern::RoundRobin => "round-robin",
            Pattern::Pin => "pin",
            Pattern::ConversionChurn => "conversion-churn",
            Pattern::Straddling => "straddling",
        }
    }

    /// What it does, in one line.
    pub fn describes(self) -> &'static str {
        match self {
            Pattern::Ascending => "4 KiB punches, ascending",
            Pattern::Descending => "4 KiB punches, descending",
            Pattern::Random => "4 KiB punches in random order",
            Pattern::Strided => "even subpages, then odd ones",
            Pattern::RoundRobin => "one subpage of each huge page in turn",
            Pattern::Pin => "all but one subpage of every huge page",
            Pattern::ConversionChurn => {
                "private->shared + punch, some back to private with and without populate"
            }
            Pattern::Straddling => {
                "unaligned ranges straddling huge page boundaries, then the gaps"
            }
        }
    }
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Pattern::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown pattern {s:?} (expected one of: {})",
                    Pattern::ALL.map(|p| p.name()).join(", ")
                )
            })
    }
}

/// A small deterministic generator (SplitMix64), so a seed gives the same
/// trace on every machine and version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Shuffle in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// One step of a workload: a trace operation, or a guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A VMM operation.
    Op(Op),
    /// The guest writes a fresh token to the subpage at this offset.
    GuestWrite(u64),
    /// The guest reads the subpage at this offset (and the model checks it).
    GuestRead(u64),
}

/// The steps of `pattern` over `[base, base + span)` of a file of geometry
/// `geo` (`span` a multiple of the huge page size). With `guest`, the
/// pattern's own guest accesses are included (the conversion churn writes
/// what it will re-privatise and reads it back; the pin writes what it
/// keeps).
pub fn pattern_steps(
    pattern: Pattern,
    geo: Geometry,
    base: u64,
    span: u64,
    seed: u64,
    guest: bool,
) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let full = geo.full() as u64;
    let hps = geo.huge_page_size();
    let pages = span / hps;
    let subs = pages * full;
    let at = |s: u64| base + s * SUBPAGE_SIZE;
    let punch = |s: u64| {
        Step::Op(Op::Punch {
            offset: at(s),
            len: SUBPAGE_SIZE,
        })
    };
    let mut out = Vec::new();
    match pattern {
        Pattern::Ascending => out.extend((0..subs).map(punch)),
        Pattern::Descending => out.extend((0..subs).rev().map(punch)),
        Pattern::Random => {
            let mut order: Vec<u64> = (0..subs).collect();
            rng.shuffle(&mut order);
            out.extend(order.into_iter().map(punch));
        }
        Pattern::Strided => {
            out.extend((0..subs).step_by(2).map(punch));
            out.extend((1..subs).step_by(2).map(punch));
        }
        Pattern::RoundRobin => {
            for i in 0..full {
                out.extend((0..pages).map(|h| punch(h * full + i)));
            }
        }
        Pattern::Pin => {
            let kept: Vec<u64> = (0..pages).map(|_| rng.below(full)).collect();
            if guest {
                out.extend(
                    kept.iter()
                        .enumerate()
                        .map(|(h, &k)| Step::GuestWrite(at(h as u64 * full + k))),
                );
            }
            for (h, &k) in kept.iter().enumerate() {
                let h = h as u64;
                out.extend((0..full).filter(|&i| i != k).map(|i| punch(h * full + i)));
            }
            if guest {
                out.extend(
                    kept.iter()
                        .enumerate()
                        .map(|(h, &k)| Step::GuestRead(at(h as u64 * full + k))),
                );
            }
        }
        Pattern::ConversionChurn => {
            let four_k = SUBPAGE_SIZE;
            let convert = |s: u64, to| {
                Step::Op(Op::Convert {
                    offset: at(s),
                    len: four_k,
                    to,
                })
            };
            for h in 0..pages {
                let first = h * full;
                if guest {
                    // The guest's data in what it will take back.
                    out.extend(
                        (0..full)
                            .filter(|i| i % 8 == 3)
                            .map(|i| Step::GuestWrite(at(first + i))),
                    );
                }
                for i in 0..full {
                    let s = first + i;
                    out.push(convert(s, Attribute::Shared));
                    out.push(punch(s));
                    if i % 8 == 7 {
                        let back = s - 4;
                        // Back to private without populating: refused while
                        // the punch is pending (policy reject).
                        out.push(convert(back, Attribute::Private));
                        out.push(Step::Op(Op::Populate {
                            offset: at(back),
                            len: four_k,
                        }));
                        out.push(convert(back, Attribute::Private));
                        if guest {
                            // It was punched: it must read as zeros.
                            out.push(Step::GuestRead(at(back)));
                            out.push(Step::GuestWrite(at(back)));
                        }
                    }
                }
            }
        }
        Pattern::Straddling => {
            let half = (full / 2).max(2);
            // a[k]: subpages before boundary k, b[k]: after it.
            let a: Vec<u64> = (0..=pages).map(|_| 1 + rng.below(half - 1)).collect();
            let b: Vec<u64> = (0..=pages).map(|_| 1 + rng.below(half - 1)).collect();
            let range = |s0: u64, s1: u64| {
                Step::Op(Op::Punch {
                    offset: at(s0),
                    len: (s1 - s0) * SUBPAGE_SIZE,
                })
            };
            out.push(range(0, b[0]));
            for k in 1..pages {
                out.push(range(k * full - a[k as usize], k * full + b[k as usize]));
            }
            out.push(range(subs - a[pages as usize], subs));
            for h in 0..pages {
                let (s0, s1) = (h * full + b[h as usize], (h + 1) * full - a[h as usize + 1]);
                if s1 > s0 {
                    out.push(range(s0, s1));
                }
            }
        }
    }
    out
}

/// A trace of `pattern` over a whole file, as text (CONTRACT.md §7).
pub fn generate(pattern: Pattern, geo: Geometry, seed: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# hugepunch gen {} --size {} --order {} --seed {}",
        pattern.name(),
        geo.size,
        geo.order,
        seed
    );
    let _ = writeln!(s, "# {}", pattern.describes());
    let _ = writeln!(s, "size {:#x}", geo.size);
    let _ = writeln!(s, "order {}", geo.order);
    let _ = writeln!(s, "start populated");
    let _ = writeln!(s, "start private");
    for step in pattern_steps(pattern, geo, 0, geo.size, seed, false) {
        if let Step::Op(op) = step {
            let _ = writeln!(s, "{}", format_op(&op));
        }
    }
    s
}

/// One operation as a trace line.
pub fn format_op(op: &Op) -> String {
    let attr = |a: Attribute| {
        if a == Attribute::Private {
            "private"
        } else {
            "shared"
        }
    };
    match *op {
        Op::Punch { offset, len } => format!("punch {offset:#x} {len:#x}"),
        Op::Convert { offset, len, to } => format!("convert {offset:#x} {len:#x} {}", attr(to)),
        Op::Populate { offset, len } => format!("populate {offset:#x} {len:#x}"),
        Op::Flush { offset, len } => format!("flush {offset:#x} {len:#x}"),
        Op::Teardown => "teardown".to_string(),
    }
}

/// A demo workload: a pattern over a window of a guest, with the guest's
/// own accesses around it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The pattern.
    pub pattern: Pattern,
    /// The window's size in bytes.
    pub window: u64,
    /// Its steps.
    pub steps: Vec<Step>,
}

/// The demo's workloads for a guest of geometry `geo`: every pattern over
/// a window of `window` bytes in the middle of the guest. Before each, the
/// guest writes the first subpage of every huge page of the window (so it
/// is mapped, huge, and punches must invalidate it) and one witness
/// subpage in each neighbouring huge page; after it, it reads the
/// witnesses back.
pub fn demo_workloads(geo: Geometry, window: u64, seed: u64) -> Vec<Workload> {
    let hps = geo.huge_page_size();
    let window = window.min(geo.size.saturating_sub(2 * hps)).max(hps) / hps * hps;
    let base = ((geo.size - window) / 2) / hps * hps;
    let witnesses: Vec<u64> = [base.checked_sub(SUBPAGE_SIZE), Some(base + window)]
        .into_iter()
        .flatten()
        .filter(|&w| w < geo.size)
        .collect();
    Pattern::ALL
        .iter()
        .enumerate()
        .map(|(i, &pattern)| {
            let mut steps: Vec<Step> = (0..window / hps)
                .map(|h| Step::GuestWrite(base + h * hps))
                .collect();
            steps.extend(witnesses.iter().map(|&w| Step::GuestWrite(w)));
            steps.extend(pattern_steps(
                pattern,
                geo,
                base,
                window,
                seed.wrapping_add(i as u64),
                true,
            ));
            steps.extend(witnesses.iter().map(|&w| Step::GuestRead(w)));
            Workload {
                pattern,
                window,
                steps,
            }
        })
        .collect()
}

/// Run a step on a kernel. Guest accesses that fail (after teardown) and
/// operations that fail are returned as errors, for the caller to count.
pub fn run_step(kernel: &Kernel, step: &Step) -> Result<(), Error> {
    match *step {
        Step::Op(op) => kernel.apply(&op),
        Step::GuestWrite(offset) => kernel.guest_write(offset).map(drop),
        Step::GuestRead(offset) => kernel.guest_read(offset).map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hugepunch::trace::Trace;

    fn punched(steps: &[Step], geo: Geometry) -> Vec<u32> {
        let mut count = vec![0u32; geo.subpages() as usize];
        for s in steps {
            if let Step::Op(Op::Punch { offset, len }) = s {
                for i in offset / SUBPAGE_SIZE..(offset + len) / SUBPAGE_SIZE {
                    count[i as usize] += 1;
                }
            }
        }
        count
    }

    #[test]
    fn full_patterns_punch_every_subpage_once() {
        let geo = Geometry {
            size: 16 << 20,
            order: 9,
        };
        for p in [
            Pattern::Ascending,
            Pattern::Descending,
            Pattern::Random,
            Pattern::Strided,
            Pattern::RoundRobin,
            Pattern::Straddling,
        ] {
            let steps = pattern_steps(p, geo, 0, geo.size, 7, false);
            assert!(punched(&steps, geo).iter().all(|&c| c == 1), "{}", p.name());
        }
        let pin = punched(
            &pattern_steps(Pattern::Pin, geo, 0, geo.size, 7, false),
            geo,
        );
        for h in pin.chunks(512) {
            assert_eq!(
                h.iter().filter(|&&c| c == 0).count(),
                1,
                "pin keeps one subpage per huge page"
            );
        }
    }

    #[test]
    fn generated_traces_parse() {
        let geo = Geometry {
            size: 4 << 20,
            order: 9,
        };
        for p in Pattern::ALL {
            let t = Trace::parse(&generate(p, geo, 1)).unwrap();
            assert_eq!((t.size, t.order), (geo.size, geo.order));
            assert!(!t.ops.is_empty());
        }
        assert_eq!(
            generate(Pattern::Random, geo, 3),
            generate(Pattern::Random, geo, 3)
        );
        assert_ne!(
            generate(Pattern::Random, geo, 3),
            generate(Pattern::Random, geo, 4)
        );
    }

    #[test]
    fn straddling_ranges_cross_boundaries() {
        let geo = Geometry {
            size: 8 << 20,
            order: 9,
        };
        let steps = pattern_steps(Pattern::Straddling, geo, 0, geo.size, 1, false);
        let hps = geo.huge_page_size();
        let crossing = steps
            .iter()
            .filter(|s| matches!(s, Step::Op(Op::Punch { offset, len }) if offset / hps != (offset + len - 1) / hps))
            .count();
        assert_eq!(crossing, 3);
    }
}
