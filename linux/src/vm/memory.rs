//! The guest's memory: which backend, and the memslot over it.
//!
//! On guest_memfd the memslot is the guest_memfd's own
//! (`KVM_SET_USER_MEMORY_REGION2`, made by [`LinuxHost::guest_memfd`]).
//! On every other backend — a file of a private `huge=always` tmpfs (THP),
//! a memfd, a file in a directory the user names — the memslot is an
//! ordinary one (`KVM_SET_USER_MEMORY_REGION`) over the VMM's shared
//! mapping of the file, as QEMU (`memory-backend-memfd`,
//! `memory-backend-file,share=on`), Cloud Hypervisor and Firecracker back
//! ordinary guests; a `fallocate(PUNCH_HOLE)` of the file then reaches the
//! guest through the mapping's MMU notifier, which zaps KVM's mapping of
//! the range and asks for a remote TLB flush.
//!
//! For THP the memory must really come in huge pages all the way to the
//! guest: the file is allocated with one `fallocate` (so every 2 MiB is a
//! huge folio before anything touches it), the VMM's mapping is 2 MiB
//! aligned ([`sys::Mapping::new`]), so the VMM maps each huge folio with
//! one PMD, and KVM then maps the guest's 2 MiB pages with 2 MiB entries
//! (its statistics `pages_2m` / `pages_4k`, [`KvmMappings`]).

use super::VmError;
use crate::host::{guest_memfd_unavailable, Backend, LinuxHost};
use crate::sys;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The backend `hugepunch vm` runs on when none is asked for, and why:
/// guest_memfd where KVM offers it mmap()able, else THP where this process
/// may mount a private `huge=always` tmpfs, else memfd.
pub fn default_backend() -> (Backend, String) {
    let no_gmem = match guest_memfd_unavailable() {
        None => {
            return (
                Backend::GuestMemfd,
                "KVM offers mmap()able guest_memfd (GUEST_MEMFD_FLAG_MMAP | INIT_SHARED)".into(),
            )
        }
        Some(why) => why,
    };
    match LinuxHost::thp(crate::host::HUGE_PAGE_SIZE) {
        Ok(_) => (
            Backend::Thp,
            format!(
                "no mmap()able guest_memfd here ({no_gmem}); this process may mount a private \
                 huge=always tmpfs, so the guest runs on transparent huge pages through an \
                 ordinary memslot, as QEMU backs a guest with a file"
            ),
        ),
        Err(e) => (
            Backend::Memfd,
            format!("no mmap()able guest_memfd here ({no_gmem}), and no THP backend ({e})"),
        ),
    }
}

/// The guest's memory and the VM it is bound to.
pub(super) struct GuestMemory {
    /// The VM, where it is not the guest_memfd's own (dropped first: it
    /// deletes its memslots, which hold their mappings until then).
    own_vm: Option<sys::Kvm>,
    /// The file and the engine's host over it.
    pub host: Arc<LinuxHost>,
}

impl GuestMemory {
    /// Guest memory of `size` bytes on `backend`, allocated whole (not
    /// touched: the guest faults it in), bound to memslot 0 at guest
    /// physical address 0 of a fresh type-0 VM.
    pub fn new(backend: &Backend, size: u64) -> Result<Self, VmError> {
        let syscall = |step, errno| VmError::Syscall { step, errno };
        let (host, own_vm) = if *backend == Backend::GuestMemfd {
            let host = LinuxHost::guest_memfd(size)?;
            if !host.info().memslot {
                return Err(VmError::Options(
                    "the kernel refused to bind the guest_memfd to a memslot".into(),
                ));
            }
            (host, None)
        } else {
            let host = LinuxHost::open(backend, size)?;
            let vm = sys::Kvm::create_vm().map_err(|e| syscall(e.step, e.errno))?;
            (host, Some(vm))
        };
        host.set_all(hugepunch::Attribute::Shared);
        // Allocated, not mapped by the VMM: the guest's setup fill faults
        // every page in through KVM, as a guest's first touch does. On THP
        // the fallocate makes every 2 MiB a huge folio first.
        host.allocate_all()
            .map_err(|e| syscall("fallocate (allocate guest memory)", e.errno))?;
        if let Some(vm) = &own_vm {
            vm.add_memslot(0, 0, host.mapping()).map_err(|e| {
                syscall("KVM_SET_USER_MEMORY_REGION (guest memory, slot 0)", e.errno)
            })?;
        }
        Ok(GuestMemory {
            host: Arc::new(host),
            own_vm,
        })
    }

    /// The VM.
    pub fn kvm(&self) -> &sys::Kvm {
        match &self.own_vm {
            Some(vm) => vm,
            None => self.host.kvm().expect("a guest_memfd host has its VM"),
        }
    }
}

/// What KVM maps of the guest's memory, by page size: the VM statistics
/// `pages_4k`, `pages_2m`, `pages_1g` (x86, instant values). `None` where
/// this KVM exposes none of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KvmMappings {
    /// 4 KiB entries.
    pub pages_4k: u64,
    /// 2 MiB entries.
    pub pages_2m: u64,
    /// 1 GiB entries.
    pub pages_1g: u64,
}

impl KvmMappings {
    /// From one reading of the VM's statistics; `None` where it has no
    /// `pages_4k` and no `pages_2m`.
    pub fn from_stats(vm: &BTreeMap<String, u64>) -> Option<Self> {
        let get = |k: &str| vm.get(k).copied();
        if get("pages_4k").is_none() && get("pages_2m").is_none() {
            return None;
        }
        Some(KvmMappings {
            pages_4k: get("pages_4k").unwrap_or(0),
            pages_2m: get("pages_2m").unwrap_or(0),
            pages_1g: get("pages_1g").unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_mappings_are_read_where_this_kvm_exposes_them() {
        let stats: BTreeMap<String, u64> =
            [("pages_4k", 6), ("pages_2m", 2), ("remote_tlb_flush", 1)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(
            KvmMappings::from_stats(&stats),
            Some(KvmMappings {
                pages_4k: 6,
                pages_2m: 2,
                pages_1g: 0
            })
        );
        assert_eq!(KvmMappings::from_stats(&BTreeMap::new()), None);
    }
}
