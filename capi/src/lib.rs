//! A C ABI for [hugepunch]: deferred hole-punch coalescing for
//! guest memory backed by huge pages, for VMMs written in C (QEMU).
//!
//! The header, `include/hugepunch.h`, is generated from this file by
//! cbindgen and checked in; `tests/header.rs` fails when the two differ and
//! prints the command that regenerates it. `docs/CAPI.md` in the
//! repository walks through the ABI; `examples/qemu_discard.c` is a
//! complete host over a memfd or a KVM guest_memfd, built and run by
//! `tests/c_example.rs`.
//!
//! # Conventions
//!
//! * Every function returns `0` on success or a **negative errno**
//!   (`-EINVAL`, `-EAGAIN`, `-EIO`, ...), as the kernel and QEMU do; what
//!   an error carries comes back through an out-parameter (the offset of a
//!   pending punch, the index of a batch's invalid range).
//! * Every pointer is checked: a null handle or a null required
//!   out-parameter is `-EINVAL`, and nothing changes.
//! * No panic crosses the boundary: every entry point runs under
//!   `catch_unwind`. A panic inside hugepunch (a bug) returns
//!   `-HUGEPUNCH_EPANIC`; the handle stays valid to destroy.
//! * Host callbacks are C function pointers plus an opaque pointer
//!   ([`hugepunch_host`]). C cannot unwind, so a callback reports failure
//!   through its return value; the engine then treats the call exactly as
//!   the [`hugepunch::Host`] trait treats a panicking callback (the
//!   operation runs to its end with that call failed) and the entry point
//!   returns the callback's negative errno.
//!
//! # Thread safety
//!
//! Every function but [`hugepunch_destroy`] may be called from any number
//! of threads at once on the same handle. The callbacks run on the thread
//! that made the call, possibly on several threads at once, and must be
//! thread-safe with their opaque pointer.

#![deny(missing_docs)]
#![allow(non_camel_case_types)] // the C names of the header

use hugepunch::{
    Attribute, Backing, ByteRange, Config, Error, Hint, Host, HostError, HugePunch, Policy,
    SubpageState,
};
use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;

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

const EINVAL: c_int = hugepunch::EINVAL;
const EIO: c_int = hugepunch::EIO;
/// `EBUSY` on Linux: teardown left memory allocated.
const EBUSY: c_int = 16;
/// `ERANGE` on Linux: an output array is too small.
const ERANGE: c_int = 34;

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
    inner: HugePunch,
}

/// A C callback reported failure: carried through the engine as a panic
/// payload (the `Host` trait's rule for a failed callback) and turned back
/// into its errno at the entry point. Raised with `resume_unwind`, which
/// runs no panic hook: nothing is printed.
struct CallbackFailed(c_int);

/// `hugepunch_host` as the engine's [`Host`].
struct CHost(hugepunch_host);

// SAFETY: the C caller promises, as the header says on `hugepunch_new`,
// that the callbacks may be called from any thread, concurrently, with
// `opaque`; hugepunch never dereferences `opaque` itself.
unsafe impl Send for CHost {}
// SAFETY: as for `Send`: shared access only calls the callbacks.
unsafe impl Sync for CHost {}

impl CHost {
    fn checked(host: &hugepunch_host) -> Option<CHost> {
        if host.allocate.is_none() || host.free.is_none() || host.zero.is_none() {
            return None;
        }
        Some(CHost(*host))
    }

    /// A callback's result for a `void`-like callback: a failure goes on as
    /// the trait's panic, so that the engine counts the call as failed.
    fn failed_unless_zero(rc: c_int) {
        if rc != 0 {
            resume_unwind(Box::new(CallbackFailed(errno_of(rc))));
        }
    }
}

/// The positive errno of a callback's non-zero return (`EIO` when it is
/// not a negative errno).
fn errno_of(rc: c_int) -> c_int {
    match rc.checked_neg() {
        Some(e) if e > 0 => e,
        _ => EIO,
    }
}

fn host_result(rc: c_int) -> Result<(), HostError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(HostError {
            errno: errno_of(rc),
        })
    }
}

