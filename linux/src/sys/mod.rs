//! Every system call of the crate and every `unsafe` block (the `Send` /
//! `Sync` impls of the mapping included), one module per kernel interface:
//!
//! | module | what |
//! |---|---|
//! | `fd` | calls on a file descriptor: `fallocate`, `ftruncate`, `memfd_create`, `fstat`, `pread`; [`SizedFile`], a file whose size this crate fixed |
//! | `fs` | filesystems: `fstatfs`, unnamed files in a directory, a private `huge=always` tmpfs (the mount API) |
//! | `kvm` | KVM: the VM, guest_memfd, memslots, vCPUs and their ioctls, binary statistics |
//! | `mapping` | [`Mapping`]: `mmap` / `munmap` / `madvise` / `mincore`, and the volatile accesses to guest memory |
//!
//! Raw syscalls go through rustix; `mincore`, which rustix does not wrap, goes
//! through libc. KVM ioctls go through kvm-ioctls; the constants that
//! kvm-bindings 0.14 still lacks (Linux 6.18) are defined in `kvm`.
//!
//! Each wrapper returns the errno on failure; `fallocate` retries `EINTR`.

mod fd;
mod fs;
mod kvm;
mod mapping;

pub use fd::{allocate, allocated_bytes, memfd, pread_exact, punch_hole, SizedFile};
pub use fs::{file_in, fs_of, thp_tmpfs_file, FsOf, StepError, HUGETLBFS_MAGIC, TMPFS_MAGIC};
pub use kvm::{
    kvm_stats_fd, Kvm, KvmError, KvmStats, Vcpu, VcpuExit, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS, KVM_MEM_GUEST_MEMFD,
};
pub use mapping::{private_memory, Mapping, MAPPING_ALIGN};

use rustix::io::Errno;

/// An errno as an integer (what `HostError` carries).
pub fn errno(e: Errno) -> i32 {
    e.raw_os_error()
}
