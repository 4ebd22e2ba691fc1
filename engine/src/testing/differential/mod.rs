//! The differential harness: one case (a [`Setup`] and a sequence of
//! [`CaseStep`]s) runs on the engine with a [`RecordingHost`] and on the
//! sequential [`Model`], and after every step the result, the whole
//! statistics snapshot, the host events (invalidations with their hints,
//! frees with their order, allocations, zeroing, attribute changes), the
//! backing and `max_mapping_order` of every huge page, the state of the
//! subpages, the host's residency and attributes must all agree.
//!
//! The property tests (`engine/tests/reference_model.rs`) and the
//! `differential` fuzz target both call [`run_case`]; a difference is a
//! [`Mismatch`] naming the step and what differs.
//!
//! The order of `invalidate_end` against the frees is not compared (only
//! begin/end pairing); the completion's bracket is checked in the engine's
//! `invariants.rs` tests.

use super::{Model, RecordingHost, Setup};
use crate::{ByteRange, Config, HugePunch, SUBPAGE_SIZE};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

const SUB: u64 = SUBPAGE_SIZE;

/// The first difference between the engine and the model, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Mismatch {}

/// `prop_assert!` without proptest: return a [`Mismatch`] unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(Mismatch(format!(
                "assertion failed: {}: {}",
                stringify!($cond),
                format_args!($($fmt)+)
            )));
        }
    };
}

/// `prop_assert_eq!` without proptest: return a [`Mismatch`] showing both
/// sides unless they are equal.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($fmt:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if !(*left == *right) {
                    return Err(Mismatch(format!(
                        "assertion failed: `(left == right)`\n  left: `{:?}`,\n right: `{:?}`: {}",
                        left,
                        right,
                        format_args!($($fmt)+)
                    )));
                }
            }
        }
    };
}

/// The engine's statistics by the names its serialisation uses.
pub fn engine_stats(e: &HugePunch) -> BTreeMap<String, u64> {
    let v = serde_json::to_value(e.stats()).expect("stats serialise");
    v.as_object()
        .expect("stats are an object")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("a counter")))
        .collect()
}

/// The model's statistics by their CONTRACT.md §6 names ([`crate::Stats::named`]).
fn model_stats(model: &Model) -> BTreeMap<String, u64> {
    model
        .stats
        .named()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

mod check;
mod events;
mod step;

pub use check::check_state;
use check::compare_batch;
pub use events::{merge_zeros, normalise};
use step::run_engine_ranges;
pub use step::{run_engine, run_model, CaseStep, Outcome};

/// Run a whole case on a fresh engine with a [`RecordingHost`] and on a
/// fresh [`Model`], comparing after every step the result, the host events
/// (see [`normalise`]), the whole statistics snapshot, the budget
/// (invariant 7) and, until teardown, [`check_state`]; then a final
/// teardown (with frees succeeding) must leave nothing allocated
/// (invariant 6). The first difference is returned.
pub fn run_case(setup: &Setup, ops: &[CaseStep]) -> Result<(), Mismatch> {
    let size = setup.size();
    let host = RecordingHost::new(size, setup.start, setup.populated);
    let mut cfg = Config::new(size).order(setup.order).policy(setup.policy);
    cfg.budget = setup.budget;
    cfg.populated = setup.populated;
    let engine = HugePunch::new(cfg, host.clone()).expect("valid config");
    let mut model = Model::new(setup);

    // Subpages sampled for order 18: the edges of every range of the case.
    let mut samples = BTreeSet::new();
    if setup.sparse() {
        let total = setup.subpages();
        for h in 0..setup.huge_pages {
            for s in [0, 1, setup.per() / 2, setup.per() - 1] {
                samples.insert(h * setup.per() + s);
            }
        }
        for (o, l) in ops.iter().filter_map(CaseStep::range) {
            if o % SUB == 0 && l % SUB == 0 && o.checked_add(l).is_some_and(|e| e <= size) {
                let (a, b) = (o / SUB, (o + l) / SUB);
                for s in [a.wrapping_sub(1), a, a + 1, b.wrapping_sub(1), b] {
                    if s < total {
                        samples.insert(s);
                    }
                }
            }
        }
    }

    for (step, &op) in ops.iter().enumerate() {
        // A batch is its ranges one by one but for its invalidations, its
        // one budget check and its one peak observation (CONTRACT.md
        // §3.3a): with no budget and no failing free, the engine runs
        // `punch_many` and those are compared apart; otherwise it runs the
        // ranges one by one, as the model does.
        let batch = matches!(op, CaseStep::PunchMany { .. })
            && setup.budget.is_none()
            && model.fail_next_frees == 0;
        let got = if matches!(op, CaseStep::PunchMany { .. }) && !batch {
            run_engine_ranges(&engine, &op.batch(setup.subpages()))
        } else {
            run_engine(&engine, &host, op)
        };
        let want = run_model(&mut model, op);
        ensure_eq!(&got, &want, "step {}: {:?}: result", step, op);

        let got_events = normalise(host.take_events())?;
        let want_events = merge_zeros(std::mem::take(&mut model.events));
        if batch {
            compare_batch(&engine, &mut model, &got_events, &want_events, step, op)?;
        } else {
            ensure_eq!(
                &got_events,
                &want_events,
                "step {}: {:?}: host events",
                step,
                op
            );
        }

        // The statistics by their serialised names (so a renamed counter
        // fails); the struct comparison first only saves the maps' cost
        // when every counter agrees (the final comparison below always
        // compares the names).
        if engine.stats() != model.stats {
            ensure_eq!(
                engine_stats(&engine),
                model_stats(&model),
                "step {}: {:?}: stats",
                step,
                op
            );
        }

        if let Some(b) = setup.budget {
            // Invariant 7, unless a whole free failed (the memory is then
            // still pending, not lost).
            if model.stats.free_errors == 0 {
                ensure!(
                    engine.stats().pending_subpages * SUB <= b,
                    "step {}: invariant 7: pending above budget",
                    step
                );
            }
        }

        if !model.torn {
            check_state(&engine, &host, &model, setup, &samples, step)?;
            // The engine's pending_ranges over 1 GiB costs tens of
            // milliseconds in debug: compared over the whole file before a
            // teardown and at the end; sampled subpages meanwhile.
            let sparse_check = setup.sparse()
                && (step + 1 == ops.len() || matches!(ops.get(step + 1), Some(CaseStep::Teardown)));
            if sparse_check {
                let whole = ByteRange::new(0, size);
                ensure_eq!(
                    engine.pending_ranges(0, size),
                    Ok(model.pending_runs(whole)),
                    "step {}: pending ranges",
                    step
                );
            }
        }
    }

    // Invariant 6: a final teardown (frees succeed) leaves nothing allocated.
    host.fail_next_frees.store(0, Ordering::SeqCst);
    model.fail_next_frees = 0;
    let got = engine.teardown();
    let want = model.teardown();
    ensure_eq!(got, want, "final teardown report");
    ensure_eq!(
        normalise(host.take_events())?,
        merge_zeros(std::mem::take(&mut model.events)),
        "final teardown events"
    );
    ensure_eq!(
        engine_stats(&engine),
        model_stats(&model),
        "final teardown stats"
    );
    ensure_eq!(
        host.resident_subpages(),
        0,
        "invariant 6: memory left allocated after teardown"
    );
    ensure_eq!(engine.stats().pending_subpages, 0, "pending after teardown");
    Ok(())
}
