//! The guard every entry point runs in (no panic leaves one), and the
//! helpers of the entry points: the handle, out-parameters, results.

use super::*;

/// Run one entry point: no panic leaves it. A failed C callback carried
/// through the engine comes back as its negative errno; any other panic
/// (a bug of hugepunch) as `-HUGEPUNCH_EPANIC`.
pub(crate) fn guard(f: impl FnOnce() -> c_int) -> c_int {
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
pub(crate) unsafe fn file_ref<'a>(file: *const hugepunch_file) -> Option<&'a HugePunch> {
    // SAFETY: the caller's promise: null or a live handle, which
    // `hugepunch_destroy` (never concurrent with another call) alone frees.
    unsafe { file.as_ref() }.map(|f| &f.inner)
}

/// Store `value` through `out` if it is not null.
///
/// # Safety
///
/// `out` is null or valid for a write of a `T`.
pub(crate) unsafe fn put<T>(out: *mut T, value: T) {
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
pub(crate) unsafe fn answer<T>(
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

pub(crate) fn result(r: Result<(), Error>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => -e.errno(),
    }
}
