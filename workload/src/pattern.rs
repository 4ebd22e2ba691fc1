//! The adversarial patterns: one generator, one seeded RNG ([`Rng`]), one
//! set of names. `hugepunch gen`, `hugepunch replay`, `hugepunch real`, the
//! demo and the bench report all take their operations from here, so the
//! same name, geometry, range and seed mean the same operations
//! everywhere.
//!
//! A pattern covers a range `base .. base + span` of whole huge pages of a
//! file (the whole file for `gen`, `real` and the benches; a window of the
//! guest for the demo), every subpage starting populated and private:
//!
//! | name | operations |
//! | --- | --- |
//! | `ascending` | every subpage punched once, 4 KiB at a time, ascending |
//! | `descending` | the same, descending |
//! | `random` | the same, in an order shuffled by the seed |
//! | `strided` | even subpages, then odd ones |
//! | `round-robin` | subpage *i* of every huge page in turn, for each *i* |
//! | `pin` | every subpage but one of each huge page, the one kept chosen per huge page by the seed: no huge page can be freed whole |
//! | `conversion-churn` | per subpage: convert to shared, punch; after every eighth, the subpage four back (`i % 8 == 3`) is converted back to private without populating (refused while its punch is pending, under the `reject` policy), populated, and converted again |
//! | `straddling` | one range across each huge page boundary, its ends chosen by the seed (1 to half a huge page less one subpage on each side), then the gaps between them |
//!
//! `pin` keeps a random subpage of each huge page (not, say, the last): a
//! tracker that special-cased one position would look better than it is.

use crate::rng::Rng;
use crate::step::Step;
use crate::trace::{Op, Trace};
use hugepunch::{Attribute, Geometry, SUBPAGE_SIZE};

/// The seed every command uses unless told otherwise.
pub const DEFAULT_SEED: u64 = 1;

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
    /// Every subpage but one (chosen by the seed) of each huge page:
    /// nothing can be freed whole.
    Pin,
    /// Private->shared and punch, 4 KiB at a time; some subpages go back to
    /// private, first without populating (refused while pending), then
    /// with.
    ConversionChurn,
    /// Ranges straddling huge page boundaries, then the gaps between them.
    Straddling,
}

