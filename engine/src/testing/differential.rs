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

use super::{Event, MBacking, Model, RecordingHost, Setup};
use crate::{
    Attribute, Backing, ByteRange, Config, Error, HugePunch, Policy, SubpageState, TeardownReport,
    SUBPAGE_SIZE,
};
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

// ---------------------------------------------------------------------------
// Operations and their outcomes
// ---------------------------------------------------------------------------

/// One step of a case: an operation or query of the engine's API (byte
/// offsets and lengths, valid or not), or a change of the host's or the
/// file's knobs between operations.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CaseStep {
    /// `punch(offset, len)`.
    Punch(u64, u64),
    /// `convert(offset, len, to)`.
    Convert(u64, u64, Attribute),
    /// `populate(offset, len)`.
    Populate(u64, u64),
    /// `flush(offset, len)`.
    Flush(u64, u64),
    /// `teardown()`.
    Teardown,
    /// The host fails its next `n` frees.
    FailFrees(u64),
    /// `set_policy(policy)`.
    SetPolicy(Policy),
    /// `subpage_state(offset)`.
    SubpageState(u64),
    /// `is_punched(offset)`.
    IsPunched(u64),
    /// `pending_ranges(offset, len)`.
    PendingRanges(u64, u64),
    /// `backing(huge_page)`.
    Backing(u64),
    /// `max_mapping_order(huge_page)`.
    MaxMappingOrder(u64),
    /// `punch_many` of `count` 4 KiB ranges: range `i` punches subpage
    /// `(first + i * step) % subpages`, except range `invalid_at` (if below
    /// `count`), which is one byte off (invalid). See [`CaseStep::batch`].
    PunchMany {
        /// First subpage.
        first: u64,
        /// Ranges in the batch (0 to 255).
        count: u8,
        /// Subpages between consecutive ranges.
        step: u64,
        /// The index of the invalid range (none when `>= count`).
        invalid_at: u8,
    },
}

impl std::fmt::Debug for CaseStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            CaseStep::Punch(o, l) => write!(f, "punch({o:#x}, {l:#x})"),
            CaseStep::Convert(o, l, a) => write!(f, "convert({o:#x}, {l:#x}, {a:?})"),
            CaseStep::Populate(o, l) => write!(f, "populate({o:#x}, {l:#x})"),
            CaseStep::Flush(o, l) => write!(f, "flush({o:#x}, {l:#x})"),
            CaseStep::Teardown => write!(f, "teardown()"),
            CaseStep::FailFrees(n) => write!(f, "fail_next_frees({n})"),
            CaseStep::SetPolicy(p) => write!(f, "set_policy({p:?})"),
            CaseStep::SubpageState(o) => write!(f, "subpage_state({o:#x})"),
            CaseStep::IsPunched(o) => write!(f, "is_punched({o:#x})"),
            CaseStep::PendingRanges(o, l) => write!(f, "pending_ranges({o:#x}, {l:#x})"),
            CaseStep::Backing(h) => write!(f, "backing({h})"),
            CaseStep::MaxMappingOrder(h) => write!(f, "max_mapping_order({h})"),
            CaseStep::PunchMany {
                first,
                count,
                step,
                invalid_at,
            } => write!(
                f,
                "punch_many(first {first}, count {count}, step {step}, invalid at {invalid_at})"
            ),
        }
    }
}

impl CaseStep {
    /// The ranges of a `PunchMany` step over a file of `subpages`
    /// subpages (empty for any other step).
    pub fn batch(&self, subpages: u64) -> Vec<ByteRange> {
        let CaseStep::PunchMany {
            first,
            count,
            step,
            invalid_at,
        } = *self
        else {
            return Vec::new();
        };
        (0..u64::from(count))
            .map(|i| {
                let sub = first.wrapping_add(i.wrapping_mul(step)) % subpages.max(1);
                if i == u64::from(invalid_at) {
                    ByteRange::new(sub * SUB + 1, SUB)
                } else {
                    ByteRange::new(sub * SUB, SUB)
                }
            })
            .collect()
    }

