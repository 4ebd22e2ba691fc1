//! The crate's raw system calls and its `unsafe` blocks (the `Send`/`Sync`
//! impls of the mapping included), but for the two exceptions the crate
//! documentation names: the host's call of [`Mapping::new`] and the vCPU
//! ioctls of `vm` through kvm-ioctls' safe `VcpuFd`.
//!
//! Raw syscalls go through rustix; `mincore`, which rustix does not wrap, goes
//! through libc. KVM ioctls go through kvm-ioctls; the constants that
//! kvm-bindings 0.14 still lacks (Linux 6.18) are defined here.
//!
//! Each wrapper returns the errno on failure; `fallocate` retries `EINTR`.
//!
//! # Guest memory is accessed only with volatile accesses
//!
//! [`Mapping`] is a shared mapping of guest memory: the guest (through a
//! KVM memslot), the kernel (a punch turns a page into a hole under our
//! feet) and any other process mapping the file may change it at any
//! moment, so the compiler may assume nothing about it (STYLE.md rule 13,
//! after rust-vmm vm-memory's `VolatileSlice`). No `&`/`&mut` reference to
//! it is ever made; every byte is read or written with
//! `ptr::read_volatile` / `ptr::write_volatile`: 8-byte words where the
//! address is 8-byte aligned, single bytes at the unaligned edges. Memory
//! that no Rust allocation owns, reached only by volatile accesses, is the
//! second case of `read_volatile`'s documentation (I/O memory): a
//! concurrent change by another agent is not a data race of the Rust
//! abstract machine, and no access is elided, merged or torn into
//! something wider. (Volatile accesses are not atomic: two threads of this
//! process writing the same bytes at once still get whichever bytes land
//! last, which the engine's protocol rules out for the ranges it zeroes.)
//!
//! # The memslot holds its mapping
//!
//! A memslot is a pointer the kernel caches into our mapping
//! (`userspace_addr`). [`Kvm::bind_memslot`] therefore keeps an `Arc` of
//! the [`Mapping`] for as long as the memslot exists, and dropping the
//! [`Kvm`] deletes the memslot before it lets the mapping go (STYLE.md
//! rule 14): whatever the drop order of its owners, the mapping is never
//! unmapped under a live memslot.

