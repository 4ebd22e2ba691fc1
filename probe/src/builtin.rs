//! The built-in probes, each trying the real thing: every system call of
//! the crate and every `unsafe` block of it.

use super::Probe;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};
use std::ffi::c_void;

/// The built-in probes.
pub const PROBES: &[Probe] = &[
    Probe {
        name: "kvm_guest",
        needs: "a KVM that runs a guest (/dev/kvm, a type-0 VM, an ordinary memslot over a \
                shared mapping, a vCPU at CPL3 in 64-bit mode that runs to its first MMIO exit)",
        check: kvm_guest,
    },
    Probe {
        name: "guest_memfd",
        needs: "KVM guest_memfd that can be mapped (KVM_CREATE_GUEST_MEMFD with \
                GUEST_MEMFD_FLAG_MMAP | INIT_SHARED, mmap, write, punch, a memslot2 over it)",
        check: guest_memfd,
    },
    Probe {
        name: "mount",
        needs: "the right to mount (a private huge=always tmpfs: fsopen, fsmount, a file \
                allocated in it; root)",
        check: mount,
    },
    Probe {
        name: "hugetlb_pages",
        needs: "4 free reserved 2 MiB hugetlb pages and a private hugetlbfs mount \
                (nr_hugepages is a system setting: the tests never change it)",
        check: hugetlb_pages,
    },
    Probe {
        name: "hugetlbfs",
        needs: "a hugetlbfs the process may mount (fsopen(\"hugetlbfs\"), pagesize=2M)",
        check: hugetlbfs,
    },
    Probe {
        name: "binutils",
        needs: "binutils (`as` and `objcopy`) to assemble the guest's source",
        check: binutils,
    },
];

fn failed(step: &str) -> impl Fn(rustix::io::Errno) -> String + '_ {
    move |e| format!("{step} failed: {e} (errno {})", e.raw_os_error())
}

fn kvm_failed(step: &str) -> impl Fn(kvm_ioctls::Error) -> String + '_ {
    move |e| {
        format!(
            "{step} failed: {} (errno {})",
            std::io::Error::from_raw_os_error(e.errno()),
            e.errno()
        )
    }
}

/// A shared read-write mapping of `len` bytes of `fd`, unmapped on drop.
struct Map {
    ptr: *mut c_void,
    len: usize,
}

impl Map {
    fn new(fd: &OwnedFd, len: usize) -> Result<Self, String> {
        // SAFETY: a fresh mapping at an address the kernel chooses (null
        // hint, no MAP_FIXED): nothing existing is aliased or replaced. It
        // is owned by `Map` and unmapped once, in `drop`.
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
        .map_err(failed("mmap"))?;
        Ok(Map { ptr, len })
    }

    /// Write `words` at byte `offset` (8-byte aligned, inside the mapping).
    fn write(&self, offset: usize, words: &[u64]) {
        assert!(offset % 8 == 0 && offset + words.len() * 8 <= self.len);
        for (i, w) in words.iter().enumerate() {
            // SAFETY: inside the live mapping (asserted above), 8-byte
            // aligned (the mapping is page aligned); memory no Rust object
            // owns, written with volatile stores only.
            unsafe { std::ptr::write_volatile(self.ptr.cast::<u64>().add(offset / 8 + i), *w) };
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, unmapped once; no reference into
        // it exists, and every VM that pointed into it is closed first (the
        // probes drop their VMs before their mappings).
        let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
    }
}

fn memfd(len: u64) -> Result<OwnedFd, String> {
    let fd = rustix::fs::memfd_create("hugepunch-probe", MemfdFlags::CLOEXEC)
        .map_err(failed("memfd_create"))?;
    rustix::fs::ftruncate(&fd, len).map_err(failed("ftruncate"))?;
    Ok(fd)
}

/// The guest at CPL3 in 64-bit mode, as `hugepunch_linux::vm` runs it: 2
/// MiB of a memfd at guest physical 0 (an ordinary memslot over a shared
/// mapping), page tables mapping it and an unbacked page at 2 MiB, and one
/// instruction, `mov %eax, (%r14)`, that must exit as an MMIO write there.
fn kvm_guest() -> Result<(), String> {
    const MEM: u64 = 2 << 20;
    const MMIO: u64 = 2 << 20;
    let fd = memfd(MEM)?;
    let map = Map::new(&fd, MEM as usize)?;
    let kvm = kvm_ioctls::Kvm::new().map_err(kvm_failed("open /dev/kvm"))?;
    let vm = kvm
        .create_vm_with_type(0)
        .map_err(kvm_failed("KVM_CREATE_VM (type 0)"))?;
    // PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000: two 2 MiB user pages.
    map.write(0x1000, &[0x2000 | 7]);
    map.write(0x2000, &[0x3000 | 7]);
    map.write(0x3000, &[0x87, MMIO | 0x87]);
    // 0x4000: mov %eax,(%r14); jmp .
    map.write(
        0x4000,
        &[u64::from_le_bytes([0x41, 0x89, 0x06, 0xeb, 0xfe, 0, 0, 0])],
    );
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: map.ptr as u64,
    };
    // SAFETY: the region is exactly the live mapping `map`, which outlives
    // the VM (dropped at the end of this function, before `map`).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(kvm_failed("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_failed("KVM_CREATE_VCPU"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_failed("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_failed("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_failed("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x1b,
        type_: 11,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x23,
        type_: 3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        selector: 0x28,
        limit: 0x67,
        type_: 11,
        dpl: 0,
        s: 0,
        l: 0,
        g: 0,
        db: 0,
        ..code
    };
    sregs.cr3 = 0x1000;
    sregs.cr4 = 1 << 5;
    sregs.cr0 = 0x8005_0033;
    sregs.efer = 0x500;
    vcpu.set_sregs(&sregs)
        .map_err(kvm_failed("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: 0x4000,
        r14: MMIO,
        rax: 0x1234,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_failed("KVM_SET_REGS"))?;
    let exit = match vcpu.run() {
        Ok(kvm_ioctls::VcpuExit::MmioWrite(addr, _)) if addr == MMIO => Ok(()),
        Ok(other) => Err(format!(
            "KVM_RUN: the guest's first instruction ended in {other:?}, not an MMIO write"
        )),
        Err(e) => Err(kvm_failed("KVM_RUN")(e)),
    };
    drop(vcpu);
    drop(vm);
    drop(map);
    exit
}

