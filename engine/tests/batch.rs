//! `punch_many` against `punch` called for each range in order,
//! with the sequential reference model of `hugepunch::testing` as the
//! oracle: after a random history of punches, populates, conversions and
//! flushes, a random batch of valid ranges runs on the engine as one
//! `punch_many` and on the model range by range. Results, every statistic
//! but the three a batch may change (`invalidations`,
//! `invalidations_immediate`: fewer; `pending_bytes_peak`: observed once,
//! at the batch's end), the backing and state of every subpage, the host's
//! residency and attributes must agree; every subpage the model
//! invalidated at once must be covered by an invalidation of the batch
//! (invariant 2); and a batch with an invalid range must fail whole,
//! naming its index, changing nothing but `errors_invalid_range`
//! (invariant 8).

use hugepunch::testing::{check_state, Event, Model, RecordingHost, Setup};
use hugepunch::{Attribute, ByteRange, Config, Error, HugePunch, Policy, Stats, SUBPAGE_SIZE};
use proptest::prelude::*;
use std::collections::BTreeSet;

const SUB: u64 = SUBPAGE_SIZE;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Punch(u64, u64),
    Populate(u64, u64),
    Convert(u64, u64, Attribute),
    Flush(u64, u64),
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        proptest::sample::select(vec![2u8, 3, 6, 7, 9]),
        1u64..=3,
        proptest::sample::select(vec![Policy::Reject, Policy::CancelAndZero]),
        any::<bool>(),
        proptest::sample::select(vec![Attribute::Private, Attribute::Shared]),
    )
        .prop_map(|(order, huge_pages, policy, populated, start)| Setup {
            order,
            huge_pages,
            budget: None,
            policy,
            populated,
            start,
        })
}

/// A valid range: mostly 4 KiB, some longer, some whole huge pages and
/// some crossing a boundary.
fn range(s: &Setup) -> BoxedStrategy<(u64, u64)> {
    let subs = s.subpages();
    let per = s.per();
    prop_oneof![
        6 => (0..subs).prop_map(|a| (a * SUB, SUB)),
        2 => (0..subs, 1..=per.min(8)).prop_map(move |(a, n)| (a * SUB, n.min(subs - a) * SUB)),
        1 => (0..s.huge_pages).prop_map(move |h| (h * per * SUB, per * SUB)),
        1 => (0..subs, 1..=per * 2).prop_map(move |(a, n)| (a * SUB, n.min(subs - a) * SUB)),
    ]
    .boxed()
}

fn case() -> impl Strategy<Value = (Setup, Vec<Step>, Vec<(u64, u64)>)> {
    setup().prop_flat_map(|s| {
        let r = range(&s);
        let step = prop_oneof![
            6 => r.clone().prop_map(|(o, l)| Step::Punch(o, l)),
            2 => r.clone().prop_map(|(o, l)| Step::Populate(o, l)),
            1 => (r.clone(), proptest::sample::select(vec![Attribute::Private, Attribute::Shared]))
                .prop_map(|((o, l), a)| Step::Convert(o, l, a)),
            1 => r.clone().prop_map(|(o, l)| Step::Flush(o, l)),
        ];
        (
            Just(s),
            proptest::collection::vec(step, 0..24),
            proptest::collection::vec(r, 0..40),
        )
    })
}

fn engine(s: &Setup) -> (HugePunch, std::sync::Arc<RecordingHost>) {
    let host = RecordingHost::new(s.size(), s.start, s.populated);
    let mut cfg = Config::new(s.size()).order(s.order).policy(s.policy);
    cfg.budget = s.budget;
    cfg.populated = s.populated;
    (HugePunch::new(cfg, host.clone()).unwrap(), host)
}

fn history(e: &HugePunch, m: &mut Model, steps: &[Step]) {
    for &st in steps {
        let (got, want) = match st {
            Step::Punch(o, l) => (e.punch(o, l), m.punch(o, l)),
            Step::Populate(o, l) => (e.populate(o, l), m.populate(o, l)),
            Step::Convert(o, l, a) => (e.convert(o, l, a), m.convert(o, l, a)),
            Step::Flush(o, l) => (e.flush(o, l), m.flush(o, l)),
        };
        assert_eq!(got, want, "{st:?}");
    }
}

/// The statistics a batch must leave as the ranges one by one would.
fn comparable(mut s: Stats) -> Stats {
    s.invalidations = 0;
    s.invalidations_immediate = 0;
    s.pending_bytes_peak = 0;
    s
}

fn samples(s: &Setup) -> BTreeSet<u64> {
    (0..s.subpages()).collect()
}

