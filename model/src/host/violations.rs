//! What a correct kernel must never see: the [`Violation`]s the host's
//! callbacks and the guest's paths record, and the store that keeps the
//! first of them and a count per kind.

use super::{lock, KernelHost};
use serde::Serialize;
use std::collections::BTreeMap;

/// Something a correct kernel must never see, with the invariant of
/// CONTRACT.md §4 it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// Memory was freed while the guest still mapped it (invariant 4).
    FreedWhileMapped {
        /// First such subpage.
        offset: u64,
    },
    /// Memory was zeroed while the guest still mapped it (invariant 4).
    ZeroedWhileMapped {
        /// First such subpage.
        offset: u64,
    },
    /// The guest accessed, through a mapping, memory freed since the
    /// mapping was made (invariant 4: an invalidation was skipped, or a
    /// fault did not retry).
    AccessAfterFree {
        /// The subpage.
        offset: u64,
    },
    /// A guest or VMM read found other content than the last write after
    /// the last punch (invariant 4).
    LostWrite {
        /// The subpage.
        offset: u64,
        /// What was written.
        expected: u64,
        /// What was read.
        found: u64,
    },
    /// A punched subpage read back nonzero content (invariant 5).
    StaleRead {
        /// The subpage.
        offset: u64,
        /// What was read.
        found: u64,
    },
    /// A private subpage of a punched range was still mapped when the
    /// punch returned (invariant 2).
    PrivateMappingSurvivedPunch {
        /// The subpage.
        offset: u64,
    },
    /// An allocation of memory that is already allocated.
    DoubleAllocation {
        /// First such subpage.
        offset: u64,
    },
    /// A free or zero of memory that is not allocated (a double free).
    FreeOfAbsent {
        /// First such subpage.
        offset: u64,
    },
    /// A huge allocation or free that is not of one whole huge page, or an
    /// order that is neither 0 nor the file's.
    BadOrder {
        /// Start of the range.
        offset: u64,
        /// The order passed.
        order: u8,
    },
    /// An invalidation whose hint is not the huge page it covers.
    BadHint {
        /// Start of the range.
        offset: u64,
    },
    /// An `invalidate_end` without its `invalidate_begin`.
    UnbalancedInvalidation {
        /// Start of the range.
        offset: u64,
    },
    /// After teardown, memory is still allocated (invariant 6).
    Leak {
        /// Bytes still allocated.
        bytes: u64,
    },
}

impl Violation {
    /// A short name of the kind of violation.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::FreedWhileMapped { .. } => "freed_while_mapped",
            Violation::ZeroedWhileMapped { .. } => "zeroed_while_mapped",
            Violation::AccessAfterFree { .. } => "access_after_free",
            Violation::LostWrite { .. } => "lost_write",
            Violation::StaleRead { .. } => "stale_read",
            Violation::PrivateMappingSurvivedPunch { .. } => "private_mapping_survived_punch",
            Violation::DoubleAllocation { .. } => "double_allocation",
            Violation::FreeOfAbsent { .. } => "free_of_absent",
            Violation::BadOrder { .. } => "bad_order",
            Violation::BadHint { .. } => "bad_hint",
            Violation::UnbalancedInvalidation { .. } => "unbalanced_invalidation",
            Violation::Leak { .. } => "leak",
        }
    }

    /// The invariant of CONTRACT.md §4 it breaks (0: a host-protocol error).
    pub fn invariant(&self) -> u8 {
        match self {
            Violation::PrivateMappingSurvivedPunch { .. } => 2,
            Violation::FreedWhileMapped { .. }
            | Violation::ZeroedWhileMapped { .. }
            | Violation::AccessAfterFree { .. }
            | Violation::LostWrite { .. } => 4,
            Violation::StaleRead { .. } => 5,
            Violation::Leak { .. } => 6,
            _ => 0,
        }
    }
}

const KEPT_VIOLATIONS: usize = 256;

#[derive(Default)]
pub(super) struct Violations {
    first: Vec<Violation>,
    by_kind: BTreeMap<&'static str, u64>,
}

impl KernelHost {
    /// Record a violation.
    pub fn record(&self, v: Violation) {
        let mut vs = lock(&self.violations);
        *vs.by_kind.entry(v.kind()).or_default() += 1;
        if vs.first.len() < KEPT_VIOLATIONS {
            vs.first.push(v);
        }
    }

    /// The first violations recorded (at most 256).
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.violations).first.clone()
    }

    /// Violations recorded, by kind.
    pub fn violation_counts(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.violations).by_kind.clone()
    }
}