use hugepunch::ByteRange;
use rustix::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::io::Errno;
use rustix::mm::{Advice, MapFlags, ProtFlags};
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

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
pub fn set_len(fd: impl AsFd, size: u64) -> Result<(), i32> {
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
/// Dropping it deletes the memslot [`bind_memslot`](Self::bind_memslot)
/// made, then releases that memslot's mapping.
pub struct Kvm {
    /// Keeps /dev/kvm open for the VM's life.
    _kvm: kvm_ioctls::Kvm,
    /// The VM the guest_memfd belongs to.
    pub vm: kvm_ioctls::VmFd,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: the guest_memfd flags offered.
    pub guest_memfd_flags: u64,
    /// The mapping memslot 0 points into, while it is bound: held so that it
    /// cannot be unmapped first.
    memslot: Option<Arc<Mapping>>,
    /// Ordinary memslots ([`add_memslot`](Self::add_memslot)) and the
    /// mappings they point into, held for the same reason.
    plain_slots: std::sync::Mutex<Vec<(u32, Arc<Mapping>)>>,
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
        let kvm = Self::create_vm()?;
        if kvm.vm.check_extension_raw(KVM_CAP_GUEST_MEMFD as _) <= 0 {
            return Err(KvmError {
                step: "KVM_CAP_GUEST_MEMFD",
                errno: libc::EOPNOTSUPP,
            });
        }
        Ok(kvm)
    }

    /// Open /dev/kvm and create a type-0 VM, whether or not the kernel has
    /// guest_memfd: a VM whose guest memory is an ordinary memslot
    /// ([`add_memslot`](Self::add_memslot)) over a VMM's shared mapping,
    /// as QEMU, Cloud Hypervisor and Firecracker back ordinary guests.
    /// `guest_memfd_flags` is 0 where guest_memfd is missing.
    pub fn create_vm() -> Result<Self, KvmError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| KvmError {
            step: "open /dev/kvm",
            errno: e.errno(),
        })?;
        let vm = kvm.create_vm_with_type(0).map_err(|e| KvmError {
            step: "KVM_CREATE_VM (type 0)",
            errno: e.errno(),
        })?;
        let flags = if vm.check_extension_raw(KVM_CAP_GUEST_MEMFD as _) > 0 {
            vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS as _)
                .max(0) as u64
        } else {
            0
        };
        Ok(Kvm {
            _kvm: kvm,
            vm,
            guest_memfd_flags: flags,
            memslot: None,
            plain_slots: std::sync::Mutex::new(Vec::new()),
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

    /// Bind `fd` (a guest_memfd of `map.len()` bytes, mapped by `map`) to
    /// memslot 0 at guest physical address 0 with
    /// `KVM_SET_USER_MEMORY_REGION2`. The memslot keeps `map` alive until it
    /// is deleted (when this `Kvm` is dropped). Fails with `EEXIST` if a
    /// memslot is already bound.
    pub fn bind_memslot(&mut self, fd: &OwnedFd, map: &Arc<Mapping>) -> Result<(), KvmError> {
        use rustix::fd::AsRawFd;
        if self.memslot.is_some() {
            return Err(KvmError {
                step: "KVM_SET_USER_MEMORY_REGION2",
                errno: libc::EEXIST,
            });
        }
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
        // SAFETY: `userspace_addr .. + memory_size` is exactly the live
        // shared mapping `map` of the same guest_memfd. The memslot is a
        // pointer the kernel keeps into it, so the mapping must outlive the
        // memslot: on success `self.memslot` holds an `Arc` of it, released
        // only after `drop` has deleted the memslot (and never, if deleting
        // fails). The kernel only reads `region`, which lives on our stack
        // for the call.
        unsafe { self.vm.set_user_memory_region2(region) }.map_err(|e| KvmError {
            step: "KVM_SET_USER_MEMORY_REGION2",
            errno: e.errno(),
        })?;
        self.memslot = Some(map.clone());
        Ok(())
    }

    /// Delete memslot 0 (`memory_size` 0) if it is bound, then release its
    /// mapping. If the kernel refuses, the memslot stays bound and keeps its
    /// mapping.
    pub fn unbind_memslot(&mut self) -> Result<(), KvmError> {
        if self.memslot.is_none() {
            return Ok(());
        }
        let region = kvm_bindings::kvm_userspace_memory_region2 {
            slot: 0,
            ..Default::default()
        };
        // SAFETY: a region of size 0 deletes the slot: it hands the kernel
        // no address to keep, and the kernel only reads `region`, on our
        // stack for the call.
        unsafe { self.vm.set_user_memory_region2(region) }.map_err(|e| KvmError {
            step: "KVM_SET_USER_MEMORY_REGION2 (delete)",
            errno: e.errno(),
        })?;
        self.memslot = None;
        Ok(())
    }

    /// Is a memslot bound?
    pub fn memslot_bound(&self) -> bool {
        self.memslot.is_some()
    }

    /// Add memslot `slot` of ordinary memory at guest physical address
    /// `gpa`: the whole of `map`, with `KVM_SET_USER_MEMORY_REGION` (slot 0
    /// only while no guest_memfd is bound to it). Like memslot 0 it holds
    /// its mapping until it is deleted, when this `Kvm` is dropped.
    pub fn add_memslot(&self, slot: u32, gpa: u64, map: &Arc<Mapping>) -> Result<(), KvmError> {
        let err = |errno| KvmError {
            step: "KVM_SET_USER_MEMORY_REGION",
            errno,
        };
        let mut slots = self.plain_slots.lock().unwrap_or_else(|p| p.into_inner());
        if (slot == 0 && self.memslot.is_some()) || slots.iter().any(|(s, _)| *s == slot) {
            return Err(err(libc::EEXIST));
        }
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: map.len() as u64,
            userspace_addr: map.addr() as u64,
        };
        // SAFETY: `userspace_addr .. + memory_size` is exactly the live
        // mapping `map`. The kernel keeps that pointer for the slot's life,
        // so the mapping must outlive the slot: `plain_slots` holds an `Arc`
        // of it until `drop` has deleted the slot (and forever if deleting
        // fails). The kernel only reads `region`, on our stack for the call.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| err(e.errno()))?;
        slots.push((slot, map.clone()));
        Ok(())
    }

    /// The CPUID entries KVM supports (`KVM_GET_SUPPORTED_CPUID`), for a
    /// vCPU that runs in 64-bit mode (KVM accepts `EFER.LME` only when the
    /// guest's CPUID offers long mode).
    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId, KvmError> {
        self._kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError {
                step: "KVM_GET_SUPPORTED_CPUID",
                errno: e.errno(),
            })
    }
}