/// Subpages covered by invalidations among `events`.
fn invalidated(events: &[Event]) -> BTreeSet<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::InvalidateBegin(r, _) => {
                Some(r.first_subpage()..r.first_subpage() + r.subpages())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    /// A batch is its ranges one after the other (but for the three
    /// statistics above), and invalidates every possibly-private subpage
    /// the ranges would have invalidated at once (invariant 2).
    #[test]
    fn a_batch_is_its_ranges_in_order((s, steps, batch) in case()) {
        let (e, host) = engine(&s);
        let mut m = Model::new(&s);
        history(&e, &mut m, &steps);
        let before_peak = e.stats().pending_bytes_peak;
        host.take_events();
        m.events.clear();

        let ranges: Vec<ByteRange> = batch.iter().map(|&(o, l)| ByteRange::new(o, l)).collect();
        let got = e.punch_many(&ranges);
        for &(o, l) in &batch {
            m.punch(o, l).unwrap();
        }
        prop_assert_eq!(got, Ok(()));
        let (es, ms) = (e.stats(), m.stats);
        prop_assert_eq!(comparable(es), comparable(ms));
        prop_assert!(es.invalidations <= ms.invalidations, "{es:?} {ms:?}");
        prop_assert!(es.invalidations_immediate <= ms.invalidations_immediate);
        // The peak: observed once, at the batch's end.
        prop_assert!(es.pending_bytes_peak <= ms.pending_bytes_peak);
        prop_assert!(es.pending_bytes_peak >= before_peak.max(es.pending_subpages * SUB));
        check_state(&e, &host, &m, &s, &samples(&s), 0).map_err(|x| TestCaseError::fail(format!("{x:?}")))?;
        // Invariant 2: what the ranges invalidated at once, the batch did.
        let want = invalidated(&m.events);
        let have = invalidated(&host.take_events());
        prop_assert!(want.is_subset(&have), "not invalidated: {:?}", want.difference(&have).collect::<Vec<_>>());
    }

    /// Invariant 8: a batch with an invalid range fails whole, naming the
    /// first invalid range's index, and changes nothing but
    /// `errors_invalid_range`.
    #[test]
    fn an_invalid_range_refuses_the_whole_batch((s, steps, batch) in case(), at in any::<prop::sample::Index>(), bad in 0usize..4) {
        let (e, host) = engine(&s);
        let mut m = Model::new(&s);
        history(&e, &mut m, &steps);
        host.take_events();
        let mut ranges: Vec<ByteRange> = batch.iter().map(|&(o, l)| ByteRange::new(o, l)).collect();
        let index = at.index(ranges.len() + 1);
        let invalid = [(1, SUB), (0, 0), (s.size(), SUB), (u64::MAX - 4095, 8192)][bad];
        ranges.insert(index, ByteRange::new(invalid.0, invalid.1));
        let before = e.stats();
        prop_assert_eq!(
            e.punch_many(&ranges),
            Err(Error::InvalidRangeInBatch { index, offset: invalid.0, len: invalid.1 })
        );
        prop_assert_eq!(e.punch_many(&ranges).unwrap_err().errno(), hugepunch::EINVAL);
        let mut want = before;
        want.errors_invalid_range += 2;
        prop_assert_eq!(e.stats(), want);
        prop_assert!(host.take_events().is_empty());
        check_state(&e, &host, &m, &s, &samples(&s), 0).map_err(|x| TestCaseError::fail(format!("{x:?}")))?;
    }
}

#[test]
fn an_empty_batch_changes_nothing_and_a_torn_down_file_refuses() {
    let s = Setup {
        order: 3,
        huge_pages: 2,
        budget: None,
        policy: Policy::Reject,
        populated: true,
        start: Attribute::Shared,
    };
    let (e, _host) = engine(&s);
    e.punch_many(&[]).unwrap();
    assert_eq!(e.stats(), Stats::default());
    e.teardown();
    let before = e.stats();
    assert_eq!(
        e.punch_many(&[ByteRange::new(0, SUB)]),
        Err(Error::TornDown)
    );
    assert_eq!(e.stats().errors_torn_down, before.errors_torn_down + 1);
}

#[test]
fn a_batch_completes_a_huge_page_once_and_frees_it_whole() {
    let s = Setup {
        order: 9,
        huge_pages: 2,
        budget: None,
        policy: Policy::Reject,
        populated: true,
        start: Attribute::Private,
    };
    let (e, host) = engine(&s);
    // Every subpage of huge page 1, in a scattered order, then one of huge
    // page 0 (a second group), in one batch.
    let mut ranges: Vec<ByteRange> = (0..512u64)
        .map(|i| ByteRange::new((512 + (i * 131) % 512) * SUB, SUB))
        .collect();
    ranges.push(ByteRange::new(7 * SUB, SUB));
    host.take_events();
    e.punch_many(&ranges).unwrap();
    let st = e.stats();
    assert_eq!((st.punch_calls, st.huge_frees, st.free_calls), (513, 1, 1));
    assert_eq!((st.punched_subpages, st.pending_subpages), (513, 1));
    // One immediate invalidation per group (private memory), one for the
    // completion: three, where 513 punches would have made 514.
    assert_eq!((st.invalidations_immediate, st.invalidations), (2, 3));
    let frees: Vec<_> = host
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, Event::Free(..)))
        .collect();
    assert_eq!(
        frees,
        vec![Event::Free(ByteRange::new(2 << 20, 2 << 20), 9)]
    );
}