    /// The byte range the operation names, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            CaseStep::Punch(o, l)
            | CaseStep::Convert(o, l, _)
            | CaseStep::Populate(o, l)
            | CaseStep::Flush(o, l)
            | CaseStep::PendingRanges(o, l) => Some((o, l)),
            CaseStep::SubpageState(o) | CaseStep::IsPunched(o) => Some((o, SUB)),
            _ => None,
        }
    }
}

/// What a step returned, compared between the engine and the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `punch`, `convert`, `populate`, `flush`.
    Unit(Result<(), Error>),
    /// `teardown`.
    Report(TeardownReport),
    /// A knob: nothing returned.
    None,
    /// `subpage_state`.
    State(Result<SubpageState, Error>),
    /// `is_punched`.
    Bool(Result<bool, Error>),
    /// `pending_ranges`.
    Ranges(Result<Vec<ByteRange>, Error>),
    /// `backing`.
    Backing(Result<Backing, Error>),
    /// `max_mapping_order`.
    Order(Result<u8, Error>),
}

/// For per-huge-page queries the harness compares the error, not its range.
fn vague<T>(r: Result<T, Error>) -> Result<T, Error> {
    r.map_err(|e| match e {
        Error::InvalidRange { .. } => Error::InvalidRange { offset: 0, len: 0 },
        e => e,
    })
}

/// Run one step on the engine and its recording host.
pub fn run_engine(e: &HugePunch, host: &RecordingHost, op: CaseStep) -> Outcome {
    match op {
        CaseStep::Punch(o, l) => Outcome::Unit(e.punch(o, l)),
        CaseStep::Convert(o, l, a) => Outcome::Unit(e.convert(o, l, a)),
        CaseStep::Populate(o, l) => Outcome::Unit(e.populate(o, l)),
        CaseStep::Flush(o, l) => Outcome::Unit(e.flush(o, l)),
        CaseStep::Teardown => Outcome::Report(e.teardown()),
        CaseStep::FailFrees(n) => {
            host.fail_next_frees.store(n, Ordering::SeqCst);
            Outcome::None
        }
        CaseStep::SetPolicy(p) => {
            e.set_policy(p);
            Outcome::None
        }
        CaseStep::SubpageState(o) => Outcome::State(e.subpage_state(o)),
        CaseStep::IsPunched(o) => Outcome::Bool(e.is_punched(o)),
        CaseStep::PendingRanges(o, l) => Outcome::Ranges(e.pending_ranges(o, l)),
        CaseStep::Backing(h) => Outcome::Backing(vague(e.backing(h))),
        CaseStep::MaxMappingOrder(h) => Outcome::Order(vague(e.max_mapping_order(h))),
        CaseStep::PunchMany { .. } => {
            Outcome::Unit(e.punch_many(&op.batch(e.geometry().subpages())))
        }
    }
}

/// A `PunchMany` step on the engine range by range (where a budget or a
/// failing free makes a batch differ from its ranges in order by design):
/// the same validation first (a batch that fails, fails as `punch_many`
/// does, changing nothing), then `punch` for each range.
fn run_engine_ranges(e: &HugePunch, ranges: &[ByteRange]) -> Outcome {
    let geo = e.geometry();
    if ranges.is_empty()
        || ranges
            .iter()
            .any(|r| geo.validate(r.offset, r.len).is_none())
    {
        // Torn down, empty or invalid: `punch_many` changes nothing.
        return Outcome::Unit(e.punch_many(ranges));
    }
    for r in ranges {
        if let Err(err) = e.punch(r.offset, r.len) {
            // Torn down (checked before the ranges by `punch_many`).
            return Outcome::Unit(Err(err));
        }
    }
    Outcome::Unit(Ok(()))
}

/// A `PunchMany` step on the model: `punch_many`'s validation (torn down,
/// then the first invalid range, each counted once), then the ranges one
/// by one.
fn model_punch_many(m: &mut Model, ranges: &[ByteRange]) -> Result<(), Error> {
    if m.torn {
        m.stats.errors_torn_down += 1;
        return Err(Error::TornDown);
    }
    let valid = |r: &ByteRange| {
        r.offset % SUB == 0
            && r.len % SUB == 0
            && r.len > 0
            && r.offset.checked_add(r.len).is_some_and(|e| e <= m.size)
    };
    if let Some((index, r)) = ranges.iter().enumerate().find(|(_, r)| !valid(r)) {
        m.stats.errors_invalid_range += 1;
        return Err(Error::InvalidRangeInBatch {
            index,
            offset: r.offset,
            len: r.len,
        });
    }
    for r in ranges {
        m.punch(r.offset, r.len)?;
    }
    Ok(())
}

