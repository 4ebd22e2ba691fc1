//! The queries: subpage states, pending ranges, mapping order, backing,
//! statistics, geometry.

use super::*;

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
