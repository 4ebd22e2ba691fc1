//! The statistics of CONTRACT.md §6, listed once.
//!
//! `statistics!` makes, from one line per statistic (its doc comment,
//! its name, the name of its shard slot): the snapshot [`Stats`] (its
//! serde names are its field names), [`Stats::NAMES`] and
//! [`Stats::named`], the slot of each statistic in a shard (`C`) and their
//! number (`N`), and the snapshot from the summed slots. A new statistic is
//! one line below; the C API's mirror (`capi/`, written by hand for
//! cbindgen, which cannot expand macros) then fails to compile until it
//! carries it too.
//!
//! Every statistic has a slot, and every slot is a counter summed over the
//! shards but two: the slot of `pending_subpages` holds a thread's pending
//! residue and the slot of `pending_bytes_peak` the largest pending
//! subpages its threads saw (see the module `stats`); `Counters::snapshot`
//! fills those two from the sum's `pending` and `peak`.

use serde::{Deserialize, Serialize};

/// The snapshot struct, the slot enum and the names, from one list.
macro_rules! statistics {
    (
        $(#[$meta:meta])*
        pub struct Stats {
            $( $(#[$field_meta:meta])* $name:ident: $slot:ident, )*
        }
    ) => {
        $(#[$meta])*
        pub struct Stats {
            $( $(#[$field_meta])* pub $name: u64, )*
        }

        /// The slot of each statistic in a shard, in the order of [`Stats`].
        #[derive(Debug, Clone, Copy)]
        #[repr(usize)]
        pub(crate) enum C {
            $( $slot, )*
        }

        /// The number of statistics, and of slots in a shard.
        pub(crate) const N: usize = [$( C::$slot ),*].len();

        impl Stats {
            /// The names of CONTRACT.md §6 (the serde names), in order.
            pub const NAMES: [&'static str; N] = [$( stringify!($name) ),*];

            /// Each statistic under its CONTRACT.md §6 name, in order.
            pub fn named(&self) -> [(&'static str, u64); N] {
                [$( (stringify!($name), self.$name) ),*]
            }

            /// The statistics from their slots, as summed over the shards.
            pub(crate) fn from_slots(slots: &[u64; N]) -> Self {
                Stats {
                    $( $name: slots[C::$slot as usize], )*
                }
            }
        }
    };
}

statistics! {
    /// A snapshot of the statistics, with exactly the names of
    /// `docs/CONTRACT.md` §6.
    ///
    /// Exact at quiescent points (no operation in flight); a snapshot taken
    /// while operations run may be momentarily inconsistent.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
    pub struct Stats {
        /// Punches that passed validation.
        punch_calls: PunchCalls,
        /// Conversions that passed validation (`conversions_ok + conversions_rejected`).
        convert_calls: ConvertCalls,
        /// Populates that passed validation.
        populate_calls: PopulateCalls,
        /// Bits newly set by partial punches (a whole-huge-page punch sets none).
        punched_subpages: PunchedSubpages,
        /// Punched subpages not yet freed, now.
        pending_subpages: PendingSubpages,
        /// The largest pending bytes seen at the end of an operation.
        pending_bytes_peak: PendingBytesPeak,
        /// Completions (teardown excluded), and whole frees by `flush` or the
        /// shrinker of huge pages whose completion's free had failed.
        huge_frees: HugeFrees,
        /// Huge pages freed whole by teardown.
        teardown_frees: TeardownFrees,
        /// Subpages freed one by one: punches of `Split` huge pages, forced splits, `Split` huge pages at teardown.
        small_freed_subpages: SmallFreedSubpages,
        /// Host free calls of any size (failed ones included).
        free_calls: FreeCalls,
        /// Invalidation begin/end pairs of any kind.
        invalidations: Invalidations,
        /// Immediate invalidations of partial punches of possibly-private ranges.
        invalidations_immediate: InvalidationsImmediate,
        /// Conversions that went ahead.
        conversions_ok: ConversionsOk,
        /// Conversions to private refused over a pending punch.
        conversions_rejected: ConversionsRejected,
        /// Punched subpages un-punched by populate or by `CancelAndZero`.
        repopulated_subpages: RepopulatedSubpages,
        /// Huge pages split by the shrinker or `flush`.
        forced_splits: ForcedSplits,
        /// Host frees that failed.
        free_errors: FreeErrors,
        /// Calls refused with `InvalidRange`.
        errors_invalid_range: ErrorsInvalidRange,
        /// Calls refused with `TornDown`.
        errors_torn_down: ErrorsTornDown,
    }
}

// `Delta::touched` has one bit per slot.
const _: () = assert!(N <= u32::BITS as usize);

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct values, so a slot or a name out of place shows.
    fn numbered() -> Stats {
        Stats::from_slots(&std::array::from_fn(|i| i as u64 + 1))
    }

    #[test]
    fn the_serde_names_are_the_names_in_order() {
        let s = numbered();
        let json = serde_json::to_value(s).unwrap();
        let obj = json.as_object().unwrap();
        assert_eq!(obj.len(), N);
        for (name, value) in s.named() {
            assert_eq!(obj[name].as_u64(), Some(value), "{name}");
        }
        let named: Vec<_> = s.named().iter().map(|&(n, _)| n).collect();
        assert_eq!(named, Stats::NAMES);
        assert_eq!(serde_json::from_value::<Stats>(json).unwrap(), s);
    }

    /// The JSON of a snapshot, byte for byte (names and order).
    #[test]
    fn the_json_is_unchanged() {
        assert_eq!(
            serde_json::to_string(&Stats::default()).unwrap(),
            concat!(
                r#"{"punch_calls":0,"convert_calls":0,"populate_calls":0,"#,
                r#""punched_subpages":0,"pending_subpages":0,"pending_bytes_peak":0,"#,
                r#""huge_frees":0,"teardown_frees":0,"small_freed_subpages":0,"#,
                r#""free_calls":0,"invalidations":0,"invalidations_immediate":0,"#,
                r#""conversions_ok":0,"conversions_rejected":0,"#,
                r#""repopulated_subpages":0,"forced_splits":0,"free_errors":0,"#,
                r#""errors_invalid_range":0,"errors_torn_down":0}"#
            )
        );
    }

    #[test]
    fn each_statistic_reads_its_own_slot() {
        let s = numbered();
        for (i, (_, value)) in s.named().into_iter().enumerate() {
            assert_eq!(value, i as u64 + 1);
        }
        assert_eq!(s.punch_calls, 1 + C::PunchCalls as u64);
        assert_eq!(s.pending_subpages, 1 + C::PendingSubpages as u64);
        assert_eq!(s.errors_torn_down, 1 + C::ErrorsTornDown as u64);
    }
}