/// Run one step on the model.
pub fn run_model(m: &mut Model, op: CaseStep) -> Outcome {
    match op {
        CaseStep::Punch(o, l) => Outcome::Unit(m.punch(o, l)),
        CaseStep::Convert(o, l, a) => Outcome::Unit(m.convert(o, l, a)),
        CaseStep::Populate(o, l) => Outcome::Unit(m.populate(o, l)),
        CaseStep::Flush(o, l) => Outcome::Unit(m.flush(o, l)),
        CaseStep::Teardown => Outcome::Report(m.teardown()),
        CaseStep::FailFrees(n) => {
            m.fail_next_frees = n;
            Outcome::None
        }
        CaseStep::SetPolicy(p) => {
            m.policy = p;
            Outcome::None
        }
        CaseStep::SubpageState(o) => Outcome::State(m.subpage_state(o)),
        CaseStep::IsPunched(o) => Outcome::Bool(m.is_punched(o)),
        CaseStep::PendingRanges(o, l) => Outcome::Ranges(m.pending_ranges(o, l)),
        CaseStep::Backing(h) => Outcome::Backing(m.backing(h)),
        CaseStep::MaxMappingOrder(h) => Outcome::Order(m.max_mapping_order(h)),
        CaseStep::PunchMany { .. } => {
            let ranges = op.batch(m.size / SUB);
            Outcome::Unit(model_punch_many(m, &ranges))
        }
    }
}

/// Normalise the engine's events for comparison: `IsShared` dropped, every
/// `InvalidateBegin` checked to be closed by an `InvalidateEnd` of the same
/// range (with only frees in between) and the ends dropped, adjacent zeroed
/// ranges merged. Also checks invariant 4's sequential part: every free is
/// covered by an invalidation issued earlier in the same operation.
pub fn normalise(events: Vec<Event>) -> Result<Vec<Event>, Mismatch> {
    let mut out: Vec<Event> = Vec::new();
    let mut open: Option<ByteRange> = None;
    let mut invalidated: Vec<ByteRange> = Vec::new();
    for e in events {
        match e {
            Event::IsShared(_) => {}
            Event::InvalidateBegin(r, _) => {
                ensure!(
                    open.is_none(),
                    "nested invalidation {:?} inside {:?}",
                    r,
                    open
                );
                open = Some(r);
                invalidated.push(r);
                out.push(e);
            }
            Event::InvalidateEnd(r) => {
                ensure_eq!(open, Some(r), "invalidate_end without its begin");
                open = None;
            }
            Event::Free(r, _) | Event::FreeFailed(r, _) => {
                ensure!(
                    invalidated
                        .iter()
                        .any(|i| i.offset <= r.offset && r.end() <= i.end()),
                    "invariant 4: free of {:?} without an invalidation of it first",
                    r
                );
                out.push(e);
            }
            Event::Zero(r) => {
                ensure!(open.is_none(), "zero inside an invalidation");
                match out.last_mut() {
                    Some(Event::Zero(last)) if last.end() == r.offset => last.len += r.len,
                    _ => out.push(e),
                }
            }
            _ => {
                ensure!(open.is_none(), "{:?} inside an invalidation", e);
                out.push(e);
            }
        }
    }
    ensure!(open.is_none(), "invalidation {:?} never ended", open);
    Ok(out)
}

