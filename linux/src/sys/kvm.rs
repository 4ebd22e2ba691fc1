//! KVM: the VM and its capabilities, guest_memfd, memslots, vCPUs and
//! their ioctls (through kvm-ioctls), and KVM's binary statistics.
//!
//! # The memslot holds its mapping
//!
//! A memslot is a pointer the kernel caches into our mapping
//! (`userspace_addr`). [`Kvm::bind_memslot`] therefore keeps an `Arc` of
//! the [`Mapping`] for as long as the memslot exists, and dropping the
//! [`Kvm`] deletes the memslot before it lets the mapping go (STYLE.md
//! rule 14): whatever the drop order of its owners, the mapping is never
//! unmapped under a live memslot.

use super::fd::{pread_exact, SizedFile};
use super::mapping::Mapping;
use kvm_bindings::{kvm_regs, kvm_sregs};
use rustix::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
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

    /// A guest_memfd of `size` bytes created `MMAP | INIT_SHARED`: the VMM
    /// may map it and fault any page of it in, so [`Mapping::of`] maps it.
    pub fn shared_guest_memfd(&self, size: u64) -> Result<SizedFile, KvmError> {
        let fd = self.guest_memfd(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)?;
        // A guest_memfd cannot be resized (the kernel refuses `ftruncate`).
        Ok(SizedFile::fixed(fd, size))
    }

    /// `KVM_CREATE_VCPU` number `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, KvmError> {
        let fd = self.vm.create_vcpu(id).map_err(|e| KvmError {
            step: "KVM_CREATE_VCPU",
            errno: e.errno(),
        })?;
        Ok(Vcpu { fd })
    }

    /// Bind `fd` (a guest_memfd of `map.len()` bytes, mapped by `map`) to
    /// memslot 0 at guest physical address 0 with
    /// `KVM_SET_USER_MEMORY_REGION2`. The memslot keeps `map` alive until it
    /// is deleted (when this `Kvm` is dropped). Fails with `EEXIST` if a
    /// memslot is already bound.
    pub fn bind_memslot(&mut self, fd: &SizedFile, map: &Arc<Mapping>) -> Result<(), KvmError> {
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
            guest_memfd: fd.as_fd().as_raw_fd() as u32,
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

/// A vCPU of a VM ([`Kvm::create_vcpu`]), with the ioctls a VMM runs it by
/// (kvm-ioctls' `VcpuFd`).
pub struct Vcpu {
    fd: kvm_ioctls::VcpuFd,
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The guest wrote to guest physical address `addr`, which no memslot
    /// backs; `data` is what it wrote (at most 8 bytes), little-endian.
    MmioWrite {
        /// The address written.
        addr: u64,
        /// The bytes written, as a little-endian number.
        data: u64,
    },
    /// Any other exit, for humans.
    Other(String),
}

fn vcpu_err(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError {
        step,
        errno: e.errno(),
    }
}

impl Vcpu {
    /// `KVM_SET_CPUID2`.
    pub fn set_cpuid(&self, cpuid: &kvm_bindings::CpuId) -> Result<(), KvmError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(vcpu_err("KVM_SET_CPUID2"))
    }

    /// `KVM_GET_SREGS`.
    pub fn sregs(&self) -> Result<kvm_sregs, KvmError> {
        self.fd.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))
    }

    /// `KVM_SET_SREGS`.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), KvmError> {
        self.fd.set_sregs(sregs).map_err(vcpu_err("KVM_SET_SREGS"))
    }

    /// `KVM_GET_REGS`.
    pub fn regs(&self) -> Result<kvm_regs, KvmError> {
        self.fd.get_regs().map_err(vcpu_err("KVM_GET_REGS"))
    }

    /// `KVM_SET_REGS`.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), KvmError> {
        self.fd.set_regs(regs).map_err(vcpu_err("KVM_SET_REGS"))
    }

    /// `KVM_RUN` until the guest exits to the VMM.
    pub fn run(&mut self) -> Result<VcpuExit, KvmError> {
        match self.fd.run().map_err(vcpu_err("KVM_RUN"))? {
            kvm_ioctls::VcpuExit::MmioWrite(addr, bytes) => {
                let mut word = [0u8; 8];
                let n = bytes.len().min(8);
                word[..n].copy_from_slice(&bytes[..n]);
                Ok(VcpuExit::MmioWrite {
                    addr,
                    data: u64::from_le_bytes(word),
                })
            }
            other => Ok(VcpuExit::Other(format!("{other:?}"))),
        }
    }

    /// The vCPU's binary statistics ([`KvmStats`]).
    pub fn stats(&self) -> Result<KvmStats, i32> {
        KvmStats::open(&self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    hugepunch_probe::include_needs!();

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
            let fd = kvm.shared_guest_memfd(size).unwrap();
            let map = Arc::new(Mapping::of(&fd).unwrap());
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