impl Host for CHost {
    fn is_shared(&self, range: ByteRange) -> bool {
        match self.0.is_shared {
            // SAFETY: the caller of `hugepunch_new` / `hugepunch_set_host`
            // promised a valid, thread-safe function taking `opaque`.
            Some(f) => unsafe { f(self.0.opaque, range.offset, range.len) },
            None => false,
        }
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        let to = match to {
            Attribute::Private => HUGEPUNCH_PRIVATE,
            Attribute::Shared => HUGEPUNCH_SHARED,
        };
        if let Some(f) = self.0.set_attributes {
            // SAFETY: as in `is_shared`.
            Self::failed_unless_zero(unsafe { f(self.0.opaque, range.offset, range.len, to) });
        }
    }

    fn invalidate_begin(&self, range: ByteRange, hint: Hint) {
        if let Some(f) = self.0.invalidate_begin {
            // SAFETY: as in `is_shared`.
            Self::failed_unless_zero(unsafe {
                f(
                    self.0.opaque,
                    range.offset,
                    range.len,
                    hint.huge_page,
                    hint.order,
                )
            });
        }
    }

    fn invalidate_end(&self, range: ByteRange) {
        if let Some(f) = self.0.invalidate_end {
            // SAFETY: as in `is_shared`.
            Self::failed_unless_zero(unsafe { f(self.0.opaque, range.offset, range.len) });
        }
    }

    fn allocate(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        let f = self.0.allocate.expect("checked non-null when installed");
        // SAFETY: as in `is_shared`.
        host_result(unsafe { f(self.0.opaque, range.offset, range.len, order) })
    }

    fn free(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        let f = self.0.free.expect("checked non-null when installed");
        // SAFETY: as in `is_shared`.
        host_result(unsafe { f(self.0.opaque, range.offset, range.len, order) })
    }

    fn zero(&self, range: ByteRange) {
        let f = self.0.zero.expect("checked non-null when installed");
        // SAFETY: as in `is_shared`.
        Self::failed_unless_zero(unsafe { f(self.0.opaque, range.offset, range.len) });
    }
}

/// Run one entry point: no panic leaves it. A failed C callback carried
/// through the engine comes back as its negative errno; any other panic
/// (a bug of hugepunch) as `-HUGEPUNCH_EPANIC`.
fn guard(f: impl FnOnce() -> c_int) -> c_int {
    // `AssertUnwindSafe`: the engine keeps its state consistent when a
    // callback fails (the `Host` trait's panic rule), and no state of this
    // crate is left half-updated by an unwind (out-parameters are written
    // only after the engine returned).
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(rc) => rc,
        Err(payload) => match payload.downcast::<CallbackFailed>() {
            Ok(failed) => -failed.0,
            Err(_) => -HUGEPUNCH_EPANIC,
        },
    }
}

/// The file behind a handle, or `None` for null.
///
/// # Safety
///
/// `file` is null or a handle from `hugepunch_new` not yet destroyed.
unsafe fn file_ref<'a>(file: *const hugepunch_file) -> Option<&'a HugePunch> {
    // SAFETY: the caller's promise: null or a live handle, which
    // `hugepunch_destroy` (never concurrent with another call) alone frees.
    unsafe { file.as_ref() }.map(|f| &f.inner)
}

/// Store `value` through `out` if it is not null.
///
/// # Safety
///
/// `out` is null or valid for a write of a `T`.
unsafe fn put<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: the caller's promise; `write` does not read or drop the
        // old value, which may be uninitialised.
        unsafe { out.write(value) };
    }
}

/// A query entry point: the file behind `file`, `query` run on it, its
/// answer stored in `*out`. Returns 0, `-EINVAL` for a null handle or
/// `out`, or the engine's negative errno.
///
/// # Safety
///
/// `file` is null or a live handle; `out` is null or valid for a write of
/// a `T`.
unsafe fn answer<T>(
    file: *const hugepunch_file,
    out: *mut T,
    query: impl FnOnce(&HugePunch) -> Result<T, Error>,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        if out.is_null() {
            return -EINVAL;
        }
        match query(f) {
            // SAFETY: not null (checked above), and writable by the
            // caller's promise.
            Ok(v) => unsafe { put(out, v) },
            Err(e) => return -e.errno(),
        }
        0
    })
}

