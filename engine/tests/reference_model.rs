//! Property tests of the engine against a plain sequential reference model
//! of CONTRACT.md §3 and §6, written from the text of the contract.
//!
//! The model and the comparison live in `hugepunch::testing` (the
//! `test-util` feature), where the `differential` fuzz target uses them
//! too; this file holds the strategies that generate cases and the
//! properties. The case counts below are the defaults; `PROPTEST_CASES`
//! replaces every one of them (ci/sanitizers.sh lowers it, a long run
//! raises it).
//!
//! The model keeps, per huge page, its backing (`Absent`, `Huge`, `Split`)
//! and one bit per subpage (punched for a `Huge` huge page, present for a
//! `Split` one), the attribute of every subpage, the 19 statistics of §6
//! under their names, a "fail the next N frees" knob, and the host events
//! it would cause. Random sequences of every operation (valid and invalid
//! ranges, free failures, policy changes, teardown, queries) run on the
//! engine with a [`RecordingHost`] and on the model; after every step the
//! result, the whole statistics snapshot, the host events (invalidations
//! with their hints, frees with their order, allocations, zeroing,
//! attribute changes), the backing and `max_mapping_order` of every huge
//! page, the state of the subpages (every subpage for small orders, samples
//! and `pending_ranges` for order 18), the host's residency and attributes
//! must all agree.
//!
//! The invariants of CONTRACT.md §4 these tests guard, for one caller:
//!
//! - Invariant 1 (exactly-once completion): every whole free is a model
//!   event; the model completes a huge page only when a punch leaves every
//!   one of its subpages punched, and the host panics on a double free.
//! - Invariant 2 (no deferred invalidation of private memory): the event
//!   stream of every `punch` must carry the model's immediate
//!   invalidations, each exactly the part of the range inside one huge
//!   page, with its hint, before `punch` returns.
//! - Invariant 3 (no conversion to private over a pending punch): under
//!   `Reject` the result must be the model's `PendingPunch { offset }` of the
//!   first pending subpage, no `set_attributes` may be seen, and only
//!   `convert_calls` and `conversions_rejected` may move.
//! - Invariant 4 (no data loss), its sequential part: every free of an
//!   operation is covered by an invalidation issued earlier in the same
//!   operation, and nothing the model keeps allocated is freed.
//! - Invariant 5 (no stale data): every un-punch (populate,
//!   `CancelAndZero`) and every failed 4 KiB free of punched memory must
//!   zero exactly the model's subpages.
//! - Invariant 6 (nothing leaked): the host's residency equals the model's
//!   (freed + pending + live = allocated) after every step, and after a
//!   final teardown nothing is allocated.
//! - Invariant 7 (bounded deferral): with a budget, pending bytes after
//!   every step are within it unless a whole free failed (checked
//!   explicitly, besides the model's `pending_subpages`).
//! - Invariant 8 (bad input changes nothing): invalid ranges and calls after
//!   teardown must return the model's error and move only its counter.
//!
//!
//! Where CONTRACT.md is terse the model reads it as `hugepunch::testing`'s
//! model documentation says; the order of `invalidate_end` against the
//! frees is not compared (only begin/end pairing); the completion's bracket
//! is checked in `invariants.rs`.

mod common;

use common::Event;
use hugepunch::testing::{self, CaseStep, Model, Setup};
use hugepunch::{Attribute, ByteRange, Hint, Policy, SUBPAGE_SIZE};
use proptest::prelude::*;

const SUB: u64 = SUBPAGE_SIZE;

/// The number of cases of a property: `default`, or `PROPTEST_CASES` when
/// it is set (`ProptestConfig::with_cases` alone would ignore it).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// Configurations and strategies
// ---------------------------------------------------------------------------

fn any_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![Just(Policy::Reject), Just(Policy::CancelAndZero)]
}

fn any_attr() -> impl Strategy<Value = Attribute> {
    prop_oneof![Just(Attribute::Private), Just(Attribute::Shared)]
}