/// `KVM_CAP_GUEST_MEMFD`, `KVM_CAP_GUEST_MEMFD_FLAGS` and the flags
/// `GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED` (Linux 6.18).
const CAP_GUEST_MEMFD: u32 = 234;
const CAP_GUEST_MEMFD_FLAGS: u32 = 244;
const MMAP_INIT_SHARED: u64 = 3;

fn guest_memfd() -> Result<(), String> {
    use rustix::fd::{AsRawFd, FromRawFd};
    const MEM: u64 = 2 << 20;
    let kvm = kvm_ioctls::Kvm::new().map_err(kvm_failed("open /dev/kvm"))?;
    let vm = kvm
        .create_vm_with_type(0)
        .map_err(kvm_failed("KVM_CREATE_VM (type 0)"))?;
    let cap = vm.check_extension_raw(CAP_GUEST_MEMFD as _);
    if cap <= 0 {
        return Err(format!("KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD) is {cap}"));
    }
    let flags = vm.check_extension_raw(CAP_GUEST_MEMFD_FLAGS as _).max(0) as u64;
    if flags & MMAP_INIT_SHARED != MMAP_INIT_SHARED {
        return Err(format!(
            "KVM_CAP_GUEST_MEMFD_FLAGS is {flags:#x}: MMAP | INIT_SHARED ({MMAP_INIT_SHARED:#x}) \
             not offered"
        ));
    }
    let raw = vm
        .create_guest_memfd(kvm_bindings::kvm_create_guest_memfd {
            size: MEM,
            flags: MMAP_INIT_SHARED,
            ..Default::default()
        })
        .map_err(kvm_failed("KVM_CREATE_GUEST_MEMFD"))?;
    // SAFETY: `raw` was just returned by a successful KVM_CREATE_GUEST_MEMFD:
    // an open descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let map = Map::new(&fd, MEM as usize)?;
    map.write(0, &[1]);
    rustix::fs::fallocate(
        &fd,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        0,
        4096,
    )
    .map_err(failed("fallocate(PUNCH_HOLE) of the guest_memfd"))?;
    let region = kvm_bindings::kvm_userspace_memory_region2 {
        slot: 0,
        flags: 1 << 2, // KVM_MEM_GUEST_MEMFD
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: map.ptr as u64,
        guest_memfd_offset: 0,
        guest_memfd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the region is exactly the live mapping `map` of this
    // guest_memfd, which outlives the VM (dropped below, before `map`).
    unsafe { vm.set_user_memory_region2(region) }
        .map_err(kvm_failed("KVM_SET_USER_MEMORY_REGION2"))?;
    drop(vm);
    drop(map);
    Ok(())
}

fn mount() -> Result<(), String> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
        MountAttrFlags,
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(failed("fsopen(\"tmpfs\")"))?;
    fsconfig_set_string(&fs, "huge", "always").map_err(failed("fsconfig huge=always"))?;
    fsconfig_set_string(&fs, "size", "4m").map_err(failed("fsconfig size="))?;
    fsconfig_create(&fs).map_err(failed("fsconfig create"))?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(failed("fsmount"))?;
    let fd = rustix::fs::openat(
        &mnt,
        ".",
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::TMPFILE,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(failed("openat (O_TMPFILE)"))?;
    rustix::fs::ftruncate(&fd, 2 << 20).map_err(failed("ftruncate"))?;
    rustix::fs::fallocate(&fd, FallocateFlags::KEEP_SIZE, 0, 2 << 20)
        .map_err(failed("fallocate"))?;
    Ok(())
}

fn hugetlbfs() -> Result<(), String> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, FsMountFlags, FsOpenFlags,
        MountAttrFlags,
    };
    let fs = fsopen("hugetlbfs", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(failed("fsopen(\"hugetlbfs\")"))?;
    fsconfig_set_string(&fs, "pagesize", "2M").map_err(failed("fsconfig pagesize=2M"))?;
    fsconfig_create(&fs).map_err(failed("fsconfig create"))?;
    fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
        .map_err(failed("fsmount"))?;
    Ok(())
}

fn hugetlb_pages() -> Result<(), String> {
    const NEEDED: u64 = 4;
    let path = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
    let free: u64 = std::fs::read_to_string(path)
        .map_err(|e| format!("{path}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))?;
    if free < NEEDED {
        return Err(format!(
            "{free} free 2 MiB hugetlb pages ({path}), {NEEDED} needed"
        ));
    }
    hugetlbfs()
}

fn binutils() -> Result<(), String> {
    for tool in ["as", "objcopy"] {
        match std::process::Command::new(tool).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(format!("`{tool} --version` failed: {}", out.status)),
            Err(e) => return Err(format!("no `{tool}`: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Every probe answers (yes or a reason) without panicking, here and
    /// now; the answer itself depends on the machine.
    #[test]
    fn every_probe_answers() {
        for p in super::PROBES {
            if let Err(why) = crate::run(p) {
                assert!(!why.is_empty(), "{}", p.name);
                assert_ne!(why, "the probe panicked", "{}", p.name);
            }
        }
    }
}
