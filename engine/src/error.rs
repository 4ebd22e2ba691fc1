//! Errors, each with the errno a kernel would answer.

use serde::{Deserialize, Serialize};

/// Why an engine operation failed.
///
/// Every variant maps to the errno that KVM's guest_memfd (or the host
/// backing it) would return for the same situation; see [`Error::errno`].
/// An error never leaves a partial change behind except where a variant
/// says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The range is not 4 KiB aligned, is empty, overflows, or runs past the
    /// end of the file (EINVAL). Nothing changed but `errors_invalid_range`.
    #[error("invalid range: offset {offset:#x}, len {len:#x} (must be 4 KiB aligned, non-empty and inside the file)")]
    InvalidRange {
        /// The offset the caller passed.
        offset: u64,
        /// The length the caller passed.
        len: u64,
    },
    /// Range number `index` of a [`punch_many`](crate::HugePunch::punch_many)
    /// batch is not valid (as for `InvalidRange`; EINVAL). The whole batch
    /// was refused before anything changed: nothing changed but
    /// `errors_invalid_range` (by one).
    #[error("invalid range at index {index} of the batch: offset {offset:#x}, len {len:#x} (must be 4 KiB aligned, non-empty and inside the file)")]
    InvalidRangeInBatch {
        /// Where the range is in the batch (from 0).
        index: usize,
        /// The offset the caller passed.
        offset: u64,
        /// The length the caller passed.
        len: u64,
    },
    /// A conversion to private was refused because the subpage at `offset`
    /// has a pending punch (EAGAIN). Populate the range and retry. Nothing
    /// changed but `convert_calls` and `conversions_rejected`.
    #[error(
        "conversion refused: subpage at {offset:#x} has a pending punch; populate it and retry"
    )]
    PendingPunch {
        /// The first subpage of the range with a pending punch.
        offset: u64,
    },
    /// The file was torn down (EIO, as KVM answers for a dead VM). Nothing
    /// changed but `errors_torn_down` — except for a `populate` that passed
    /// validation before a concurrent teardown reached its huge pages: it
    /// counts as a call too, and what it populated before that stays
    /// (teardown frees it).
    #[error("the file was torn down")]
    TornDown,
    /// The host could not allocate memory for a populate (the host's errno,
    /// typically ENOMEM or ENOSPC). Huge pages and subpages of the range
    /// before `offset` were populated; from `offset` on, nothing was.
    #[error("the host could not allocate at {offset:#x} (errno {errno})")]
    AllocationFailed {
        /// Where the failed allocation starts: for an `Absent` huge page
        /// (allocated whole) the start of that huge page, which may lie
        /// before the populated range's own offset.
        offset: u64,
        /// The host's errno.
        errno: i32,
    },
    /// The size and order cannot describe a file (EINVAL): the order is
    /// outside 1..=18, or the size is not a positive multiple of the huge
    /// page size of at most 4 PiB.
    #[error(
        "invalid geometry: size {size} bytes ({}), huge page order {order} ({} huge pages): {why}",
        human(*size),
        human(4096u64.checked_shl(*order as u32).unwrap_or(0))
    )]
    InvalidGeometry {
        /// The size asked for, in bytes.
        size: u64,
        /// The huge page order asked for.
        order: u8,
        /// What is wrong with them.
        why: &'static str,
    },
}

/// `EINVAL` on Linux.
pub const EINVAL: i32 = 22;
/// `EAGAIN` on Linux.
pub const EAGAIN: i32 = 11;
/// `EIO` on Linux.
pub const EIO: i32 = 5;

impl Error {
    /// The errno a kernel would return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidRange { .. }
            | Error::InvalidRangeInBatch { .. }
            | Error::InvalidGeometry { .. } => EINVAL,
            Error::PendingPunch { .. } => EAGAIN,
            Error::TornDown => EIO,
            Error::AllocationFailed { errno, .. } => *errno,
        }
    }
}

/// A failed host call (`allocate` or `free`), carrying the host's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("host call failed with errno {errno}")]
pub struct HostError {
    /// The errno the host saw (for the Linux backend, fallocate's).
    pub errno: i32,
}

/// Bytes in the largest binary unit that divides them exactly (`2 MiB`,
/// `4 KiB`, `12345 B`), for error messages.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut n = bytes;
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >= 1024 && n % 1024 == 0 {
        n /= 1024;
        unit += 1;
    }
    format!("{n} {}", UNITS[unit])
}
