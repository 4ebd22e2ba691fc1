//! The operations: punch, punch_many, convert, populate, flush, teardown.

use super::*;

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
pub(crate) const BATCH_ON_STACK: usize = 256;

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