fn setup_strategy(
    orders: Vec<u8>,
    huge_pages: std::ops::RangeInclusive<u64>,
    budgets: Vec<Option<u64>>,
) -> BoxedStrategy<Setup> {
    (
        proptest::sample::select(orders),
        huge_pages,
        proptest::sample::select(budgets),
        any_policy(),
        any::<bool>(),
        any_attr(),
    )
        .prop_map(
            |(order, huge_pages, budget, policy, populated, start)| Setup {
                order,
                huge_pages,
                budget,
                policy,
                populated,
                start,
            },
        )
        .boxed()
}

/// A subpage index inside a huge page: any for small orders, a few
/// interesting ones (edges, middle) for order 18.
fn position(setup: &Setup) -> BoxedStrategy<u64> {
    let per = setup.per();
    if setup.sparse() {
        proptest::sample::select(vec![
            0,
            1,
            2,
            3,
            per / 2 - 1,
            per / 2,
            per / 2 + 1,
            per - 3,
            per - 2,
            per - 1,
        ])
        .boxed()
    } else {
        prop_oneof![2 => Just(0), 2 => Just(per - 1), 6 => 0..per].boxed()
    }
}

/// A length in subpages from position `p` inside a huge page.
fn length_from(setup: &Setup, p: u64) -> BoxedStrategy<u64> {
    let room = setup.per() - p;
    if setup.sparse() {
        prop_oneof![4 => 1..=room.min(3), 1 => Just(room)].boxed()
    } else {
        prop_oneof![4 => 1..=room.min(3), 3 => 1..=room, 1 => Just(room)].boxed()
    }
}

/// Ranges that do not pass validation: the bad-range matrix.
fn invalid_range(setup: &Setup) -> BoxedStrategy<(u64, u64)> {
    let size = setup.size();
    proptest::sample::select(vec![
        (0, 1),
        (0, 4095),
        (0, 4097),
        (1, 1),
        (1, 4095),
        (1, 4096),
        (1, 4097),
        (4096, 1),
        (4096, 4095),
        (4096, 4097),
        (0, 0),
        (4096, 0),
        (u64::MAX - 4095, 8192),
        (8192, u64::MAX - 4095),
        (u64::MAX - 4095, 4096),
        (size, 4096),
        (size - 4096, 8192),
        (0, size + 4096),
    ])
    .boxed()
}

/// Valid ranges biased to interesting shapes, in bytes.
fn valid_range(setup: &Setup) -> BoxedStrategy<(u64, u64)> {
    let per = setup.per();
    let hps = setup.huge_pages;
    let total = setup.subpages();
    let s1 = setup.clone();
    let s2 = setup.clone();
    let s3 = setup.clone();
    let single = (0..hps, position(setup)).prop_map(move |(h, p)| (h * per + p, 1));
    let whole = (0..hps).prop_map(move |h| (h * per, per));
    let within = (0..hps, position(setup))
        .prop_flat_map(move |(h, p)| (Just(h), Just(p), length_from(&s1, p)))
        .prop_map(move |(h, p, n)| (h * per + p, n));
    let edge = if setup.sparse() {
        proptest::sample::select(vec![1, 2, 3, per / 2, per]).boxed()
    } else {
        prop_oneof![1..=per.min(4), 1..=per].boxed()
    };
    let straddle = (0..hps.max(2) - 1, edge.clone(), edge).prop_map(move |(h, a, b)| {
        let start = ((h + 1) * per).saturating_sub(a);
        (start, (a + b).min(total - start))
    });
    let span = (0..hps, position(&s2), 0..hps, position(&s3)).prop_map(move |(h1, p1, h2, p2)| {
        let (x, y) = (h1 * per + p1, h2 * per + p2);
        (x.min(y), x.max(y) - x.min(y) + 1)
    });
    let file = Just((0, total));
    prop_oneof![
        4 => single,
        2 => whole,
        3 => within,
        2 => straddle,
        2 => span,
        1 => file,
    ]
    .prop_map(|(s, n)| (s * SUB, n * SUB))
    .boxed()
}

fn range(setup: &Setup) -> BoxedStrategy<(u64, u64)> {
    prop_oneof![12 => valid_range(setup), 1 => invalid_range(setup)].boxed()
}

