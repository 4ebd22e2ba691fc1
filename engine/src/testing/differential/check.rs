//! The comparison of the state, and of a batch, against the model.

use super::{CaseStep, Mismatch, SUB};
use crate::testing::{Event, MBacking, Model, RecordingHost, Setup};
use crate::HugePunch;
use std::collections::BTreeSet;

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
pub(super) fn compare_batch(
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
