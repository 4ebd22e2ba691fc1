//! The header's constants and types.

use super::*;

/// The version of this ABI: it changes whenever a type or a function of
/// the header changes incompatibly.
pub const HUGEPUNCH_ABI_VERSION: u32 = 1;

/// The size of a subpage: every offset and length is a multiple of it.
pub const HUGEPUNCH_SUBPAGE_SIZE: u64 = 4096;

/// `hugepunch_config.budget`: no limit on pending bytes (the default). A
/// budget of 0 is a real budget of zero.
pub const HUGEPUNCH_NO_BUDGET: u64 = u64::MAX;

/// Policy: refuse a conversion to private over a pending punch with
/// `-EAGAIN` and the offset of the first pending subpage (the default).
pub const HUGEPUNCH_POLICY_REJECT: u32 = 0;
/// Policy: un-punch (zero) the pending subpages, then convert.
pub const HUGEPUNCH_POLICY_CANCEL_AND_ZERO: u32 = 1;

/// Memory attribute: private (encrypted) guest memory.
pub const HUGEPUNCH_PRIVATE: u32 = 0;
/// Memory attribute: shared with the host.
pub const HUGEPUNCH_SHARED: u32 = 1;

/// Subpage state: no memory backs it.
pub const HUGEPUNCH_SUBPAGE_ABSENT: u32 = 0;
/// Subpage state: allocated and readable.
pub const HUGEPUNCH_SUBPAGE_PRESENT: u32 = 1;
/// Subpage state: punched, not yet freed: reads as zeros; populate before
/// writing it.
pub const HUGEPUNCH_SUBPAGE_PUNCHED: u32 = 2;

/// Backing of a huge page: nothing allocated.
pub const HUGEPUNCH_BACKING_ABSENT: u32 = 0;
/// Backing of a huge page: one huge folio (some subpages may be pending).
pub const HUGEPUNCH_BACKING_HUGE: u32 = 1;
/// Backing of a huge page: individual 4 KiB pages, some maybe absent.
pub const HUGEPUNCH_BACKING_SPLIT: u32 = 2;

/// `-HUGEPUNCH_EPANIC` is returned when hugepunch itself panicked (a bug;
/// `ENOTRECOVERABLE` on Linux). The operation may have been cut short; the
/// handle stays valid for every call, and for `hugepunch_destroy`.
pub const HUGEPUNCH_EPANIC: c_int = 131;

pub(crate) const EINVAL: c_int = hugepunch::EINVAL;
pub(crate) const EIO: c_int = hugepunch::EIO;
/// `EBUSY` on Linux: teardown left memory allocated.
pub(crate) const EBUSY: c_int = 16;
/// `ERANGE` on Linux: an output array is too small.
pub(crate) const ERANGE: c_int = 34;

/// A byte range of the file: `offset .. offset + len`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct hugepunch_range {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

/// How to build a file; fill it with `hugepunch_config_init` first.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct hugepunch_config {
    /// Size in bytes: a positive multiple of the huge page size.
    pub size: u64,
    /// Huge page order in 4 KiB units: 9 = 2 MiB (the default), 18 =
    /// 1 GiB; every order from 1 to 18 is accepted.
    pub order: u8,
    /// Every huge page starts populated (`true`, the default) or absent.
    pub populated: bool,
    /// `HUGEPUNCH_POLICY_REJECT` (the default) or
    /// `HUGEPUNCH_POLICY_CANCEL_AND_ZERO`.
    pub policy: u32,
    /// Limit on pending bytes, or `HUGEPUNCH_NO_BUDGET` (the default).
    pub budget: u64,
}

