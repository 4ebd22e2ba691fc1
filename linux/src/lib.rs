//! hugepunch over real Linux memory.
//!
//! [`LinuxHost`] is the engine's [`Host`](hugepunch::Host) over a real file
//! descriptor: a memfd or a KVM guest_memfd whose memory is returned with
//! `fallocate(PUNCH_HOLE)`. [`real::run`] replays a pattern on real files
//! twice, directly and through the engine, and reports what each cost and
//! released.
//!
//! ```no_run
//! use hugepunch::{Config, HugePunch};
//! use hugepunch_linux::{LinuxHost, MemfdOptions};
//! use std::sync::Arc;
//!
//! let host = Arc::new(LinuxHost::memfd(8 << 20, MemfdOptions::default())?);
//! host.populate_all().expect("fallocate");
//! let file = HugePunch::new(Config::new(8 << 20), host.clone())?;
//! for sub in 0..512 {
//!     file.punch(sub * 4096, 4096)?; // the last one frees 2 MiB in one fallocate
//! }
//! assert_eq!(host.counts().punch_calls, 1);
//! assert_eq!(host.resident_bytes().unwrap(), 6 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Where `unsafe` lives
//!
//! Only in [`sys`]: every syscall (fallocate, memfd_create, mmap, munmap,
//! madvise, fstat, pread through rustix; mincore through libc, which rustix
//! does not wrap), the KVM ioctls, and the accesses to guest memory through
//! the shared mapping — volatile loads and stores only, never `ptr::copy`
//! or a slice (STYLE.md rule 13) — each `unsafe` block with its
//! `// SAFETY:` argument (enforced by `clippy::undocumented_unsafe_blocks`).
//! Every file descriptor is an `OwnedFd`; the KVM memslot, a pointer the
//! kernel keeps into the mapping, holds the mapping alive until it is
//! deleted (STYLE.md rule 14). The audit of each block is in
//! docs/RELIABILITY.md.
//!
//! # Stricter than the kernel
//!
//! hugepunch refuses a punch that runs past the end of the file
//! (`InvalidRange`, EINVAL) where `fallocate` accepts it as a no-op (CONTRACT.md
//! §3); a VMM that must mirror the kernel clips the range to the file size
//! first, and answers 0 for a range that starts at or past it. Unaligned
//! ranges are refused by both guest_memfd and hugepunch; shmem (memfd) would
//! instead zero the partial pages.
#![cfg(target_os = "linux")]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod host;
pub mod kernel;
pub mod pattern;
pub mod real;
mod sync;
pub mod sys;

pub use host::{
    guest_memfd_unavailable, memfd_huge_backing, Backend, Counts, FileInfo, HugeBacking, LinuxHost,
    MemfdOptions, SetupError, HUGE_PAGE_SIZE,
};
pub use real::{RealError, RealReport, RunOptions};
