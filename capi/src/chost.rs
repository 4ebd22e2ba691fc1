//! The C host: `hugepunch_host` as the engine's `Host`.

use super::*;

/// A C callback reported failure: carried through the engine as a panic
/// payload (the `Host` trait's rule for a failed callback) and turned back
/// into its errno at the entry point. Raised with `resume_unwind`, which
/// runs no panic hook: nothing is printed.
pub(crate) struct CallbackFailed(pub(crate) c_int);

/// `hugepunch_host` as the engine's [`Host`].
pub(crate) struct CHost(pub(crate) hugepunch_host);

// SAFETY: the C caller promises, as the header says on `hugepunch_new`,
// that the callbacks may be called from any thread, concurrently, with
// `opaque`; hugepunch never dereferences `opaque` itself.
unsafe impl Send for CHost {}
// SAFETY: as for `Send`: shared access only calls the callbacks.
unsafe impl Sync for CHost {}

impl CHost {
    pub(crate) fn checked(host: &hugepunch_host) -> Option<CHost> {
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
pub(crate) fn errno_of(rc: c_int) -> c_int {
    match rc.checked_neg() {
        Some(e) if e > 0 => e,
        _ => EIO,
    }
}

pub(crate) fn host_result(rc: c_int) -> Result<(), HostError> {
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
