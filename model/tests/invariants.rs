//! Model-level property tests: random sequences of punch, convert,
//! populate, flush, guest writes and reads, and teardown, on every
//! strategy, checking invariants 2, 4 and 5 of CONTRACT.md §4 as the model
//! sees them:
//!
//! * invariant 2: when a punch returns, no private subpage of its range is
//!   still mapped;
//! * invariant 4: no write is lost — every read returns the last write
//!   since the last punch, and nothing is freed or zeroed while mapped or
//!   accessed after it was freed;
//! * invariant 5: a punched subpage that is populated again reads zeros.
//!
//! The planted-bug tests at the end show each check can fail.

use hugepunch::testing::{Action, Event, HookedHost};
use hugepunch::{Attribute, ByteRange, Policy};
use hugepunch_model::{Kernel, ModelConfig, Options, StrategyKind, Violation};
use hugepunch_workload::{run_step, Op, Step};
use proptest::prelude::*;

const ORDER: u8 = 3;
const PAGES: u64 = 4;
const FULL: u64 = 1 << ORDER;
const SUBS: u64 = PAGES * FULL;
const K: u64 = 4096;

/// A range of 1 to 16 subpages (fewer at the end of the file), in bytes.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SUBS, 1..=2 * FULL).prop_map(|(s, n)| (s * K, n.min(SUBS - s) * K))
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => range().prop_map(|(offset, len)| Step::Op(Op::Punch { offset, len })),
        6 => (0..SUBS).prop_map(|s| Step::Op(Op::Punch { offset: s * K, len: K })),
        3 => (range(), any::<bool>()).prop_map(|((offset, len), shared)| Step::Op(Op::Convert {
            offset,
            len,
            to: if shared { Attribute::Shared } else { Attribute::Private },
        })),
        2 => range().prop_map(|(offset, len)| Step::Op(Op::Populate { offset, len })),
        1 => range().prop_map(|(offset, len)| Step::Op(Op::Flush { offset, len })),
        6 => (0..SUBS).prop_map(|s| Step::GuestWrite(s * K)),
        6 => (0..SUBS).prop_map(|s| Step::GuestRead(s * K)),
        1 => Just(Step::Op(Op::Teardown)),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    kind: StrategyKind,
    populated: bool,
    shared: bool,
    budget: Option<u64>,
    policy: Policy,
    steps: Vec<Step>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(StrategyKind::ALL.to_vec()),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![0, K, 4 * K, 16 * K])),
        prop::sample::select(vec![Policy::Reject, Policy::CancelAndZero]),
        prop::collection::vec(step(), 1..80),
    )
        .prop_map(|(kind, populated, shared, budget, policy, steps)| Case {
            kind,
            populated,
            shared,
            budget,
            policy,
            steps,
        })
}

fn run(c: &Case) -> Kernel {
    let cfg = ModelConfig {
        size: PAGES * FULL * K,
        order: ORDER,
        populated: c.populated,
        start: if c.shared {
            Attribute::Shared
        } else {
            Attribute::Private
        },
        options: Options {
            budget: c.budget,
            policy: c.policy,
        },
    };
    let k = Kernel::new(cfg, c.kind).unwrap();
    for step in &c.steps {
        // Teardown verifies first: what the run did is checked before
        // teardown frees it.
        if *step == Step::Op(Op::Teardown) {
            k.verify();
        }
        let _ = run_step(&k, step);
        // A huge mapping never covers a punched subpage.
        for h in 0..PAGES {
            if k.host().mapped_huge(h) {
                assert_eq!(
                    k.strategy().pending_in(h),
                    0,
                    "huge mapping over a punched subpage of huge page {h}"
                );
            }
        }
    }
    k.verify();
    k
}

fn of_invariant(k: &Kernel, inv: u8) -> Vec<Violation> {
    k.violations()
        .into_iter()
        .filter(|v| v.invariant() == inv)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Invariant 2: no private mapping survives a punch, whatever the
    /// strategy.
    #[test]
    fn invariant_2_no_private_mapping_survives_a_punch(c in case()) {
        let k = run(&c);
        prop_assert!(of_invariant(&k, 2).is_empty(), "{:?}", k.violations());
    }

    /// Invariant 4: no write is lost, and no memory is freed or zeroed
    /// while mapped or accessed once freed; no host-protocol error either.
    #[test]
    fn invariant_4_no_write_is_lost(c in case()) {
        let k = run(&c);
        prop_assert!(of_invariant(&k, 4).is_empty(), "{:?}", k.violations());
        prop_assert!(of_invariant(&k, 0).is_empty(), "host protocol: {:?}", k.violations());
    }

    /// Invariant 5: a punched subpage populated again reads as zeros (for
    /// every strategy that promises it; the balloon's tracker does not).
    #[test]
    fn invariant_5_repopulated_subpage_reads_zeros(c in case()) {
        let k = run(&c);
        if c.kind.zeroes_punched() {
            prop_assert!(of_invariant(&k, 5).is_empty(), "{:?}", k.violations());
        }
    }

    /// After teardown nothing is left allocated (invariant 6, as the model
    /// sees it), and the host saw exactly the frees and invalidations the
    /// strategy counted.
    #[test]
    fn teardown_leaves_nothing_and_counters_match_the_host(c in case()) {
        let k = run(&c);
        k.teardown();
        prop_assert!(of_invariant(&k, 6).is_empty(), "{:?}", k.violations());
        let (stats, host) = (k.stats(), k.host().counters());
        prop_assert_eq!(stats.free_calls, host.free_calls);
        prop_assert_eq!(stats.invalidations, host.invalidations);
        prop_assert_eq!(k.figures().memory.resident_bytes, 0);
    }
}