/// A fresh private memfd of `size` bytes, mapped: ordinary memory for a
/// VM's own memslot (the guest's code and page tables), safe to map
/// because nothing else can truncate it. Returns the file and its mapping.
pub fn private_memory(name: &str, size: u64) -> Result<(OwnedFd, Arc<Mapping>), i32> {
    let fd = memfd(name, size, false)?;
    let len = usize::try_from(size).map_err(|_| libc::EFBIG)?;
    // SAFETY: `fd` is the memfd just made and sized to `len` bytes; it is
    // private to the caller and never truncated (no function here
    // truncates), and a memfd's pages fault in on any access.
    let map = unsafe { Mapping::new(&fd, len) }?;
    Ok((fd, Arc::new(map)))
}

/// `KVM_GET_STATS_FD` (`_IO(KVMIO, 0xce)`): a file of KVM's binary
/// statistics of the VM or vCPU `fd` is (Documentation/virt/kvm/api.rst,
/// "KVM_GET_STATS_FD"; read with [`KvmStats`]).
pub fn kvm_stats_fd(fd: &impl rustix::fd::AsRawFd) -> Result<OwnedFd, i32> {
    const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file
    // descriptor or -1; `fd` is a VM or vCPU descriptor, kept open for the
    // call by the borrow of its owner.
    let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    // SAFETY: `raw` was just returned by a successful KVM_GET_STATS_FD, an
    // open descriptor nothing else owns; the OwnedFd closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// KVM's binary statistics of one VM or vCPU: the names and places read
/// once from the file's header and descriptors, the values read again at
/// each [`read`](Self::read).
pub struct KvmStats {
    fd: OwnedFd,
    data_offset: u64,
    /// (name, offset of its first value from `data_offset`).
    names: Vec<(String, u64)>,
}

impl KvmStats {
    /// Open the statistics of the VM or vCPU `fd` and read its descriptors.
    /// Only single-valued statistics are kept (not histograms).
    pub fn open(fd: &impl rustix::fd::AsRawFd) -> Result<Self, i32> {
        let fd = kvm_stats_fd(fd)?;
        let mut header = [0u8; 24];
        pread_exact(&fd, &mut header, 0)?;
        let word = |b: &[u8], i: usize| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        let name_size = word(&header, 1) as usize;
        let num_desc = word(&header, 2) as usize;
        let desc_offset = word(&header, 4) as u64;
        let data_offset = word(&header, 5) as u64;
        let desc_len = 16 + name_size;
        let mut descs = vec![0u8; desc_len * num_desc];
        pread_exact(&fd, &mut descs, desc_offset)?;
        let mut names = Vec::new();
        for d in descs.chunks_exact(desc_len) {
            let flags = word(d, 0);
            let size = u16::from_ne_bytes([d[6], d[7]]);
            let offset = word(d, 2) as u64;
            // Bits 0-3 of the flags are the type: 0 cumulative, 1 instant,
            // 2 peak; 3 and 4 are histograms.
            if flags & 0xf > 2 || size != 1 {
                continue;
            }
            let name = &d[16..];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            names.push((String::from_utf8_lossy(&name[..end]).into_owned(), offset));
        }
        Ok(KvmStats {
            fd,
            data_offset,
            names,
        })
    }

    /// Every statistic's value now, by name.
    pub fn read(&self) -> Result<std::collections::BTreeMap<String, u64>, i32> {
        let mut out = std::collections::BTreeMap::new();
        let mut word = [0u8; 8];
        for (name, offset) in &self.names {
            pread_exact(&self.fd, &mut word, self.data_offset + offset)?;
            out.insert(name.clone(), u64::from_ne_bytes(word));
        }
        Ok(out)
    }
}

impl Drop for Kvm {
    fn drop(&mut self) {
        let slots = std::mem::take(
            self.plain_slots
                .get_mut()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (slot, map) in slots {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot,
                ..Default::default()
            };
            // SAFETY: a region of size 0 deletes the slot: no address is
            // handed to the kernel, which only reads `region` for the call.
            if unsafe { self.vm.set_user_memory_region(region) }.is_err() {
                // The kernel may still point into the mapping: leak it.
                std::mem::forget(map);
            }
        }
        if self.unbind_memslot().is_err() {
            // The kernel still points into the mapping (through the VM,
            // which the guest_memfd or a vCPU may keep alive after our VM
            // fd is closed): leak the mapping rather than unmap it.
            std::mem::forget(self.memslot.take());
        }
    }
}

/// Where every [`Mapping`] starts: a multiple of 2 MiB.
pub const MAPPING_ALIGN: usize = 2 << 20;

/// A `MAP_SHARED` read-write mapping of a whole file, unmapped on drop.
/// Guest memory: every access is volatile (see the module documentation)
/// and no reference into it is ever handed out.
pub struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

// SAFETY: the mapping is memory outside every Rust allocation with no
// thread affinity; `Mapping` owns it (unmapped once, in `drop`) and hands
// out no reference into it, only copies made by the volatile accesses
// below, which are sound from any thread (the kernel keeps a MAP_SHARED
// mapping coherent between threads, processes and the guest).
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: a shared `&Mapping` allows only the methods below,
// none of which relies on being the only user of the memory.
unsafe impl Sync for Mapping {}

/// Write `byte` to `len` bytes at `dst` with volatile stores: one byte at a
/// time up to 8-byte alignment, 8-byte words, then the tail a byte at a
/// time (the access pattern of vm-memory's `VolatileSlice`).
///
/// # Safety
///
/// `dst .. dst + len` lies inside one live, writable mapping that no Rust
/// allocation owns and no reference points into.
unsafe fn volatile_fill(dst: *mut u8, byte: u8, len: usize) {
    let word = u64::from_ne_bytes([byte; 8]);
    let head = (dst as usize).wrapping_neg() % 8;
    let head = head.min(len);
    let words = (len - head) / 8;
    // SAFETY: each access below is at an offset below `len`, or is an
    // 8-byte word that ends at most at `len`, so inside the range the caller
    // vouches for; the words start at `dst + head`, which is 8-byte aligned.
    unsafe {
        for i in 0..head {
            std::ptr::write_volatile(dst.add(i), byte);
        }
        let aligned = dst.add(head).cast::<u64>();
        for w in 0..words {
            std::ptr::write_volatile(aligned.add(w), word);
        }
        for i in head + words * 8..len {
            std::ptr::write_volatile(dst.add(i), byte);
        }
    }
}

/// Copy `buf.len()` bytes at `src` into `buf` with volatile loads, in the
/// same pattern as [`volatile_fill`]; `buf`, ordinary Rust memory, is
/// written with plain stores.
///
/// # Safety
///
/// `src .. src + buf.len()` lies inside one live, readable mapping that no
/// Rust allocation owns (so it cannot overlap `buf`).
unsafe fn volatile_read(src: *const u8, buf: &mut [u8]) {
    let len = buf.len();
    let head = ((src as usize).wrapping_neg() % 8).min(len);
    let (edge, rest) = buf.split_at_mut(head);
    // SAFETY: each access below is at an offset below `len`, or is an
    // 8-byte word that ends at most at `len`, so inside the range the caller
    // vouches for; the words start at `src + head`, which is 8-byte aligned.
    unsafe {
        for (i, b) in edge.iter_mut().enumerate() {
            *b = std::ptr::read_volatile(src.add(i));
        }
        let aligned = src.add(head).cast::<u64>();
        let mut words = rest.chunks_exact_mut(8);
        for (w, out) in (&mut words).enumerate() {
            out.copy_from_slice(&std::ptr::read_volatile(aligned.add(w)).to_ne_bytes());
        }
        let tail = words.into_remainder();
        let at = len - tail.len();
        for (i, b) in tail.iter_mut().enumerate() {
            *b = std::ptr::read_volatile(src.add(at + i));
        }
    }
}

impl Mapping {
    /// Map `len` bytes of `fd` from offset 0, shared, read-write.
    ///
    /// # Safety
    ///
    /// The file must hold at least `len` bytes for as long as the mapping
    /// exists, and be one whose pages any access may fault in (a memfd, or
    /// a guest_memfd created `MMAP | INIT_SHARED`): an access to a page past
    /// the end of a truncated file, or to guest_memfd memory that is not
    /// shared, raises SIGBUS, and a volatile access to memory outside every
    /// Rust allocation must not trap (`ptr::read_volatile`).
    ///
    /// The mapping starts on a 2 MiB boundary ([`MAPPING_ALIGN`]): a huge
    /// page of the file can then be mapped by one page-table entry (a PMD),
    /// and KVM maps guest memory with 2 MiB pages only where the VMM's
    /// mapping does. (The kernel chooses such an address for a file of a
    /// `huge=` tmpfs by itself, but not for every file; QEMU's mapping of a
    /// tmpfs file is 4 KiB aligned, and a guest faulting it in gets no huge
    /// page.) Made by reserving `len + 2 MiB` of address space
    /// (`PROT_NONE`, anonymous), mapping the file over its first aligned
    /// address (`MAP_FIXED`), and unmapping the rest of the reservation.
    pub unsafe fn new(fd: &OwnedFd, len: usize) -> Result<Self, i32> {
        let align = MAPPING_ALIGN;
        let span = len.checked_add(align).ok_or(libc::ENOMEM)?;
        // SAFETY: a fresh anonymous reservation at an address the kernel
        // chooses (null hint, no MAP_FIXED): nothing existing is aliased
        // or replaced, and no Rust object lives in it; it is inaccessible
        // (PROT_NONE) until the file is mapped over part of it.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                span,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(errno)?;
        let head = (base as usize).wrapping_neg() % align;
        let at = base.cast::<u8>().wrapping_add(head).cast::<c_void>();
        // SAFETY: `at .. at + len` lies inside the reservation just made
        // (head < align, so head + len <= span), which this function owns
        // and no Rust object lives in: MAP_FIXED replaces only that
        // reservation. The file is mapped shared, read-write, from offset 0.
        let mapped = unsafe {
            rustix::mm::mmap(
                at,
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                fd.as_fd(),
                0,
            )
        };
        let tail = span - head - len;
        // SAFETY: the head and tail of the reservation (outside the file's
        // mapping, inside the reservation) are unmapped; nothing uses them.
        // On failure the whole reservation goes.
        unsafe {
            match &mapped {
                Ok(_) => {
                    if head > 0 {
                        let _ = rustix::mm::munmap(base, head);
                    }
                    if tail > 0 {
                        let _ = rustix::mm::munmap(at.cast::<u8>().add(len).cast(), tail);
                    }
                }
                Err(_) => {
                    let _ = rustix::mm::munmap(base, span);
                }
            }
        }
        let ptr = mapped.map_err(errno)?;
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

    /// Panics unless `r` lies inside the mapping.
    fn check(&self, r: ByteRange) {
        assert!(
            r.offset
                .checked_add(r.len)
                .is_some_and(|end| end <= self.len as u64),
            "range {r:?} outside the mapping"
        );
    }

    /// The address of byte `offset` (inside the mapping: checked by the
    /// caller).
    fn at(&self, offset: u64) -> *mut u8 {
        self.ptr.as_ptr().cast::<u8>().wrapping_add(offset as usize)
    }

    /// Zero `r` through the mapping, with volatile stores. The pages stay
    /// what they were (a resident huge folio stays whole); a hole would be
    /// allocated.
    pub fn zero(&self, r: ByteRange) {
        self.fill(r, 0);
    }

    /// Fill `r` with `byte` through the mapping, with volatile stores
    /// (tests: make data visible).
    pub fn fill(&self, r: ByteRange, byte: u8) {
        self.check(r);
        // SAFETY: `r` lies inside the live, writable mapping (checked
        // above), memory no Rust allocation owns and no reference points
        // into (`Mapping` hands none out).
        unsafe { volatile_fill(self.at(r.offset), byte, r.len as usize) }
    }

    /// Copy `buf.len()` bytes at `offset` out of the mapping, with volatile
    /// loads. Touching a hole through a shared mapping allocates it: read
    /// only resident memory.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        self.check(ByteRange::new(offset, buf.len() as u64));
        // SAFETY: the source lies inside the live, readable mapping (checked
        // above), memory no Rust allocation owns, so it cannot overlap
        // `buf`, an exclusively borrowed Rust buffer.
        unsafe { volatile_read(self.at(offset), buf) }
    }

    /// Write `words` at `offset` (8-byte aligned) with volatile stores.
    pub fn write_u64s(&self, offset: u64, words: &[u64]) {
        assert!(offset.is_multiple_of(8), "unaligned offset {offset:#x}");
        self.check(ByteRange::new(offset, words.len() as u64 * 8));
        let dst = self.at(offset).cast::<u64>();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: `dst + i` is an 8-byte-aligned word inside the live,
            // writable mapping (offset aligned and the range checked above;
            // the mapping starts page-aligned), memory no Rust allocation
            // owns and no reference points into.
            unsafe { std::ptr::write_volatile(dst.add(i), *w) };
        }
    }

    /// Write `bytes` at `offset` with volatile stores.
    pub fn write_bytes(&self, offset: u64, bytes: &[u8]) {
        self.check(ByteRange::new(offset, bytes.len() as u64));
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: inside the live, writable mapping (checked above).
            unsafe { std::ptr::write_volatile(self.at(offset + i as u64), *b) };
        }
    }

    /// Fault in every 4 KiB page of `r` through the mapping, for reading:
    /// one `madvise(MADV_POPULATE_READ)` (Linux 5.14), or, where the kernel
    /// refuses it, one volatile byte read per page (guest_memfd clears a
    /// folio and marks it up to date at its first fault).
    pub fn touch(&self, r: ByteRange) {
        self.check(r);
        let start = self.at(r.offset & !4095);
        let len = (r.end() - (r.offset & !4095)) as usize;
        // SAFETY: the range lies inside our own live mapping (checked above,
        // rounded down to its page); MADV_POPULATE_READ only faults pages in
        // for reading, as the reads below would, and never changes contents.
        let populated =
            unsafe { rustix::mm::madvise(start.cast(), len, Advice::LinuxPopulateRead) };
        if populated.is_ok() {
            return;
        }
        for off in (r.offset..r.end()).step_by(4096) {
            // SAFETY: `off` lies inside the live, readable mapping (checked
            // above); a volatile read of one byte of it needs no aliasing
            // guarantee and keeps the fault from being optimised away.
            unsafe { std::ptr::read_volatile(self.at(off)) };
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
    /// mapped or not). `r.offset` must be page aligned (`EINVAL`
    /// otherwise).
    pub fn resident_pages(&self, r: ByteRange) -> Result<u64, i32> {
        self.check(r);
        let pages = r.len.div_ceil(4096) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the address range is inside our live mapping (checked
        // above). mincore refuses an address that is not page aligned
        // (EINVAL, writing nothing); for an aligned one it writes one byte
        // per page of `len` rounded up to the page size, at most
        // `len.div_ceil(4096)` bytes since pages are at least 4 KiB: `vec`
        // holds that many.
        let ret =
            unsafe { libc::mincore(self.at(r.offset).cast(), r.len as usize, vec.as_mut_ptr()) };
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
        // exactly once, here. No Rust reference into it exists (every method
        // copies in or out), and no memslot points into it any more: a
        // memslot holds an `Arc<Mapping>` until it is deleted (see `Kvm`).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    hugepunch_probe::include_needs!();

    /// A fresh memfd of `len` bytes and a mapping of it.
    fn mapped(len: usize) -> (OwnedFd, Arc<Mapping>) {
        let fd = memfd("sys-test", len as u64, false).expect("memfd_create");
        // SAFETY: our own memfd of `len` bytes, never truncated.
        let map = unsafe { Mapping::new(&fd, len) }.expect("mmap");
        (fd, Arc::new(map))
    }

    /// The volatile fill and read against a plain byte-by-byte oracle, at
    /// every alignment of start and end around a word.
    #[test]
    fn volatile_fill_and_read_match_the_naive_oracle() {
        const LEN: usize = 4096;
        let (_fd, map) = mapped(LEN);
        assert_eq!(
            map.addr() % MAPPING_ALIGN,
            0,
            "mappings start 2 MiB aligned"
        );
        let mut oracle = vec![0u8; LEN];
        let mut step = 0u8;
        for offset in 0..24usize {
            for len in 0..40usize {
                step = step.wrapping_add(1).max(1);
                let at = 1000 + offset;
                map.fill(ByteRange::new(at as u64, len as u64), step);
                oracle[at..at + len].fill(step);
                let mut whole = vec![0u8; LEN];
                map.read(0, &mut whole);
                assert_eq!(whole, oracle, "fill of {len} bytes at {at}");
                let mut part = vec![0u8; len + 3];
                map.read((at - 1) as u64, &mut part);
                assert_eq!(part[..], oracle[at - 1..at + len + 2], "read at {at}");
            }
        }
        map.zero(ByteRange::new(0, LEN as u64));
        let mut whole = vec![1u8; LEN];
        map.read(0, &mut whole);
        assert!(whole.iter().all(|&b| b == 0));
    }

    #[test]
    #[should_panic(expected = "outside the mapping")]
    fn access_past_the_end_panics() {
        let (_fd, map) = mapped(4096);
        map.fill(ByteRange::new(4090, 7), 1);
    }

    /// What is written through the mapping is what the file holds (pread),
    /// and the other way round.
    #[test]
    fn the_mapping_and_the_file_agree() {
        let (fd, map) = mapped(8192);
        map.fill(ByteRange::new(4093, 6), 0x5a);
        let mut buf = [0u8; 8];
        pread_exact(&fd, &mut buf, 4092).unwrap();
        assert_eq!(buf, [0, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0]);
        punch_hole(&fd, 4096, 4096).unwrap();
        let mut back = [0xffu8; 8];
        map.read(4092, &mut back);
        assert_eq!(
            back,
            [0, 0x5a, 0x5a, 0x5a, 0, 0, 0, 0],
            "a hole reads as zeros"
        );
    }

    needs! { guest_memfd;
        /// The memslot keeps its mapping alive, a second bind is refused, and
        /// unbinding really deletes the slot (the kernel accepts the same range
        /// again; it refuses two memslots over one guest_memfd range).
        #[test]
        fn a_memslot_holds_its_mapping_until_deleted() {
            let mut kvm = Kvm::open().expect("a VM with guest_memfd");
            let want = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
            assert_eq!(kvm.guest_memfd_flags & want, want, "mmap()able guest_memfd");
            let size = 2 << 20;
            let fd = kvm.guest_memfd(size, want).unwrap();
            // SAFETY: our own guest_memfd of `size` bytes, created
            // `MMAP | INIT_SHARED` (a guest_memfd cannot be truncated).
            let map = Arc::new(unsafe { Mapping::new(&fd, size as usize) }.unwrap());
            kvm.bind_memslot(&fd, &map).expect("a memslot2 over the guest_memfd");
            assert!(kvm.memslot_bound());
            assert_eq!(Arc::strong_count(&map), 2, "the memslot holds the mapping");
            assert_eq!(kvm.bind_memslot(&fd, &map).unwrap_err().errno, libc::EEXIST);
            kvm.unbind_memslot().unwrap();
            assert_eq!(
                Arc::strong_count(&map),
                1,
                "deleted: the mapping is released"
            );
            kvm.bind_memslot(&fd, &map)
                .expect("the deleted slot's range binds again");
            drop(kvm);
            assert_eq!(
                Arc::strong_count(&map),
                1,
                "dropping the VM deleted the slot"
            );
        }
    }
}

/// `f_type` of a hugetlbfs mount (`statfs`).
pub const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// `f_type` of a tmpfs mount (`statfs`).
pub const TMPFS_MAGIC: u64 = 0x0102_1994;

/// What `fstatfs` and `fstat` say about the filesystem a file lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsOf {
    /// `f_type`: [`HUGETLBFS_MAGIC`], [`TMPFS_MAGIC`], or another.
    pub magic: u64,
    /// `f_bsize`: hugetlbfs reports its huge page size here.
    pub block_size: u64,
    /// `major:minor` of `st_dev`, as /proc/self/mountinfo's third field
    /// names the mount's superblock.
    pub dev: (u32, u32),
}

/// `fstatfs` and `fstat` of `fd`.
pub fn fs_of(fd: &OwnedFd) -> Result<FsOf, i32> {
    let fs = rustix::fs::fstatfs(fd).map_err(errno)?;
    let st = rustix::fs::fstat(fd).map_err(errno)?;
    Ok(FsOf {
        // The kernel's f_type is a signed word; the magic numbers are
        // 32-bit values, so keep the low 32 bits.
        magic: fs.f_type as u64 & 0xffff_ffff,
        block_size: fs.f_bsize as u64,
        dev: (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)),
    })
}

/// A step of making a file that failed, and its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepError {
    /// The system call, as a user would look it up.
    pub step: &'static str,
    /// The errno.
    pub errno: i32,
}