/// Fill `cfg` with the defaults for a file of `size` bytes: populated,
/// 2 MiB huge pages, the `REJECT` policy, no budget.
///
/// Returns 0, or `-EINVAL` if `cfg` is null. Thread-safe (touches only
/// `cfg`).
///
/// # Safety
///
/// `cfg` is null or points to a writable `hugepunch_config`.
#[no_mangle]
pub unsafe extern "C" fn hugepunch_config_init(cfg: *mut hugepunch_config, size: u64) -> c_int {
    guard(|| {
        if cfg.is_null() {
            return -EINVAL;
        }
        let d = Config::new(size);
        let c = hugepunch_config {
            size,
            order: d.order,
            populated: d.populated,
            policy: HUGEPUNCH_POLICY_REJECT,
            budget: HUGEPUNCH_NO_BUDGET,
        };
        // SAFETY: `cfg` is not null, and the caller promised it points to a
        // writable `hugepunch_config`.
        unsafe { put(cfg, c) };
        0
    })
}

fn policy_of(p: u32) -> Option<Policy> {
    match p {
        HUGEPUNCH_POLICY_REJECT => Some(Policy::Reject),
        HUGEPUNCH_POLICY_CANCEL_AND_ZERO => Some(Policy::CancelAndZero),
        _ => None,
    }
}

/// Build a file over `host` and store its handle in `*out`.
///
/// `cfg` and `host` are read during the call only (the host struct is
/// copied). Returns 0, or `-EINVAL` when a pointer is null, `allocate`,
/// `free` or `zero` is null, the policy is unknown, or the size and order
/// cannot describe a file (`*out` is then left unchanged).
///
/// The host's callbacks may be called from any thread that calls into the
/// file, concurrently, with `host->opaque`, until `hugepunch_destroy`
/// returns: they must be thread-safe. Thread-safe itself.
///
/// # Safety
///
/// `cfg` and `host` are null or readable; `out` is null or writable; the
/// callbacks are valid, thread-safe functions for `host->opaque` until
/// `hugepunch_destroy`.
#[no_mangle]
pub unsafe extern "C" fn hugepunch_new(
    cfg: *const hugepunch_config,
    host: *const hugepunch_host,
    out: *mut *mut hugepunch_file,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return -EINVAL;
        }
        // SAFETY: null or a readable config, the caller's promise.
        let Some(cfg) = (unsafe { cfg.as_ref() }) else {
            return -EINVAL;
        };
        // SAFETY: null or a readable host struct, the caller's promise.
        let Some(host) = (unsafe { host.as_ref() }) else {
            return -EINVAL;
        };
        let Some(host) = CHost::checked(host) else {
            return -EINVAL;
        };
        let Some(policy) = policy_of(cfg.policy) else {
            return -EINVAL;
        };
        let config = Config {
            size: cfg.size,
            order: cfg.order,
            budget: (cfg.budget != HUGEPUNCH_NO_BUDGET).then_some(cfg.budget),
            policy,
            populated: cfg.populated,
        };
        match HugePunch::new(config, Arc::new(host)) {
            Ok(inner) => {
                let handle = Box::into_raw(Box::new(hugepunch_file { inner }));
                // SAFETY: `out` is not null and the caller promised it is
                // writable.
                unsafe { put(out, handle) };
                0
            }
            Err(e) => -e.errno(),
        }
    })
}

/// Release a file. It calls no callback and frees no guest memory: call
/// `hugepunch_teardown` first to free what is allocated. Null is a no-op.
///
/// Not thread-safe: no other call on `file` may be in flight, and none may
/// follow. After it returns the host's opaque pointers are no longer used.
///
/// # Safety
///
/// `file` is null or a live handle, with no other call on it in flight or
/// to come.
#[no_mangle]
pub unsafe extern "C" fn hugepunch_destroy(file: *mut hugepunch_file) {
    guard(|| {
        if !file.is_null() {
            // SAFETY: a handle from `hugepunch_new` (a `Box`), not yet
            // destroyed, with no call in flight: the caller's promise.
            drop(unsafe { Box::from_raw(file) });
        }
        0
    });
}

