//! The model's statistics: the 19 counters of CONTRACT.md §6.

use crate::Stats;
use std::collections::BTreeMap;

/// The 19 statistics of CONTRACT.md §6, under their names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// `punch_calls` (CONTRACT.md §6).
    pub punch_calls: u64,
    /// `convert_calls` (CONTRACT.md §6).
    pub convert_calls: u64,
    /// `populate_calls` (CONTRACT.md §6).
    pub populate_calls: u64,
    /// `punched_subpages` (CONTRACT.md §6).
    pub punched_subpages: u64,
    /// `pending_subpages` (CONTRACT.md §6).
    pub pending_subpages: u64,
    /// `pending_bytes_peak` (CONTRACT.md §6).
    pub pending_bytes_peak: u64,
    /// `huge_frees` (CONTRACT.md §6).
    pub huge_frees: u64,
    /// `teardown_frees` (CONTRACT.md §6).
    pub teardown_frees: u64,
    /// `small_freed_subpages` (CONTRACT.md §6).
    pub small_freed_subpages: u64,
    /// `free_calls` (CONTRACT.md §6).
    pub free_calls: u64,
    /// `invalidations` (CONTRACT.md §6).
    pub invalidations: u64,
    /// `invalidations_immediate` (CONTRACT.md §6).
    pub invalidations_immediate: u64,
    /// `conversions_ok` (CONTRACT.md §6).
    pub conversions_ok: u64,
    /// `conversions_rejected` (CONTRACT.md §6).
    pub conversions_rejected: u64,
    /// `repopulated_subpages` (CONTRACT.md §6).
    pub repopulated_subpages: u64,
    /// `forced_splits` (CONTRACT.md §6).
    pub forced_splits: u64,
    /// `free_errors` (CONTRACT.md §6).
    pub free_errors: u64,
    /// `errors_invalid_range` (CONTRACT.md §6).
    pub errors_invalid_range: u64,
    /// `errors_torn_down` (CONTRACT.md §6).
    pub errors_torn_down: u64,
}

impl ModelStats {
    /// The same counters in the engine's [`Stats`] (a cheap comparison;
    /// [`ModelStats::named`] is the one that checks the names).
    pub fn as_engine_stats(&self) -> Stats {
        let ModelStats {
            punch_calls,
            convert_calls,
            populate_calls,
            punched_subpages,
            pending_subpages,
            pending_bytes_peak,
            huge_frees,
            teardown_frees,
            small_freed_subpages,
            free_calls,
            invalidations,
            invalidations_immediate,
            conversions_ok,
            conversions_rejected,
            repopulated_subpages,
            forced_splits,
            free_errors,
            errors_invalid_range,
            errors_torn_down,
        } = *self;
        Stats {
            punch_calls,
            convert_calls,
            populate_calls,
            punched_subpages,
            pending_subpages,
            pending_bytes_peak,
            huge_frees,
            teardown_frees,
            small_freed_subpages,
            free_calls,
            invalidations,
            invalidations_immediate,
            conversions_ok,
            conversions_rejected,
            repopulated_subpages,
            forced_splits,
            free_errors,
            errors_invalid_range,
            errors_torn_down,
        }
    }

    /// The statistics by their CONTRACT.md §6 names.
    pub fn named(&self) -> BTreeMap<String, u64> {
        [
            ("punch_calls", self.punch_calls),
            ("convert_calls", self.convert_calls),
            ("populate_calls", self.populate_calls),
            ("punched_subpages", self.punched_subpages),
            ("pending_subpages", self.pending_subpages),
            ("pending_bytes_peak", self.pending_bytes_peak),
            ("huge_frees", self.huge_frees),
            ("teardown_frees", self.teardown_frees),
            ("small_freed_subpages", self.small_freed_subpages),
            ("free_calls", self.free_calls),
            ("invalidations", self.invalidations),
            ("invalidations_immediate", self.invalidations_immediate),
            ("conversions_ok", self.conversions_ok),
            ("conversions_rejected", self.conversions_rejected),
            ("repopulated_subpages", self.repopulated_subpages),
            ("forced_splits", self.forced_splits),
            ("free_errors", self.free_errors),
            ("errors_invalid_range", self.errors_invalid_range),
            ("errors_torn_down", self.errors_torn_down),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
