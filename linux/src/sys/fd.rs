//! Calls on a file descriptor, and [`SizedFile`]: a file whose size this
//! crate fixed, the only kind [`Mapping::of`](super::Mapping::of) maps
//! without `unsafe`.

use super::errno;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::io::Errno;

fn fallocate_retrying(
    fd: impl AsFd,
    flags: FallocateFlags,
    offset: u64,
    len: u64,
) -> Result<(), i32> {
    loop {
        match rustix::fs::fallocate(&fd, flags, offset, len) {
            Ok(()) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on exactly `offset .. offset + len`,
/// retrying `EINTR`. No validation: the kernel answers for bad input (the
/// invalid-punch tests rely on that).
pub fn punch_hole(fd: impl AsFd, offset: u64, len: u64) -> Result<(), i32> {
    fallocate_retrying(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// `fallocate(KEEP_SIZE)`: allocate `offset .. offset + len` (guest_memfd
/// needs `KEEP_SIZE` for every mode), retrying `EINTR`.
pub fn allocate(fd: impl AsFd, offset: u64, len: u64) -> Result<(), i32> {
    fallocate_retrying(fd, FallocateFlags::KEEP_SIZE, offset, len)
}

/// `ftruncate(fd, size)`.
fn set_len(fd: impl AsFd, size: u64) -> Result<(), i32> {
    rustix::fs::ftruncate(fd, size).map_err(errno)
}

/// `memfd_create(name, MFD_CLOEXEC [| MFD_HUGETLB | MFD_HUGE_2MB])`, then
/// `ftruncate` to `size`.
pub fn memfd(name: &str, size: u64, hugetlb: bool) -> Result<OwnedFd, i32> {
    let mut flags = MemfdFlags::CLOEXEC;
    if hugetlb {
        flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
    }
    let fd = rustix::fs::memfd_create(name, flags).map_err(errno)?;
    rustix::fs::ftruncate(&fd, size).map_err(errno)?;
    Ok(fd)
}

/// `st_blocks * 512` of `fd` (`fstat`): the bytes a shmem or hugetlbfs file
/// holds. Always 0 for guest_memfd.
pub fn allocated_bytes(fd: impl AsFd) -> Result<u64, i32> {
    let st = rustix::fs::fstat(fd).map_err(errno)?;
    Ok(st.st_blocks as u64 * 512)
}

/// `pread` of exactly `buf.len()` bytes at `offset`.
pub fn pread_exact(fd: impl AsFd, buf: &mut [u8], offset: u64) -> Result<(), i32> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(&fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(libc::EIO),
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

/// A file this crate made and sized, which no code of this crate shrinks:
/// what [`Mapping::of`](super::Mapping::of) maps safely.
///
/// Its length is set when it is made (`ftruncate`, or a guest_memfd's size
/// at creation) and never changed afterwards: it has no method that
/// truncates, and its descriptor is owned here. It lends the descriptor
/// ([`AsFd`]) for the calls that keep the size (`fallocate` with
/// `KEEP_SIZE`, `fstat`, `pread`, a memslot) and so that a VMM can hand the
/// file to another process. Whoever truncates a mapped file anyway — a
/// holder of a duplicate descriptor, another process — makes an access to
/// the lost pages raise `SIGBUS`, which ends the process: the position of
/// every VMM that maps a file it shares (rust-vmm vm-memory's
/// `MmapRegion`, QEMU's `memory-backend-file`).
#[derive(Debug)]
pub struct SizedFile {
    fd: OwnedFd,
    size: u64,
}

impl SizedFile {
    /// Take `fd`, a regular file, and set its length to `size`
    /// (`ftruncate`): the last change of its length.
    pub fn new(fd: OwnedFd, size: u64) -> Result<Self, i32> {
        set_len(&fd, size)?;
        Ok(SizedFile { fd, size })
    }

    /// A fresh memfd of `size` bytes ([`memfd`]).
    pub fn memfd(name: &str, size: u64, hugetlb: bool) -> Result<Self, i32> {
        Ok(SizedFile {
            fd: memfd(name, size, hugetlb)?,
            size,
        })
    }

    /// A file `fd` that was made `size` bytes long and cannot be resized
    /// (a guest_memfd, by [`Kvm::shared_guest_memfd`](super::Kvm::shared_guest_memfd)).
    pub(super) fn fixed(fd: OwnedFd, size: u64) -> Self {
        SizedFile { fd, size }
    }

    /// Its length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl AsFd for SizedFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