/// Replace the host. Operations that already started finish with the
/// callbacks they loaded; later ones use the new set. hugepunch keeps the
/// old struct until `hugepunch_destroy`: keep its opaque pointer valid
/// until every call that began before this one has returned.
///
/// Returns 0 or `-EINVAL` (null pointer, or a required callback is null).
/// Thread-safe.
///
/// # Safety
///
/// `file` is null or a live handle; `host` is null or readable, with
/// callbacks as `hugepunch_new` requires.
#[no_mangle]
pub unsafe extern "C" fn hugepunch_set_host(
    file: *const hugepunch_file,
    host: *const hugepunch_host,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        // SAFETY: null or a readable host struct, the caller's promise.
        let Some(host) = (unsafe { host.as_ref() }).and_then(CHost::checked) else {
            return -EINVAL;
        };
        f.set_host(Arc::new(host));
        0
    })
}

/// Replace the conversion policy (`HUGEPUNCH_POLICY_*`), with the rules of
/// `hugepunch_set_host`. Returns 0 or `-EINVAL`. Thread-safe.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_set_policy(file: *const hugepunch_file, policy: u32) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let (Some(f), Some(p)) = (unsafe { file_ref(file) }, policy_of(policy)) else {
            return -EINVAL;
        };
        f.set_policy(p);
        0
    })
}

/// Punch `offset .. offset + len`: free what can be freed now, defer the
/// rest, complete (free whole) every huge page whose last subpage this
/// punches. Possibly-private memory is invalidated before it returns.
///
/// Returns 0, `-EINVAL` (bad range or null handle), `-EIO` (torn down), or
/// a failing callback's negative errno. Thread-safe.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_punch(
    file: *const hugepunch_file,
    offset: u64,
    len: u64,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        result(f.punch(offset, len))
    })
}

/// Batches up to this many ranges convert on the stack.
const BATCH_ON_STACK: usize = 256;

/// Punch a batch of ranges as one operation (virtio-balloon's 256 page
/// frames, a free page report). The batch is validated whole first: an
/// invalid range fails it with `-EINVAL` before anything changed, and its
/// index (from 0) is stored in `*failed_index` when that is not null.
/// `ranges` may be null when `count` is 0.
///
/// Returns 0, `-EINVAL`, `-EIO` (torn down) or a failing callback's
/// negative errno. Thread-safe.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_punch_many(
    file: *const hugepunch_file,
    ranges: *const hugepunch_range,
    count: usize,
    failed_index: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        let input: &[hugepunch_range] = if count == 0 {
            &[]
        } else if ranges.is_null() {
            return -EINVAL;
        } else {
            // SAFETY: not null, and the caller promised `count` readable
            // ranges that nothing writes during the call.
            unsafe { std::slice::from_raw_parts(ranges, count) }
        };
        let convert = |r: &hugepunch_range| ByteRange::new(r.offset, r.len);
        let rc = if count <= BATCH_ON_STACK {
            let mut buf = [ByteRange::new(0, 0); BATCH_ON_STACK];
            for (b, r) in buf.iter_mut().zip(input) {
                *b = convert(r);
            }
            f.punch_many(&buf[..count])
        } else {
            f.punch_many(&input.iter().map(convert).collect::<Vec<_>>())
        };
        if let Err(Error::InvalidRangeInBatch { index, .. }) = rc {
            // SAFETY: null or writable, the caller's promise.
            unsafe { put(failed_index, index) };
        }
        result(rc)
    })
}

/// Convert `offset .. offset + len` to `to` (`HUGEPUNCH_PRIVATE` or
/// `HUGEPUNCH_SHARED`). A conversion to private over a pending punch is
/// refused whole under the `REJECT` policy: `-EAGAIN`, with the offset of
/// the first pending subpage in `*error_offset` (when not null), as KVM
/// reports `error_offset`; populate the range and retry.
///
/// Returns 0, `-EINVAL` (bad range, attribute or handle), `-EAGAIN`,
/// `-EIO` (torn down) or a failing callback's negative errno. Thread-safe.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_convert(
    file: *const hugepunch_file,
    offset: u64,
    len: u64,
    to: u32,
    error_offset: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        let to = match to {
            HUGEPUNCH_PRIVATE => Attribute::Private,
            HUGEPUNCH_SHARED => Attribute::Shared,
            _ => return -EINVAL,
        };
        let rc = f.convert(offset, len, to);
        if let Err(Error::PendingPunch { offset }) = rc {
            // SAFETY: null or writable, the caller's promise.
            unsafe { put(error_offset, offset) };
        }
        result(rc)
    })
}

