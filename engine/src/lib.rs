//! Deferred hole-punch coalescing for guest memory backed by huge pages
//! (KVM `guest_memfd`, SEV-SNP, TDX): 4 KiB hole punches are recorded in a
//! bitmap per huge page, and each 2 MiB or 1 GiB huge page is freed once,
//! whole, when its last subpage is punched, so that neither the huge page
//! nor the host's direct map is split. The core is lock-free, never defers
//! the invalidation of memory that may be private, and refuses to convert
//! to private memory that has a pending punch.
//!
//! # Example
//!
//! ```
//! use hugepunch::{Attribute, ByteRange, Config, Hint, Host, HostError, HugePunch};
//! use std::sync::Arc;
//!
//! /// A host that owns nothing: every subpage is shared, frees succeed.
//! struct Shared;
//!
//! impl Host for Shared {
//!     fn is_shared(&self, _: ByteRange) -> bool { true }
//!     fn set_attributes(&self, _: ByteRange, _: Attribute) {}
//!     fn invalidate_begin(&self, _: ByteRange, _: Hint) {}
//!     fn invalidate_end(&self, _: ByteRange) {}
//!     fn allocate(&self, _: ByteRange, _: u8) -> Result<(), HostError> { Ok(()) }
//!     fn free(&self, _: ByteRange, _: u8) -> Result<(), HostError> { Ok(()) }
//!     fn zero(&self, _: ByteRange) {}
//! }
//!
//! // 4 MiB, populated, 2 MiB huge pages, no budget, the `Reject` policy.
//! let file = HugePunch::new(Config::new(4 << 20), Arc::new(Shared))?;
//! // 511 of the 512 subpages of the first huge page: all deferred.
//! for sub in 0..511 {
//!     file.punch(sub * 4096, 4096)?;
//! }
//! assert_eq!(file.stats().pending_subpages, 511);
//! assert_eq!(file.stats().free_calls, 0);
//! assert!(file.is_punched(0)?);
//! // The last one completes the huge page: one free of the whole 2 MiB.
//! file.punch(511 * 4096, 4096)?;
//! assert_eq!(file.stats().huge_frees, 1);
//! assert_eq!(file.stats().free_calls, 1);
//! // A bad range is an error with an errno, and changes nothing else.
//! assert_eq!(file.punch(0x800, 4096).unwrap_err().errno(), hugepunch::EINVAL);
//! # Ok::<(), hugepunch::Error>(())
//! ```
//!
//! # The host
//!
//! The engine keeps only bitmaps and counters; it acts on memory through the
//! [`Host`] it is given: the shared-state check, attribute changes, MMU
//! invalidations, allocation, free and zeroing (a kernel model and a Linux
//! backend over memfd and `guest_memfd` are two hosts, in the workspace's
//! `model` and `linux` crates). The trait's documentation says what each
//! callback may do: block, yes; re-enter the engine, only through its
//! read-only calls; panic, and the engine counts the call as failed,
//! finishes the operation, then resumes the panic.
//!
//! # Concurrency
//!
//! [`HugePunch`] is `Send + Sync` and every operation takes `&self`. Punches,
//! the completion claim, the conversion check and the un-punch of a
//! populate are lock-free, on the atomic words of the huge page they touch:
//! a punch that meets a completion in flight invalidates its range itself
//! rather than wait. The few waits are short and on one huge page: a
//! populate meeting a completion in flight, an operation meeting a forced
//! split, teardown or an allocation of its huge page. [`flush`] and
//! [`teardown`] serialise on one mutex per file and call the host under
//! it; no punch takes that mutex. Statistics are exact whenever no
//! operation is in flight.
//!
//! The hot path: a 4 KiB punch of a huge page that is not complete makes
//! three locked read-modify-writes (its registration, the bit, the exit
//! that commits it) and, without a budget, writes no cache line that
//! threads working on other huge pages write (its statistics, and its
//! share of the pending count, go to a per-thread shard). [`punch_many`]
//! punches a list of ranges (a balloon request, a free page report) as one
//! operation: one registration per run of ranges on one huge page. With no
//! budget, `pending_bytes_peak` is exact for one thread at a time and
//! otherwise approximate within a documented bound (`docs/CONTRACT.md`
//! §5.3).
//!
//! [`punch_many`]: HugePunch::punch_many
//! [`flush`]: HugePunch::flush
//! [`teardown`]: HugePunch::teardown
//!
//! # The contract
//!
//! The exact meaning of every operation, the errors and their errnos, the
//! eight invariants, the statistics and the trace format are written down
//! in `docs/CONTRACT.md` in the hugepunch repository; `docs/DESIGN.md` there
//! explains the per-huge-page protocol that keeps them.
//!
//! # Main types
//!
//! * [`HugePunch`]: one file and its operations (`punch`, `punch_many`,
//!   `convert`, `populate`, `flush`, `teardown`) and queries (`is_punched`,
//!   `pending_ranges`, `max_mapping_order`, `stats`).
//! * [`Config`]: size, huge page order, pending-bytes budget, [`Policy`]
//!   for conversions to private, initial backing.
//! * [`Host`], [`Attribute`], [`Hint`], [`HostError`]: the host interface.
//! * [`Error`]: what an operation may return, each with its errno
//!   ([`Error::errno`]).
//! * [`Stats`]: the statistics, serialisable with serde.
//! * [`Geometry`], [`ByteRange`]: validated sizes and ranges, and the split
//!   of a range into its parts per huge page.
//!
//! # Features
//!
//! * `test-util`: the `hugepunch::testing` module, for tests and fuzz
//!   targets: a recording host, a forwarding host with a hook per callback
//!   (to block, fail or panic inside one), the sequential reference model
//!   of the contract and the harness that compares the engine with it after
//!   every step. Not for production: its host and model keep one entry per
//!   subpage.
//! * `rmw-count` (tests only): every atomic of the engine counts its
//!   read-modify-writes per thread, read by `hugepunch::rmw_count`
//!   (`engine/tests/rmw_count.rs` asserts the hot path's).

#![deny(missing_docs)]

mod error;
mod file;
mod host;
mod index;
mod page;
mod range;
mod stats;
mod sync;
#[cfg(feature = "test-util")]
pub mod testing;
mod unwind;

pub use error::{Error, HostError, EAGAIN, EINVAL, EIO};
pub use file::{Backing, Config, HugePunch, SubpageState, TeardownReport};
pub use host::{Attribute, Host, NullHost, Policy};
pub use range::{
    ByteRange, Geometry, Hint, PagePart, MAX_ORDER, MAX_SIZE, SUBPAGE_SHIFT, SUBPAGE_SIZE,
};
pub use stats::Stats;

/// Atomic read-modify-writes the calling thread has made in the engine so
/// far (feature `rmw-count`, for tests: every atomic of the engine then
/// counts its RMWs; see `engine/tests/rmw_count.rs`).
#[cfg(all(feature = "rmw-count", not(hugepunch_loom)))]
pub fn rmw_count() -> u64 {
    sync::rmw_count()
}
