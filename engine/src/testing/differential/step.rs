//! Operations and their outcomes: a case's steps, and each run on the
//! engine and on the model.

use super::SUB;
use crate::testing::{Model, RecordingHost};
use crate::{
    Attribute, Backing, ByteRange, Error, HugePunch, Policy, SubpageState, TeardownReport,
};
use std::sync::atomic::Ordering;

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
pub(super) fn run_engine_ranges(e: &HugePunch, ranges: &[ByteRange]) -> Outcome {
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