/// Populate `offset .. offset + len` (a fault, or a fallocate allocation):
/// allocate absent huge pages whole, un-punch and zero punched subpages
/// of the range. When the host cannot allocate, returns its negative errno
/// and stores where the failed allocation starts in `*error_offset` (when
/// not null): what lies before it was populated.
///
/// Returns 0, `-EINVAL`, `-EIO` (torn down), the allocation's errno, or a
/// failing callback's negative errno. Thread-safe.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_populate(
    file: *const hugepunch_file,
    offset: u64,
    len: u64,
    error_offset: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        let rc = f.populate(offset, len);
        if let Err(Error::AllocationFailed { offset, .. }) = rc {
            // SAFETY: null or writable, the caller's promise.
            unsafe { put(error_offset, offset) };
        }
        result(rc)
    })
}

/// Force out what is pending in the huge pages `offset .. offset + len`
/// touches (before a migration, under memory pressure): split them, or
/// free whole those whose every subpage is punched.
///
/// Returns 0, `-EINVAL`, `-EIO` or a failing callback's negative errno.
/// Thread-safe (serialises with other flushes and teardown).
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_flush(
    file: *const hugepunch_file,
    offset: u64,
    len: u64,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        result(f.flush(offset, len))
    })
}

/// Guest shutdown: free everything allocated (whole huge pages where they
/// are whole); afterwards every other operation returns `-EIO`. Stores the
/// bytes still allocated (whose free failed) in `*still_allocated` when it
/// is not null; a second teardown retries them.
///
/// Returns 0 when everything was freed, `-EBUSY` when some free failed,
/// `-EINVAL` for a null handle, or a failing callback's negative errno
/// (`*still_allocated` is then not written). Thread-safe.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_teardown(
    file: *const hugepunch_file,
    still_allocated: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        let report = f.teardown();
        let bytes: u64 = report.still_allocated.iter().map(|r| r.len).sum();
        // SAFETY: null or writable, the caller's promise.
        unsafe { put(still_allocated, bytes) };
        if bytes == 0 {
            0
        } else {
            -EBUSY
        }
    })
}

/// Is the subpage at `offset` punched and pending (`*out`)? A VMM reading
/// guest memory itself must treat it as zeros, and populate before writing
/// it. Returns 0, `-EINVAL` (bad offset or null pointer) or `-EIO`.
/// Thread-safe; moves no counter.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_is_punched(
    file: *const hugepunch_file,
    offset: u64,
    out: *mut bool,
) -> c_int {
    // SAFETY: the caller's promise on `file` and `out` (this function's
    // own contract).
    unsafe { answer(file, out, |f| f.is_punched(offset)) }
}

/// The state of the subpage at `offset` (`HUGEPUNCH_SUBPAGE_*`, in
/// `*out`). Returns 0, `-EINVAL` or `-EIO`. Thread-safe; moves no
/// counter.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_subpage_state(
    file: *const hugepunch_file,
    offset: u64,
    out: *mut u32,
) -> c_int {
    // SAFETY: the caller's promise on `file` and `out` (this function's
    // own contract).
    unsafe {
        answer(file, out, |f| {
            Ok(match f.subpage_state(offset)? {
                SubpageState::Absent => HUGEPUNCH_SUBPAGE_ABSENT,
                SubpageState::Present => HUGEPUNCH_SUBPAGE_PRESENT,
                SubpageState::Punched => HUGEPUNCH_SUBPAGE_PUNCHED,
            })
        })
    }
}

/// The punched (pending) runs inside `offset .. offset + len`, in order:
/// the first `min(cap, n)` are written to `out` and `n` to `*count`.
/// Returns 0, `-ERANGE` when `n > cap` (call again with room for
/// `*count`), `-EINVAL` (bad range, null `count`, or null `out` with
/// `cap > 0`) or `-EIO`. Thread-safe; moves no counter.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_pending_ranges(
    file: *const hugepunch_file,
    offset: u64,
    len: u64,
    out: *mut hugepunch_range,
    cap: usize,
    count: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        if count.is_null() || (out.is_null() && cap > 0) {
            return -EINVAL;
        }
        let runs = match f.pending_ranges(offset, len) {
            Ok(runs) => runs,
            Err(e) => return -e.errno(),
        };
        for (i, r) in runs.iter().take(cap).enumerate() {
            let r = hugepunch_range {
                offset: r.offset,
                len: r.len,
            };
            // SAFETY: `i < cap`, and the caller promised `out` has room for
            // `cap` ranges.
            unsafe { put(out.add(i), r) };
        }
        // SAFETY: not null, and writable by the caller's promise.
        unsafe { put(count, runs.len()) };
        if runs.len() > cap {
            -ERANGE
        } else {
            0
        }
    })
}

