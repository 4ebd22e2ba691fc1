//! Every system call of the crate, and every `unsafe` block but one
//! (`Send`/`Sync` of the mapping, in this module too).
//!
//! Raw syscalls go through rustix; `mincore`, which rustix does not wrap, goes
//! through libc. KVM ioctls go through kvm-ioctls; the constants that
//! kvm-bindings 0.14 still lacks (Linux 6.18) are defined here.
//!
//! Each wrapper returns the errno on failure; `fallocate` retries `EINTR`.

use hugepunch::ByteRange;
use rustix::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::io::Errno;
use rustix::mm::{Advice, MapFlags, ProtFlags};
use std::ffi::c_void;
use std::ptr::NonNull;

/// `GUEST_MEMFD_FLAG_MMAP` (Linux 6.18): the guest_memfd may be mmap()ed.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (Linux 6.18): its memory starts shared,
/// so the host mapping may touch it.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18): which of the flags above the
/// kernel accepts.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;
/// `KVM_CAP_GUEST_MEMFD`.
pub const KVM_CAP_GUEST_MEMFD: u64 = 234;
/// `KVM_MEM_GUEST_MEMFD`: a memslot flag saying the slot is backed by a
/// guest_memfd.
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;

/// An errno as an integer (what `HostError` carries).
pub fn errno(e: Errno) -> i32 {
    e.raw_os_error()
}

