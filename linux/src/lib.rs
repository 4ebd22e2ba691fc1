//! hugepunch over real Linux memory.
//!
//! [`LinuxHost`] is the engine's [`Host`](hugepunch::Host) over a real file
//! descriptor whose memory is returned with `fallocate(PUNCH_HOLE)`: a
//! memfd, a KVM guest_memfd, a file in a directory the user names (a tmpfs
//! mounted `huge=`, hugetlbfs: [`Backend::File`]), or a file on a private
//! `huge=always` tmpfs made for it ([`Backend::Thp`]: real transparent huge
//! pages with no set-up). [`real::run`] replays a pattern on real files
//! twice, directly and through the engine, and reports what each cost and
//! released ([`replay`] holds the two replays); [`huge_counters`] reads what
//! the kernel says about huge pages;
//! [`vm`] runs a real guest (vCPUs at CPL3 on a memslot of guest_memfd, or
//! of ordinary memory: THP, memfd, a file) that
//! gives memory back while the VMM releases it both ways.
//!
//! # The THP backend leaves nothing behind
//!
//! [`Backend::Thp`] makes its tmpfs with the kernel's mount API
//! (`fsopen("tmpfs")`, `fsconfig` `huge=always,size=`, `fsmount`) as a
//! detached mount that is never attached to any mount point, creates the
//! file in it with `O_TMPFILE`, and closes the mount's descriptor before
//! returning: no name and no mount exists anywhere at any moment, and the
//! file's descriptor is the only reference to the tmpfs. Whatever ends the
//! process — success, error, panic, Ctrl-C, SIGKILL — the kernel frees the
//! file and its filesystem with the last descriptor. It needs
//! `CAP_SYS_ADMIN` (root); elsewhere its error says what to run instead
//! (`--backend file --path` on an existing `huge=always` tmpfs). No system
//! setting is read-modify-written: `shmem_enabled` may stay `never`, since a
//! tmpfs's own `huge=` option decides for its files.
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
//! In [`sys`], and nowhere else: every system call of the crate (fallocate,
//! ftruncate, memfd_create, mmap, munmap, madvise, fstat, fstatfs, pread
//! and the mount API through rustix; mincore through libc, which rustix
//! does not wrap), every KVM ioctl (the VM's, guest_memfd's, the memslots'
//! and the vCPUs': `KVM_RUN`, `KVM_SET_REGS`, `KVM_SET_SREGS`,
//! `KVM_SET_CPUID2`), and the accesses to guest memory through the shared
//! mapping — volatile loads and stores only, never `ptr::copy` or a slice
//! (STYLE.md rule 13) — each `unsafe` block with its `// SAFETY:` argument
//! (enforced by `clippy::undocumented_unsafe_blocks`). A file is mapped
//! safely only as a [`sys::SizedFile`], whose size this crate fixed and
//! never changes ([`sys::Mapping::of`]). Every file descriptor is an
//! `OwnedFd`; the KVM memslot, a pointer the kernel keeps into the
//! mapping, holds the mapping alive until it is deleted (STYLE.md rule 14).
//! The audit of each block is in docs/RELIABILITY.md.
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
#![deny(missing_docs)]

mod attributes;
mod host;
pub mod huge_counters;
pub mod real;
pub mod replay;
mod sync;
pub mod sys;
pub mod vm;
pub mod vm_memory;

pub use host::{
    guest_memfd_unavailable, memfd_huge_backing, Backend, Counts, FileInfo, HugeBacking, LinuxHost,
    MemfdOptions, SetupError, HUGE_PAGE_SIZE,
};
pub use real::{RealError, RealReport, RunOptions};
#[cfg(feature = "vm-memory")]
pub use vm_memory::{GuestMemoryHost, VmMemoryCounts, VmMemoryError};