/// The host: what the engine acts on memory through, as C function
/// pointers plus the opaque pointer each of them receives first.
///
/// Offsets and lengths are bytes of the file, multiples of 4096. Every
/// callback may block (take a lock, wait for vCPUs, do I/O) and may run on
/// several threads at once. A callback must not call a mutating function
/// (`punch`, `convert`, `populate`, `flush`, `teardown`) or `is_punched`,
/// `subpage_state`, `pending_ranges` on the same file: the engine may be
/// waiting for it to return. It may call `hugepunch_get_stats`,
/// `hugepunch_max_mapping_order` and `hugepunch_backing`. A callback must
/// not unwind (no C++ exception, no `longjmp` out of it).
///
/// Failure: `allocate` and `free` return 0 or a negative errno. The other
/// callbacks that return `int` return 0, or a negative errno when they
/// could not do their job; the engine then counts that call as failed,
/// exactly as the Rust `Host` trait counts a panicking callback, finishes
/// the operation, and the entry point returns that errno:
///
/// | callback | a failure counts as |
/// |---|---|
/// | `is_shared` | (returns a bool: `false` is always safe) |
/// | `set_attributes` | the attribute did not change; the conversion stands as the engine decided it |
/// | `invalidate_begin` | the invalidation did not happen: nothing is freed under it |
/// | `invalidate_end` | the invalidation happened |
/// | `allocate` | a failed allocation (the populate fails with its errno) |
/// | `free` | a failed free (`free_errors`; the memory stays allocated, retried by `flush`, the shrinker or teardown) |
/// | `zero` | the memory was not zeroed: the subpages stay punched |
///
/// Null callbacks: `is_shared` (answers "possibly private": every partial
/// punch invalidates at once), `set_attributes`, `invalidate_begin` and
/// `invalidate_end` (nothing to do: a guest_memfd invalidates KVM's
/// mappings itself when it is punched) may be null; `allocate`, `free` and
/// `zero` may not.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hugepunch_host {
    /// Passed first to every callback; never dereferenced by hugepunch.
    pub opaque: *mut c_void,
    /// Is every subpage of the range in a state where no mapping of it
    /// backed by this file can exist (in the usual model: is all of it
    /// shared)? `false` is always safe: it costs an immediate invalidation.
    pub is_shared: Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64) -> bool>,
    /// Change the attribute of the range (`HUGEPUNCH_PRIVATE` or
    /// `HUGEPUNCH_SHARED`): called by `hugepunch_convert` once the engine
    /// has decided the conversion may go ahead.
    pub set_attributes:
        Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64, to: u32) -> c_int>,
    /// Zap every mapping of the range (a KVM MMU invalidation); the huge
    /// page `huge_page` (index in the file) of order `order` backs it.
    pub invalidate_begin: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            offset: u64,
            len: u64,
            huge_page: u64,
            order: u8,
        ) -> c_int,
    >,
    /// End of the invalidation of the range.
    pub invalidate_end:
        Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64) -> c_int>,
    /// Allocate backing for the range: a whole huge page (`order` = the
    /// file's) or 4 KiB subpages (`order` = 0). 0 or a negative errno.
    pub allocate: Option<
        unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64, order: u8) -> c_int,
    >,
    /// Return the range to the system (`fallocate(PUNCH_HOLE |
    /// KEEP_SIZE)`): a whole huge page (`order` = the file's) or 4 KiB
    /// subpages (`order` = 0). 0 or a negative errno.
    pub free: Option<
        unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64, order: u8) -> c_int,
    >,
    /// Zero the range (subpages being un-punched) before anyone can read
    /// it.
    pub zero: Option<unsafe extern "C" fn(opaque: *mut c_void, offset: u64, len: u64) -> c_int>,
}

/// The statistics: the names of hugepunch's contract (docs/CONTRACT.md
/// §6). Exact whenever no operation is in flight.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct hugepunch_stats {
    /// Punch calls that passed validation (a batch counts each range).
    pub punch_calls: u64,
    /// Convert calls that passed validation.
    pub convert_calls: u64,
    /// Populate calls that passed validation.
    pub populate_calls: u64,
    /// Punched bits newly set by partial punches.
    pub punched_subpages: u64,
    /// Punched subpages not yet freed, now.
    pub pending_subpages: u64,
    /// The largest pending bytes seen at the end of an operation.
    pub pending_bytes_peak: u64,
    /// Completions: huge pages freed whole (teardown excluded).
    pub huge_frees: u64,
    /// Huge pages freed whole by teardown.
    pub teardown_frees: u64,
    /// Subpages freed one by one (split huge pages, forced splits).
    pub small_freed_subpages: u64,
    /// Host free calls of any size.
    pub free_calls: u64,
    /// Invalidations (begin/end pairs) of any kind.
    pub invalidations: u64,
    /// Immediate invalidations of partial punches of possibly-private
    /// ranges.
    pub invalidations_immediate: u64,
    /// Conversions that went ahead.
    pub conversions_ok: u64,
    /// Conversions to private refused over a pending punch.
    pub conversions_rejected: u64,
    /// Punched subpages un-punched by populate or `CANCEL_AND_ZERO`.
    pub repopulated_subpages: u64,
    /// Huge pages split by the budget's shrinker or by flush.
    pub forced_splits: u64,
    /// Host frees that failed.
    pub free_errors: u64,
    /// Calls refused as `-EINVAL` for their range.
    pub errors_invalid_range: u64,
    /// Calls refused as `-EIO` after teardown.
    pub errors_torn_down: u64,
}

/// One file: an opaque handle made by `hugepunch_new`, released by
/// `hugepunch_destroy`.
pub struct hugepunch_file {
    pub(crate) inner: HugePunch,
}