// ---- the checks can fail -------------------------------------------------

fn private_kernel(kind: StrategyKind) -> Kernel {
    let cfg = ModelConfig {
        size: PAGES * FULL * K,
        order: ORDER,
        ..ModelConfig::new(0)
    };
    Kernel::new(cfg, kind).unwrap()
}

/// The balloon's tracker un-tracks a re-populated subpage without zeroing
/// it: the model catches the stale read (invariant 5's check can fail).
#[test]
fn single_partial_returns_stale_data() {
    let k = private_kernel(StrategyKind::SinglePartial);
    let token = k.guest_write(K).unwrap();
    k.punch(K, K).unwrap();
    assert_eq!(
        k.guest_read(K).unwrap(),
        token,
        "the old content comes back"
    );
    assert!(matches!(
        of_invariant(&k, 5)[..],
        [Violation::StaleRead { .. }]
    ));
    // The engine, on the same sequence, reads zeros.
    let k = private_kernel(StrategyKind::HugePunch);
    k.guest_write(K).unwrap();
    k.punch(K, K).unwrap();
    assert_eq!(k.guest_read(K).unwrap(), 0);
    assert!(k.violations().is_empty());
}

/// The engine on the model's host with a planted bug: the host drops the
/// partial punches' invalidations, the whole huge pages' invalidations, or
/// the zeroes, as an engine that forgot them would.
fn planted(partial: bool, whole: bool, zero: bool) -> Kernel {
    let cfg = ModelConfig {
        size: PAGES * FULL * K,
        order: ORDER,
        ..ModelConfig::new(0)
    };
    let skips = move |r: ByteRange| {
        let is_whole = r.len == FULL * K;
        is_whole && whole || !is_whole && partial
    };
    Kernel::with_host_wrapper(cfg, |inner| {
        let host = HookedHost::new(inner);
        host.set(move |e| match *e {
            Event::InvalidateBegin(r, _) | Event::InvalidateEnd(r) if skips(r) => Action::Skip,
            Event::Zero(_) if zero => Action::Skip,
            _ => Action::Forward,
        });
        host
    })
    .unwrap()
}

/// Invariant 2's check fails when the immediate invalidation is skipped.
#[test]
fn planted_missing_immediate_invalidation_is_caught() {
    let k = planted(true, false, false);
    k.guest_write(K).unwrap();
    k.punch(K, K).unwrap();
    assert!(matches!(
        of_invariant(&k, 2)[..],
        [Violation::PrivateMappingSurvivedPunch { offset: K }]
    ));
}

/// Invariant 4's check fails when the completion's invalidation is skipped:
/// the huge page is freed while the guest maps it.
#[test]
fn planted_missing_completion_invalidation_is_caught() {
    let k = planted(false, true, false);
    k.guest_write(0).unwrap();
    k.punch(0, FULL * K).unwrap();
    assert!(of_invariant(&k, 4)
        .iter()
        .any(|v| matches!(v, Violation::FreedWhileMapped { offset: 0 })));
    // ...and the guest then writes through its stale mapping.
    k.guest_write(0).unwrap();
    assert!(of_invariant(&k, 4)
        .iter()
        .any(|v| matches!(v, Violation::AccessAfterFree { offset: 0 })));
}

/// Invariant 5's check fails when un-punched subpages are not zeroed.
#[test]
fn planted_missing_zero_is_caught() {
    let k = planted(false, false, true);
    k.guest_write(2 * K).unwrap();
    k.punch(2 * K, K).unwrap();
    assert_ne!(
        k.guest_read(2 * K).unwrap(),
        0,
        "the old content comes back"
    );
    assert!(matches!(
        of_invariant(&k, 5)[..],
        [Violation::StaleRead { offset: 0x2000, .. }]
    ));
}

/// A write after a punch, then the rest of the huge page punched: the
/// written subpage was un-punched by the fault, so the huge page is not
/// completed and the write survives (invariant 4), on every strategy.
#[test]
fn write_after_punch_survives_the_rest_of_the_huge_page_being_punched() {
    for kind in StrategyKind::ALL {
        let k = private_kernel(kind);
        k.punch(0, FULL * K - K).unwrap();
        let token = k.guest_write(3 * K).unwrap();
        k.punch(FULL * K - K, K).unwrap();
        assert_eq!(k.guest_read(3 * K).unwrap(), token, "{kind}");
        assert_eq!(k.verify().lost_writes, 0, "{kind}");
        assert!(k.violations().is_empty(), "{kind}: {:?}", k.violations());
    }
}