fn step(step: &'static str) -> impl Fn(Errno) -> StepError {
    move |e| StepError {
        step,
        errno: errno(e),
    }
}

/// An unnamed file of `size` bytes in directory `dir`, as QEMU's
/// `memory-backend-file,mem-path=DIR` makes one: `O_TMPFILE` where the
/// filesystem supports it, else a fresh name (`O_CREAT | O_EXCL`) unlinked
/// at once, so that no name is left behind on any exit path after this
/// call returns. Sized with `ftruncate` (hugetlbfs needs a multiple of its
/// page size).
pub fn file_in(dir: &std::path::Path, size: u64) -> Result<OwnedFd, StepError> {
    use rustix::fs::{Mode, OFlags};
    let rw = OFlags::RDWR | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(dir, rw | OFlags::TMPFILE, Mode::from_bits_truncate(0o600)) {
        Ok(fd) => fd,
        // Filesystems without O_TMPFILE answer EOPNOTSUPP (or EISDIR on
        // kernels that predate it).
        Err(Errno::OPNOTSUPP | Errno::ISDIR) => {
            let mut attempt = 0u32;
            loop {
                let name = dir.join(format!(
                    ".hugepunch-{}-{}-{attempt}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos())
                ));
                match rustix::fs::open(
                    &name,
                    rw | OFlags::CREATE | OFlags::EXCL,
                    Mode::from_bits_truncate(0o600),
                ) {
                    Ok(fd) => {
                        rustix::fs::unlink(&name).map_err(step("unlink"))?;
                        break fd;
                    }
                    Err(Errno::EXIST) if attempt < 16 => attempt += 1,
                    Err(e) => return Err(step("open (O_CREAT | O_EXCL)")(e)),
                }
            }
        }
        Err(e) => return Err(step("open (O_TMPFILE)")(e)),
    };
    rustix::fs::ftruncate(&fd, size).map_err(step("ftruncate"))?;
    Ok(fd)
}