fn fallocate_retrying(
    fd: &OwnedFd,
    flags: FallocateFlags,
    offset: u64,
    len: u64,
) -> Result<(), i32> {
    loop {
        match rustix::fs::fallocate(fd, flags, offset, len) {
            Ok(()) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on exactly `offset .. offset + len`,
/// retrying `EINTR`. No validation: the kernel answers for bad input (the
/// invalid-punch tests rely on that).
pub fn punch_hole(fd: &OwnedFd, offset: u64, len: u64) -> Result<(), i32> {
    fallocate_retrying(
        fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// `fallocate(KEEP_SIZE)`: allocate `offset .. offset + len` (guest_memfd
/// needs `KEEP_SIZE` for every mode), retrying `EINTR`.
pub fn allocate(fd: &OwnedFd, offset: u64, len: u64) -> Result<(), i32> {
    fallocate_retrying(fd, FallocateFlags::KEEP_SIZE, offset, len)
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
pub fn allocated_bytes(fd: &OwnedFd) -> Result<u64, i32> {
    let st = rustix::fs::fstat(fd).map_err(errno)?;
    Ok(st.st_blocks as u64 * 512)
}

/// `pread` of exactly `buf.len()` bytes at `offset`.
pub fn pread_exact(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> Result<(), i32> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(libc::EIO),
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

/// Take ownership of a file descriptor a KVM ioctl returned.
fn own(raw: RawFd) -> OwnedFd {
    // SAFETY: `raw` was just returned by a successful KVM_CREATE_GUEST_MEMFD
    // ioctl, so it is an open descriptor that nothing else owns; ownership
    // moves into the OwnedFd, which closes it exactly once.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// A VM (type 0) and the capability answers the guest_memfd backend needs.
pub struct Kvm {
    /// Keeps /dev/kvm open for the VM's life.
    _kvm: kvm_ioctls::Kvm,
    /// The VM the guest_memfd belongs to.
    pub vm: kvm_ioctls::VmFd,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: the guest_memfd flags offered.
    pub guest_memfd_flags: u64,
}

/// Why a KVM step failed, with the errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmError {
    /// The step (open /dev/kvm, create VM, ...).
    pub step: &'static str,
    /// The errno.
    pub errno: i32,
}

impl std::fmt::Display for KvmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed: {}",
            self.step,
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl Kvm {
    /// Open /dev/kvm and create a type-0 VM; ask which guest_memfd flags
    /// the kernel offers. Fails where /dev/kvm is missing or refuses, or
    /// where the kernel has no guest_memfd at all.
    pub fn open() -> Result<Self, KvmError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| KvmError {
            step: "open /dev/kvm",
            errno: e.errno(),
        })?;
        let vm = kvm.create_vm_with_type(0).map_err(|e| KvmError {
            step: "KVM_CREATE_VM (type 0)",
            errno: e.errno(),
        })?;
        if vm.check_extension_raw(KVM_CAP_GUEST_MEMFD as _) <= 0 {
            return Err(KvmError {
                step: "KVM_CAP_GUEST_MEMFD",
                errno: libc::EOPNOTSUPP,
            });
        }
        let flags = vm
            .check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS as _)
            .max(0) as u64;
        Ok(Kvm {
            _kvm: kvm,
            vm,
            guest_memfd_flags: flags,
        })
    }

    /// `KVM_CREATE_GUEST_MEMFD` of `size` bytes with `flags`.
    pub fn guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd, KvmError> {
        let gmem = kvm_bindings::kvm_create_guest_memfd {
            size,
            flags,
            ..Default::default()
        };
        let raw = self.vm.create_guest_memfd(gmem).map_err(|e| KvmError {
            step: "KVM_CREATE_GUEST_MEMFD",
            errno: e.errno(),
        })?;
        Ok(own(raw))
    }

    /// Bind `fd` (a guest_memfd of `size` bytes, mapped at `map`) to memslot
    /// 0 at guest physical address 0 with `KVM_SET_USER_MEMORY_REGION2`.
    pub fn bind_memslot(&self, fd: &OwnedFd, map: &Mapping) -> Result<(), KvmError> {
        use rustix::fd::AsRawFd;
        let region = kvm_bindings::kvm_userspace_memory_region2 {
            slot: 0,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0,
            memory_size: map.len() as u64,
            userspace_addr: map.addr() as u64,
            guest_memfd_offset: 0,
            guest_memfd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `userspace_addr .. + memory_size` is our own live shared
        // mapping of the same guest_memfd (`map`), which the caller keeps
        // alive as long as the VM (both live in one `LinuxHost`, the VM is
        // dropped first); the kernel only reads the struct, which lives on
        // our stack for the call.
        unsafe { self.vm.set_user_memory_region2(region) }.map_err(|e| KvmError {
            step: "KVM_SET_USER_MEMORY_REGION2",
            errno: e.errno(),
        })
    }
}

/// A `MAP_SHARED` read-write mapping of a whole file, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory with no thread affinity; every
// access through it goes through the methods below, which are sound from any
// thread (they write or read bytes of a MAP_SHARED mapping, which the
// kernel keeps coherent, and the callers own the ranges they touch).
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: shared references only allow the methods below.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` from offset 0, shared, read-write.
    pub fn new(fd: &OwnedFd, len: usize) -> Result<Self, i32> {
        // SAFETY: a fresh mapping at an address the kernel chooses (null
        // hint, no MAP_FIXED), so no existing Rust object is aliased or
        // replaced; the returned pointer is owned by `Mapping` and unmapped
        // once, in `drop`.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd.as_fd(),
                0,
            )
        }
        .map_err(errno)?;
        let ptr = NonNull::new(ptr).ok_or(libc::ENOMEM)?;
        Ok(Mapping { ptr, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is it empty? (Never: a mapping has at least one page.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address.
    pub fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    fn check(&self, r: ByteRange) {
        assert!(
            r.offset
                .checked_add(r.len)
                .is_some_and(|end| end <= self.len as u64),
            "range {r:?} outside the mapping"
        );
    }

    /// Zero `r` through the mapping. The pages stay what they were (a
    /// resident huge folio stays whole); a hole would be allocated.
    pub fn zero(&self, r: ByteRange) {
        self.check(r);
        // SAFETY: `r` lies inside the live mapping (checked above), which is
        // writable; the bytes are plain memory shared with the file, not a
        // Rust object anyone holds a reference to, so a volatile-free
        // write of zeros is sound; the kernel keeps it coherent with other
        // users of the file.
        unsafe {
            std::ptr::write_bytes(
                self.ptr.as_ptr().cast::<u8>().add(r.offset as usize),
                0,
                r.len as usize,
            )
        }
    }

    /// Fill `r` with `byte` through the mapping (tests: make data visible).
    pub fn fill(&self, r: ByteRange, byte: u8) {
        self.check(r);
        // SAFETY: as in `zero`.
        unsafe {
            std::ptr::write_bytes(
                self.ptr.as_ptr().cast::<u8>().add(r.offset as usize),
                byte,
                r.len as usize,
            )
        }
    }

    /// Copy `buf.len()` bytes at `offset` out of the mapping. Touching a hole
    /// through a shared mapping allocates it: read only resident memory.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        self.check(ByteRange::new(offset, buf.len() as u64));
        // SAFETY: the source lies inside the live, readable mapping (checked
        // above) and `buf` is a distinct, exclusively borrowed Rust buffer,
        // so the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().cast::<u8>().add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// Read one byte of every 4 KiB page of `r` through the mapping: a read
    /// fault per page not yet mapped (guest_memfd clears a folio and marks
    /// it up to date at its first fault).
    pub fn touch(&self, r: ByteRange) {
        self.check(r);
        for off in (r.offset..r.end()).step_by(4096) {
            // SAFETY: `off` lies inside the live, readable mapping (checked
            // above); a volatile read of one byte of shared memory has no
            // aliasing requirement and keeps the fault from being optimised
            // away.
            unsafe { std::ptr::read_volatile(self.ptr.as_ptr().cast::<u8>().add(off as usize)) };
        }
    }

    /// `madvise(MADV_HUGEPAGE)` over the whole mapping.
    pub fn advise_hugepage(&self) -> Result<(), i32> {
        // SAFETY: the range is exactly our own live mapping; MADV_HUGEPAGE
        // only changes how later faults allocate, never the contents.
        unsafe { rustix::mm::madvise(self.ptr.as_ptr(), self.len, Advice::LinuxHugepage) }
            .map_err(errno)
    }

    /// How many 4 KiB pages of `r` are resident in the file's page cache
    /// (`mincore`; for a shared file mapping it reports the file's pages,
    /// mapped or not).
    pub fn resident_pages(&self, r: ByteRange) -> Result<u64, i32> {
        self.check(r);
        let pages = r.len.div_ceil(4096) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the address range is inside our live mapping and 4 KiB
        // aligned (offsets are multiples of 4 KiB, the mapping is
        // page-aligned); `vec` has one byte per page of the range, as
        // mincore writes.
        let ret = unsafe {
            libc::mincore(
                self.ptr.as_ptr().cast::<u8>().add(r.offset as usize).cast(),
                r.len as usize,
                vec.as_mut_ptr(),
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr .. ptr + len` is the mapping `new` created, unmapped
        // exactly once, here; no reference into it outlives `self` (every
        // method copies in or out).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr(), self.len) };
    }
}