/// Merge adjacent zeroed ranges of the model's events, as [`normalise`]
/// does for the engine's.
pub fn merge_zeros(events: Vec<Event>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (Some(Event::Zero(last)), Event::Zero(r)) if last.end() == r.offset => {
                last.len += r.len
            }
            _ => out.push(e),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The comparison
// ---------------------------------------------------------------------------

/// Compare the state the engine and its host show against the model's: the
/// backing and `max_mapping_order` of every huge page, then every subpage's
/// state, residency and attribute (for [`Setup::sparse`] files, only the
/// subpages in `samples`, and the total residency).
pub fn check_state(
    e: &HugePunch,
    host: &RecordingHost,
    m: &Model,
    setup: &Setup,
    samples: &BTreeSet<u64>,
    step: usize,
) -> Result<(), Mismatch> {
    for h in 0..setup.huge_pages {
        ensure_eq!(
            e.backing(h),
            Ok(m.backing_of(h)),
            "step {}: backing of huge page {}",
            step,
            h
        );
        ensure_eq!(
            e.max_mapping_order(h),
            Ok(m.max_order_of(h)),
            "step {}: max_mapping_order of {}",
            step,
            h
        );
    }
    if setup.sparse() {
        for &sub in samples {
            ensure_eq!(
                e.subpage_state(sub * SUB),
                Ok(m.state_of(sub)),
                "step {}: subpage {:#x}",
                step,
                sub * SUB
            );
            ensure_eq!(
                host.is_resident(sub * SUB),
                m.resident(sub),
                "step {}: residency of {:#x}",
                step,
                sub * SUB
            );
            ensure_eq!(
                host.attrs.lock().unwrap()[sub as usize],
                m.attrs[sub as usize],
                "step {}: attr {:#x}",
                step,
                sub * SUB
            );
        }
        let resident: u64 = (0..setup.huge_pages as usize)
            .map(|h| match m.pages[h].backing {
                MBacking::Absent => 0,
                MBacking::Huge => m.per,
                MBacking::Split => m.pages[h].ones,
            })
            .sum();
        ensure_eq!(
            host.resident_subpages(),
            resident,
            "step {}: invariant 6: resident subpages",
            step
        );
    } else {
        for sub in 0..setup.subpages() {
            ensure_eq!(
                e.subpage_state(sub * SUB),
                Ok(m.state_of(sub)),
                "step {}: subpage {:#x}",
                step,
                sub * SUB
            );
        }
        let resident: Vec<bool> = (0..setup.subpages()).map(|s| m.resident(s)).collect();
        ensure_eq!(
            &*host.resident.lock().unwrap(),
            &resident,
            "step {}: invariant 6: residency",
            step
        );
        ensure_eq!(
            &*host.attrs.lock().unwrap(),
            &m.attrs,
            "step {}: attributes",
            step
        );
    }
    Ok(())
}

/// The host events and statistics of a `punch_many` step against the
/// model's ranges one by one: every event but the invalidations equal (as
/// a multiset); every subpage the model invalidated, invalidated by the
/// batch (invariant 2); `invalidations`, `invalidations_immediate` and
/// `pending_bytes_peak` no more than the model's, every other statistic
/// equal. The model then takes the engine's values of those three, so the
/// steps after it compare exactly.
fn compare_batch(
    engine: &HugePunch,
    model: &mut Model,
    got: &[Event],
    want: &[Event],
    step: usize,
    op: CaseStep,
) -> Result<(), Mismatch> {
    let others = |events: &[Event]| {
        let mut v: Vec<String> = events
            .iter()
            .filter(|e| !matches!(e, Event::InvalidateBegin(..)))
            .map(|e| format!("{e:?}"))
            .collect();
        v.sort();
        v
    };
    ensure_eq!(
        others(got),
        others(want),
        "step {}: {:?}: host events other than invalidations",
        step,
        op
    );
    let invalidated = |events: &[Event]| -> BTreeSet<u64> {
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
    };
    let (have, need) = (invalidated(got), invalidated(want));
    ensure!(
        need.is_subset(&have),
        "step {}: {:?}: invariant 2: subpages {:?} not invalidated by the batch",
        step,
        op,
        need.difference(&have).collect::<Vec<_>>()
    );
    let e = engine.stats();
    let m = &mut model.stats;
    ensure!(
        e.invalidations <= m.invalidations
            && e.invalidations_immediate <= m.invalidations_immediate
            && e.pending_bytes_peak <= m.pending_bytes_peak,
        "step {}: {:?}: a batch invalidated more, or saw a higher peak, than its ranges: engine {:?}, model {:?}",
        step,
        op,
        e,
        m
    );
    m.invalidations = e.invalidations;
    m.invalidations_immediate = e.invalidations_immediate;
    m.pending_bytes_peak = e.pending_bytes_peak;
    Ok(())
}

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