/// An unnamed file of `size` bytes on a tmpfs of its own, mounted with
/// `huge=always` and never attached anywhere: the new mount API makes the
/// mount (`fsopen("tmpfs")`, `fsconfig` `huge=always` and `size=`,
/// `fsmount`) as a detached mount object, the file is made in it with
/// `O_TMPFILE`, and the mount's descriptor is closed before this returns.
/// No mount point or name exists in any mount namespace at any moment, so
/// nothing can be left behind on any exit path, SIGKILL included; the
/// file's descriptor keeps the tmpfs alive, and closing it frees both.
/// Needs `CAP_SYS_ADMIN` (root); system settings are not touched.
pub fn thp_tmpfs_file(size: u64) -> Result<OwnedFd, StepError> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
        MountAttrFlags,
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(step("fsopen(\"tmpfs\")"))?;
    fsconfig_set_string(&fs, "huge", "always").map_err(step("fsconfig huge=always"))?;
    // Room for the file and nothing else: a runaway writer hits ENOSPC,
    // not the machine's memory.
    fsconfig_set_string(&fs, "size", size.to_string().as_str()).map_err(step("fsconfig size="))?;
    fsconfig_create(&fs).map_err(step("fsconfig create"))?;
    let mnt = fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )
    .map_err(step("fsmount"))?;
    let fd = rustix::fs::openat(
        &mnt,
        ".",
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::TMPFILE,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(step("openat (O_TMPFILE) in the new tmpfs"))?;
    rustix::fs::ftruncate(&fd, size).map_err(step("ftruncate"))?;
    Ok(fd)
}