/// The largest mapping order the fault path may install for huge page
/// `huge_page` (`*out`): the file's order when it is whole with no punched
/// subpage, 0 otherwise. Returns 0, `-EINVAL` or `-EIO`. Thread-safe;
/// may be called from a callback.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_max_mapping_order(
    file: *const hugepunch_file,
    huge_page: u64,
    out: *mut u8,
) -> c_int {
    // SAFETY: the caller's promise on `file` and `out` (this function's
    // own contract).
    unsafe { answer(file, out, |f| f.max_mapping_order(huge_page)) }
}

/// How huge page `huge_page` is backed now (`HUGEPUNCH_BACKING_*`, in
/// `*out`). Returns 0, `-EINVAL` or `-EIO`. Thread-safe; may be called
/// from a callback.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_backing(
    file: *const hugepunch_file,
    huge_page: u64,
    out: *mut u32,
) -> c_int {
    // SAFETY: the caller's promise on `file` and `out` (this function's
    // own contract).
    unsafe {
        answer(file, out, |f| {
            Ok(match f.backing(huge_page)? {
                Backing::Absent => HUGEPUNCH_BACKING_ABSENT,
                Backing::Huge => HUGEPUNCH_BACKING_HUGE,
                Backing::Split => HUGEPUNCH_BACKING_SPLIT,
            })
        })
    }
}

/// A snapshot of the statistics, in `*out`. Returns 0 or `-EINVAL`.
/// Thread-safe; may be called from a callback; moves no counter.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_get_stats(
    file: *const hugepunch_file,
    out: *mut hugepunch_stats,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        if out.is_null() {
            return -EINVAL;
        }
        // Destructured whole, so a counter added to `Stats` and missing here
        // (or from the C struct) is a compile error.
        let hugepunch::Stats {
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
        } = f.stats();
        let c = hugepunch_stats {
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
        };
        // SAFETY: not null, and writable by the caller's promise.
        unsafe { put(out, c) };
        0
    })
}

/// The file's size in bytes, its huge page order and huge page size
/// (each out-pointer may be null). Returns 0 or `-EINVAL` (null handle).
/// Thread-safe.
///
/// # Safety
///
/// Every pointer is null or valid for the access its parameter names (a
/// live handle from `hugepunch_new`; out-parameters writable; input arrays
/// readable for their count).
#[no_mangle]
pub unsafe extern "C" fn hugepunch_geometry(
    file: *const hugepunch_file,
    size: *mut u64,
    order: *mut u8,
    huge_page_size: *mut u64,
) -> c_int {
    guard(|| {
        // SAFETY: null or a live handle, the caller's promise.
        let Some(f) = (unsafe { file_ref(file) }) else {
            return -EINVAL;
        };
        // SAFETY: each is null or writable, the caller's promise.
        unsafe {
            put(size, f.size());
            put(order, f.order());
            put(huge_page_size, f.huge_page_size());
        }
        0
    })
}

fn result(r: Result<(), Error>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => -e.errno(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_panic_leaves_an_entry_point() {
        // A panic of hugepunch itself (a bug): -HUGEPUNCH_EPANIC.
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let rc = guard(|| panic!("a bug"));
        std::panic::set_hook(quiet);
        assert_eq!(rc, -HUGEPUNCH_EPANIC);
        // A failed C callback carried through the engine: its errno.
        assert_eq!(
            guard(|| resume_unwind(Box::new(CallbackFailed(errno_of(-12))))),
            -12
        );
        assert_eq!(guard(|| 0), 0);
    }

    #[test]
    fn callback_results_become_errnos() {
        assert_eq!(errno_of(-12), 12);
        assert_eq!(errno_of(1), EIO, "a positive return is a failure");
        assert_eq!(errno_of(c_int::MIN), EIO, "no overflow");
        assert_eq!(host_result(0), Ok(()));
        assert_eq!(host_result(-28), Err(HostError { errno: 28 }));
    }
}