fn offset(setup: &Setup) -> BoxedStrategy<u64> {
    let size = setup.size();
    prop_oneof![
        8 => valid_range(setup).prop_map(|(o, _)| o),
        1 => proptest::sample::select(vec![1, 4095, 4097, size, size + 4096, u64::MAX, u64::MAX - 4095]),
    ]
    .boxed()
}

fn op_strategy(setup: &Setup) -> BoxedStrategy<CaseStep> {
    let hps = setup.huge_pages;
    prop_oneof![
        10 => range(setup).prop_map(|(o, l)| CaseStep::Punch(o, l)),
        4 => range(setup).prop_map(|(o, l)| CaseStep::Convert(o, l, Attribute::Private)),
        3 => range(setup).prop_map(|(o, l)| CaseStep::Convert(o, l, Attribute::Shared)),
        5 => range(setup).prop_map(|(o, l)| CaseStep::Populate(o, l)),
        2 => range(setup).prop_map(|(o, l)| CaseStep::Flush(o, l)),
        2 => (1u64..=3).prop_map(CaseStep::FailFrees),
        1 => any_policy().prop_map(CaseStep::SetPolicy),
        1 => offset(setup).prop_map(CaseStep::SubpageState),
        1 => offset(setup).prop_map(CaseStep::IsPunched),
        1 => range(setup).prop_map(|(o, l)| CaseStep::PendingRanges(o, l)),
        1 => prop_oneof![0..hps + 2, Just(u64::MAX)].prop_map(CaseStep::Backing),
        1 => prop_oneof![0..hps + 2, Just(u64::MAX)].prop_map(CaseStep::MaxMappingOrder),
        // `punch_many`: compared with its ranges one by one but
        // for its invalidations and its peak (`testing::run_case`).
        3 => (0..setup.subpages(), 0u8..=40, 1u64..=9, prop_oneof![9 => Just(u8::MAX), 1 => 0u8..40])
            .prop_map(|(first, count, step, invalid_at)| CaseStep::PunchMany { first, count, step, invalid_at }),
    ]
    .boxed()
}

/// A setup and a sequence of operations. Teardown ends the useful life of
/// a file, so it comes, in about half the cases, after the main sequence,
/// followed by a few more operations (refused, or a second teardown).
fn case(
    setups: BoxedStrategy<Setup>,
    max_ops: usize,
) -> impl Strategy<Value = (Setup, Vec<CaseStep>)> {
    setups.prop_flat_map(move |s| {
        let ops = proptest::collection::vec(op_strategy(&s), 1..max_ops);
        let after = prop_oneof![
            3 => op_strategy(&s),
            1 => Just(CaseStep::Teardown),
        ];
        let tail = proptest::option::of(proptest::collection::vec(after, 0..5));
        (Just(s), ops, tail).prop_map(|(s, mut ops, tail)| {
            if let Some(tail) = tail {
                ops.push(CaseStep::Teardown);
                ops.extend(tail);
            }
            (s, ops)
        })
    })
}

// ---------------------------------------------------------------------------
// The comparison
// ---------------------------------------------------------------------------

/// `hugepunch::testing::run_case`: every comparison after every step, and
/// the final teardown; its first difference fails the case.
fn run_case(setup: &Setup, ops: &[CaseStep]) -> Result<(), TestCaseError> {
    testing::run_case(setup, ops).map_err(|m| TestCaseError::fail(m.to_string()))
}

// ---------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1200)))]

    /// Tiny huge pages (4 or 8 subpages): dense sequences that reach every
    /// state, both policies, with and without a budget (0 included).
    #[test]
    fn tiny_order_matches_the_model(
        (setup, ops) in case(
            setup_strategy(vec![2, 3], 2..=6, vec![None, None, Some(0), Some(SUB), Some(3 * SUB), Some(8 * SUB)]),
            60,
        )
    ) {
        run_case(&setup, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(200)))]

    /// 2 MiB huge pages, files of 4 to 8 MiB.
    #[test]
    fn order_9_matches_the_model(
        (setup, ops) in case(
            setup_strategy(vec![9], 2..=4, vec![None, None, Some(0), Some(8 * SUB), Some(1 << 20), Some(2 << 20)]),
            40,
        )
    ) {
        run_case(&setup, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(32)))]

    /// 1 GiB huge pages, one or two of them, sparse ranges.
    #[test]
    fn order_18_matches_the_model(
        (setup, ops) in case(
            setup_strategy(vec![18], 1..=2, vec![None, Some(0), Some(16 * SUB), Some(4 << 20)]),
            16,
        )
    ) {
        run_case(&setup, &ops)?;
    }
}