/// A name that is not a pattern's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pattern {0:?} (expected one of: {list})", list = Pattern::NAMES.join(", "))]
pub struct UnknownPattern(pub String);

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

    /// Every pattern's name, in the order of [`Pattern::ALL`].
    pub const NAMES: [&'static str; 8] = [
        "ascending",
        "descending",
        "random",
        "strided",
        "round-robin",
        "pin",
        "conversion-churn",
        "straddling",
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
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

    /// The operations over `base .. base + span` of a file of geometry
    /// `geo`.
    ///
    /// # Panics
    ///
    /// If `base` or `span` is not a multiple of the huge page size, `span`
    /// is 0, or the range runs past the end of the file.
    pub fn ops(self, geo: Geometry, base: u64, span: u64, seed: u64) -> Vec<Op> {
        let mut out = Vec::with_capacity(self.operations(geo, span) as usize);
        self.generate(geo, base, span, seed, false, &mut |step| {
            if let Step::Op(op) = step {
                out.push(op);
            }
        });
        out
    }

    /// The operations over `base .. base + span` with the guest's own
    /// accesses among them: the conversion churn writes what it will take
    /// back to private and reads it after (it must read zeros: it was
    /// punched); the pin writes the subpage it keeps of each huge page
    /// before and reads it after. The operations are exactly
    /// [`Pattern::ops`]'s. Panics as [`Pattern::ops`] does.
    pub fn steps(self, geo: Geometry, base: u64, span: u64, seed: u64) -> Vec<Step> {
        let mut out = Vec::new();
        self.generate(geo, base, span, seed, true, &mut |step| out.push(step));
        out
    }

    /// A trace of the pattern over the whole file, which starts populated
    /// and private (what `hugepunch gen` writes; the line numbers are
    /// those of [`Trace::to_text`]).
    pub fn trace(self, geo: Geometry, seed: u64) -> Trace {
        // `to_text` writes four header lines.
        let ops = self.ops(geo, 0, geo.size(), seed);
        Trace {
            size: geo.size(),
            order: geo.order(),
            populated: true,
            start: Attribute::Private,
            ops: ops
                .into_iter()
                .enumerate()
                .map(|(i, op)| (i + 5, op))
                .collect(),
        }
    }

    /// How many operations [`Pattern::ops`] makes over `span` bytes of a
    /// file of geometry `geo`, without making them.
    pub fn operations(self, geo: Geometry, span: u64) -> u64 {
        let subs = span / SUBPAGE_SIZE;
        let pages = span / geo.huge_page_size();
        let full = geo.subpages_per_huge_page() as u64;
        match self {
            Pattern::Pin => subs - pages,
            Pattern::ConversionChurn => 2 * subs + 3 * (full / 8) * pages,
            // One range across each boundary and the file's two ends, then
            // the gap left on each huge page: its two ends take at most
            // half of it, less two subpages (none is left at order 1).
            Pattern::Straddling => pages + 1 + if full > 2 { pages } else { 0 },
            _ => subs,
        }
    }

    /// The generator: every step of the pattern, in order, to `out`.
    fn generate(
        self,
        geo: Geometry,
        base: u64,
        span: u64,
        seed: u64,
        guest: bool,
        out: &mut dyn FnMut(Step),
    ) {
        let hps = geo.huge_page_size();
        assert!(
            span > 0
                && base.is_multiple_of(hps)
                && span.is_multiple_of(hps)
                && base.checked_add(span).is_some_and(|end| end <= geo.size()),
            "a pattern covers whole huge pages inside the file: base {base:#x}, span {span:#x}, {geo:?}"
        );
        let mut rng = Rng::new(seed);
        let full = geo.subpages_per_huge_page() as u64;
        let pages = span / hps;
        let subs = pages * full;
        let at = |s: u64| base + s * SUBPAGE_SIZE;
        let punch = |s: u64| {
            Step::Op(Op::Punch {
                offset: at(s),
                len: SUBPAGE_SIZE,
            })
        };
        match self {
            Pattern::Ascending => (0..subs).for_each(|s| out(punch(s))),
            Pattern::Descending => (0..subs).rev().for_each(|s| out(punch(s))),
            Pattern::Random => {
                let mut order: Vec<u64> = (0..subs).collect();
                rng.shuffle(&mut order);
                order.into_iter().for_each(|s| out(punch(s)));
            }
            Pattern::Strided => {
                (0..subs).step_by(2).for_each(|s| out(punch(s)));
                (1..subs).step_by(2).for_each(|s| out(punch(s)));
            }
            Pattern::RoundRobin => {
                for i in 0..full {
                    (0..pages).for_each(|h| out(punch(h * full + i)));
                }
            }
            Pattern::Pin => {
                let kept: Vec<u64> = (0..pages).map(|h| h * full + rng.below(full)).collect();
                if guest {
                    kept.iter().for_each(|&k| out(Step::GuestWrite(at(k))));
                }
                for (h, &k) in (0..pages).zip(&kept) {
                    (h * full..(h + 1) * full)
                        .filter(|&s| s != k)
                        .for_each(|s| out(punch(s)));
                }
                if guest {
                    kept.iter().for_each(|&k| out(Step::GuestRead(at(k))));
                }
            }
            Pattern::ConversionChurn => {
                let convert = |s: u64, to| {
                    Step::Op(Op::Convert {
                        offset: at(s),
                        len: SUBPAGE_SIZE,
                        to,
                    })
                };
                for h in 0..pages {
                    let first = h * full;
                    if guest {
                        // The guest's data in what it will take back.
                        (0..full)
                            .filter(|i| i % 8 == 3)
                            .for_each(|i| out(Step::GuestWrite(at(first + i))));
                    }
                    for i in 0..full {
                        let s = first + i;
                        out(convert(s, Attribute::Shared));
                        out(punch(s));
                        if i % 8 == 7 {
                            let back = s - 4;
                            // Back to private without populating: refused
                            // while the punch is pending (policy reject).
                            out(convert(back, Attribute::Private));
                            out(Step::Op(Op::Populate {
                                offset: at(back),
                                len: SUBPAGE_SIZE,
                            }));
                            out(convert(back, Attribute::Private));
                            if guest {
                                // It was punched: it must read as zeros.
                                out(Step::GuestRead(at(back)));
                                out(Step::GuestWrite(at(back)));
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
                out(range(0, b[0]));
                for k in 1..pages {
                    out(range(k * full - a[k as usize], k * full + b[k as usize]));
                }
                out(range(subs - a[pages as usize], subs));
                for h in 0..pages {
                    let (s0, s1) = (h * full + b[h as usize], (h + 1) * full - a[h as usize + 1]);
                    if s1 > s0 {
                        out(range(s0, s1));
                    }
                }
            }
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Pattern {
    type Err = UnknownPattern;
    fn from_str(s: &str) -> Result<Self, UnknownPattern> {
        Pattern::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPattern(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(size: u64) -> Geometry {
        Geometry::new(size, 9).unwrap()
    }

    fn punched(ops: &[Op], geo: Geometry) -> Vec<u32> {
        let mut count = vec![0u32; geo.subpages() as usize];
        for op in ops {
            if let Op::Punch { offset, len } = op {
                for i in offset / SUBPAGE_SIZE..(offset + len) / SUBPAGE_SIZE {
                    count[i as usize] += 1;
                }
            }
        }
        count
    }

    #[test]
    fn names_read_back() {
        for (p, name) in Pattern::ALL.into_iter().zip(Pattern::NAMES) {
            assert_eq!(p.name(), name);
            assert_eq!(name.parse::<Pattern>(), Ok(p));
            assert_eq!(p.to_string(), name);
        }
        let e = "churn".parse::<Pattern>().unwrap_err().to_string();
        assert!(
            e.contains("\"churn\"") && e.contains("conversion-churn"),
            "{e}"
        );
    }

    #[test]
    fn full_patterns_punch_every_subpage_once() {
        let geo = geo(16 << 20);
        for p in [
            Pattern::Ascending,
            Pattern::Descending,
            Pattern::Random,
            Pattern::Strided,
            Pattern::RoundRobin,
            Pattern::Straddling,
        ] {
            let ops = p.ops(geo, 0, geo.size(), 7);
            assert!(punched(&ops, geo).iter().all(|&c| c == 1), "{p}");
        }
        let pin = punched(&Pattern::Pin.ops(geo, 0, geo.size(), 7), geo);
        let kept: Vec<usize> = pin
            .chunks(512)
            .map(|h| {
                assert_eq!(
                    h.iter().filter(|&&c| c == 0).count(),
                    1,
                    "pin keeps one subpage per huge page"
                );
                h.iter().position(|&c| c == 0).unwrap()
            })
            .collect();
        assert!(
            kept.iter().any(|&k| k != kept[0]),
            "the kept subpage is chosen per huge page: {kept:?}"
        );
    }

    #[test]
    fn operations_counts_what_the_generator_makes() {
        for order in [1, 3, 9] {
            let geo = Geometry::new(8 * (SUBPAGE_SIZE << order), order).unwrap();
            for p in Pattern::ALL {
                for (base, span) in [
                    (0, geo.size()),
                    (geo.huge_page_size(), 3 * geo.huge_page_size()),
                ] {
                    let ops = p.ops(geo, base, span, 5);
                    assert_eq!(
                        ops.len() as u64,
                        p.operations(geo, span),
                        "{p} order {order}"
                    );
                    let steps = p.steps(geo, base, span, 5);
                    let only_ops: Vec<Op> = steps
                        .iter()
                        .filter_map(|s| match s {
                            Step::Op(op) => Some(*op),
                            _ => None,
                        })
                        .collect();
                    assert_eq!(only_ops, ops, "{p}: the guest's accesses are only added");
                    for op in &ops {
                        let r = op.range().unwrap();
                        assert!(r.offset >= base && r.end() <= base + span, "{p}: {op}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_seed_gives_one_pattern() {
        let geo = geo(8 << 20);
        for p in [Pattern::Random, Pattern::Pin, Pattern::Straddling] {
            assert_eq!(p.ops(geo, 0, geo.size(), 3), p.ops(geo, 0, geo.size(), 3));
            assert_ne!(
                p.ops(geo, 0, geo.size(), 3),
                p.ops(geo, 0, geo.size(), 4),
                "{p}"
            );
        }
    }

    #[test]
    fn generated_traces_read_back() {
        let geo = geo(4 << 20);
        for p in Pattern::ALL {
            let t = p.trace(geo, 1);
            let again = Trace::parse(&t.to_text()).unwrap();
            assert_eq!(again, t, "{p}: the same trace, line numbers included");
            assert!(!t.ops.is_empty());
        }
    }

    #[test]
    fn straddling_ranges_cross_boundaries() {
        let geo = geo(8 << 20);
        let hps = geo.huge_page_size();
        let crossing = Pattern::Straddling
            .ops(geo, 0, geo.size(), 1)
            .iter()
            .filter(|op| matches!(op, Op::Punch { offset, len } if offset / hps != (offset + len - 1) / hps))
            .count();
        assert_eq!(crossing, 3);
    }

    #[test]
    #[should_panic(expected = "whole huge pages")]
    fn a_range_of_part_of_a_huge_page_is_refused() {
        let geo = geo(8 << 20);
        Pattern::Ascending.ops(geo, 4096, 2 << 20, 1);
    }
}