/// The model itself reproduces the seed's example (CONTRACT.md §3): a check of
/// the oracle, independent of the engine.
#[test]
fn model_reproduces_the_seed_example() {
    let setup = Setup {
        order: 9,
        huge_pages: 4,
        budget: None,
        policy: Policy::Reject,
        populated: true,
        start: Attribute::Private,
    };
    let mut m = Model::new(&setup);
    m.punch(0x1000, 0x401000).unwrap();
    let h = |i| Hint {
        huge_page: i,
        order: 9,
    };
    assert_eq!(
        m.events,
        vec![
            Event::InvalidateBegin(ByteRange::new(0x1000, 0x1ff000), h(0)),
            Event::InvalidateBegin(ByteRange::new(0x200000, 0x200000), h(1)),
            Event::Free(ByteRange::new(0x200000, 0x200000), 9),
            Event::InvalidateBegin(ByteRange::new(0x400000, 0x2000), h(2)),
        ]
    );
    assert_eq!(m.stats.invalidations, 3);
    assert_eq!(m.stats.invalidations_immediate, 2);
    assert_eq!(m.stats.huge_frees, 1);
    assert_eq!(m.stats.pending_subpages, 513);
    assert_eq!(m.stats.pending_bytes_peak, 2101248);
    assert_eq!(m.stats.punched_subpages, 513);
}

/// The model replays the worked examples of CONTRACT.md (hand-checked figures)
/// to exactly their statistics: the oracle is checked against the contract's
/// own numbers before it judges the engine.
#[test]
fn model_reproduces_the_worked_examples() {
    use hugepunch_workload::{apply_all, Target, Trace};

    /// The model as a target of the trace's operations.
    struct Sequential(std::cell::RefCell<Model>);

    impl Target for Sequential {
        type Error = hugepunch::Error;
        fn punch(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
            self.0.borrow_mut().punch(offset, len)
        }
        fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Self::Error> {
            self.0.borrow_mut().convert(offset, len, to)
        }
        fn populate(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
            self.0.borrow_mut().populate(offset, len)
        }
        fn flush(&self, offset: u64, len: u64) -> Result<(), Self::Error> {
            self.0.borrow_mut().flush(offset, len)
        }
        fn teardown(&self) -> Result<(), Self::Error> {
            self.0.borrow_mut().teardown();
            Ok(())
        }
    }

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".expected.json") else {
            continue;
        };
        let trace =
            Trace::parse(&std::fs::read_to_string(dir.join(format!("{stem}.trace"))).unwrap())
                .unwrap();
        let expected: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (key, want) in expected {
            let (budget, policy) = common::flags(&key);
            let setup = Setup {
                order: trace.order,
                huge_pages: trace.size >> (12 + trace.order as u32),
                budget,
                policy,
                populated: trace.populated,
                start: trace.start,
            };
            let m = Sequential(std::cell::RefCell::new(Model::new(&setup)));
            apply_all(&m, trace.ops.iter().map(|(_, op)| op));
            let got: std::collections::BTreeMap<_, _> =
                m.0.into_inner().stats.named().into_iter().collect();
            let want = want.as_object().unwrap();
            assert_eq!(
                got.len(),
                want.len(),
                "{stem} [{key}]: the 19 names of CONTRACT.md §6"
            );
            for (stat, value) in want {
                assert_eq!(
                    got.get(stat.as_str()).copied(),
                    value.as_u64(),
                    "{stem} [{key}]: {stat}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} example runs found");
}
