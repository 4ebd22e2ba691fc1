//! A real guest: vCPUs running guest code on a memslot of guest_memfd or
//! of ordinary guest memory (THP, memfd, a file), giving memory back the
//! way a balloon or a confidential guest does, while the VMM releases it —
//! directly, 4 KiB per give-back as QEMU's `ram_block_discard_range` /
//! `ram_block_discard_guest_memfd_range` and Cloud Hypervisor's
//! `punch_holes_in_guest_memfd` do today, or through hugepunch.
//! `hugepunch vm` runs it.
//!
//! # The VM
//!
//! One type-0 VM per side. Guest memory ([`VmOptions::backend`],
//! [`default_backend`]) is bound to memslot 0 at guest physical address 0:
//! a guest_memfd created `MMAP | INIT_SHARED` through
//! `KVM_SET_USER_MEMORY_REGION2` (by [`LinuxHost`](crate::LinuxHost)), or any other backend's
//! file through `KVM_SET_USER_MEMORY_REGION` over the VMM's shared, 2 MiB
//! aligned mapping of it, as QEMU backs an ordinary guest (`memory` below).
//! Either way it is allocated whole before the guest starts, and the guest
//! faults it in.
//! The guest's code, page tables and scripts live in a second, ordinary
//! memslot at [`SYSTEM_GPA`], so that punching guest memory never touches
//! them. Page tables identity-map both with 2 MiB pages, user-accessible.
//!
//! Each vCPU, on its own thread, starts directly in 64-bit mode at **CPL3**
//! (its segment registers are loaded with DPL 3 through `KVM_SET_SREGS`).
//! It exits to the VMM by writing to a page its page tables map but no
//! memslot backs (an MMIO exit). Port I/O with `RFLAGS.IOPL` 3 was tried
//! first: on this nested host the IOPL bits read back 0 by the time the
//! guest's first `out` ran, and the `out` faulted. On this
//! kind of machine KVM runs nested with shadow paging, where guest code at
//! CPL0 is emulated and creates no shadow page table entries; code at CPL3
//! runs natively and does — so the guest's memory loop is at CPL3, and
//! releasing memory costs what it costs a real guest.
//!
//! # The guest
//!
//! [`GUEST_CODE`] (130 bytes, its source in `guest.S` beside this file)
//! interprets a script of 16-byte entries the VMM writes: *fill* a page
//! (write every 8-byte word with its own address XOR a key), *give back* a
//! page (an exit with its frame number: the VMM releases it), *take back* a
//! page (an exit: the VMM populates it, as a balloon deflate does; the guest
//! then checks it reads zeros — another exit if not — and fills it again),
//! *filled* (the setup fill is over, the clock starts), and *done*. A guest touches a given-back page only after
//! taking it back. The script is the adversarial pattern's punches in its
//! order ([`Pattern`]), pages dealt to the vCPUs round-robin by page number
//! (two vCPUs give back neighbouring pages of the same huge pages), the
//! guest writing one still-owned page after every eighth give-back (it keeps
//! running on the rest); once every vCPU is done giving back, each takes
//! back the last sixteenth of the pages it gave, most recent first, as a
//! balloon deflates.
//!
//! # What invalidation means here
//!
//! No userspace call removes KVM's mapping of a guest_memfd page short of
//! freeing it: this kernel has no private memory for a type-0 VM
//! (`KVM_CAP_MEMORY_ATTRIBUTES` is 0), and the kernel zaps the guest's
//! mapping inside `fallocate(PUNCH_HOLE)` itself. Every page is therefore
//! shared, the VMM answers `is_shared` with `true` for given-back pages
//! (docs/CONTRACT.md §3.3: the deferral of shared memory is allowed), and a deferred
//! give-back stays mapped to the guest until its huge page is freed whole —
//! the guest's promise not to touch it is what makes that safe, as for a
//! balloon. Direct punching zaps (and flushes the TLB of every vCPU) at each
//! 4 KiB give-back; the engine once per 2 MiB.

mod guest;
mod memory;
mod side;
mod vcpu;

pub use guest::{GUEST_CODE, MAX_SIZE, SYSTEM_GPA};
pub use memory::{default_backend, KvmMappings};

use crate::host::{Backend, SetupError};
use crate::huge_counters::KernelHuge;
use crate::sys;
use guest::{scripts, HUGE};
use hugepunch_workload::Pattern;
use serde::Serialize;
use std::collections::BTreeMap;

/// Why a guest run failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The guest_memfd host could not be built.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A KVM or memory step failed.
    #[error("{step} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Syscall {
        /// What was being done.
        step: &'static str,
        /// The errno.
        errno: i32,
    },
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// A vCPU stopped in a way the guest never asks for.
    #[error("vCPU {vcpu}: unexpected exit {exit} (rip {rip:#x})")]
    Exit {
        /// The vCPU.
        vcpu: usize,
        /// The exit, for humans.
        exit: String,
        /// The guest's instruction pointer.
        rip: u64,
    },
    /// The engine refused an operation.
    #[error("engine: {0}")]
    Engine(#[from] hugepunch::Error),
    /// A check failed: data lost, a taken-back page not zero, memory freed
    /// under the guest, or the accounting off.
    #[error("{strategy}: {what}")]
    Check {
        /// `direct` or `hugepunch`.
        strategy: &'static str,
        /// What went wrong.
        what: String,
    },
}

impl From<sys::KvmError> for VmError {
    fn from(e: sys::KvmError) -> Self {
        VmError::Syscall {
            step: e.step,
            errno: e.errno,
        }
    }
}

/// What a guest run runs.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// What the guest's memory is ([`default_backend`] chooses one).
    pub backend: Backend,
    /// Guest memory: a positive multiple of 2 MiB, at most [`MAX_SIZE`].
    pub size: u64,
    /// vCPUs, 1 to 8, each on its own thread.
    pub vcpus: usize,
    /// The order of the give-backs.
    pub pattern: Pattern,
    /// Its seed.
    pub seed: u64,
}

/// Progress of a side: give-backs and take-backs handled so far, of all.
pub type Progress<'a> = &'a (dyn Fn(&'static str, u64, u64) + Sync);

/// What the guest's memory held at the end, page by page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GuestData {
    /// Pages the guest never gave back, or took back and wrote again: each
    /// read back as the guest wrote it.
    pub kept_pages: u64,
    /// Pages given back and not taken back (not read).
    pub given_back_pages: u64,
    /// Taken-back pages the guest found zeroed (it checks each).
    pub taken_back_zeroed: u64,
}

/// One side of a guest run.
#[derive(Debug, Clone, Serialize)]
pub struct VmSide {
    /// `direct` or `hugepunch`.
    pub strategy: &'static str,
    /// From the end of the guest's setup fill to its last exit (the slowest
    /// vCPU), seconds.
    pub wall_seconds: f64,
    /// Time the vCPUs spent inside `KVM_RUN` over that span (the guest
    /// running, and KVM's own exit work), summed over vCPUs, seconds.
    pub guest_seconds: f64,
    /// Guest time between two give-backs, on average, microseconds.
    pub guest_us_per_give_back: f64,
    /// Host time releasing memory: inside `fallocate` punches and the
    /// engine's `punch` (summed over vCPU threads), seconds.
    pub release_seconds: f64,
    /// Of which inside `fallocate`, seconds.
    pub fallocate_seconds: f64,
    /// Host time taking memory back (`fallocate` allocation, or the
    /// engine's `populate`), seconds.
    pub take_back_seconds: f64,
    /// Pages given back.
    pub give_backs: u64,
    /// Pages taken back.
    pub take_backs: u64,
    /// Exits the VMM handled (every MMIO write of the guest).
    pub vmm_exits: u64,
    /// `fallocate` calls (punches and allocations).
    pub fallocate_calls: u64,
    /// Of which punches.
    pub punch_calls: u64,
    /// Bytes released: guest memory (all resident after the guest's setup
    /// fill) minus what is resident at the end (`mincore` over the mapping).
    pub bytes_released: u64,
    /// Bytes given back and still held, deferred (the engine's pending).
    pub pending_bytes: u64,
    /// Bytes the file holds beyond the pages the guest uses at the end: the
    /// engine's pending bytes, and what the kernel allocated around a
    /// take-back (a huge=always tmpfs backs a 4 KiB allocation in a 2 MiB
    /// hole with a whole huge page).
    pub held_unused_bytes: u64,
    /// KVM's own counters over the run, from the end of the guest's setup
    /// fill (binary statistics): the VM's and every vCPU's, summed, only
    /// those that moved.
    pub kvm: BTreeMap<String, u64>,
    /// What KVM mapped of guest memory, by page size, once the guest had
    /// faulted it all in (`None`: this KVM exposes no `pages_4k` /
    /// `pages_2m` statistic).
    pub kvm_mappings_at_start: Option<KvmMappings>,
    /// The same at the end of the run.
    pub kvm_mappings_at_end: Option<KvmMappings>,
    /// What the kernel counted about the guest's huge pages (THP and
    /// hugetlb backings; `None` for 4 KiB memory): whole once the guest
    /// had faulted them in, whole at the end, split, freed whole. System
    /// wide counters: the run's own while nothing else on the machine
    /// makes or splits huge pages of the kind.
    pub kernel: Option<KernelHuge>,
    /// The guest memory's huge page backing, for humans.
    pub huge_backing: String,
    /// The data check.
    pub data: GuestData,
}

/// Both sides of one guest run.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    /// `uname -r`.
    pub kernel: String,
    /// CPUs online.
    pub cpus: usize,
    /// Guest memory, bytes.
    pub size: u64,
    /// What backs it (`guest-memfd`, `thp`, `memfd`, `file:DIR`).
    pub backend: Backend,
    /// Its huge page backing, for humans.
    pub huge_backing: String,
    /// The memslot: `KVM_SET_USER_MEMORY_REGION2` (guest_memfd) or
    /// `KVM_SET_USER_MEMORY_REGION` over the VMM's mapping.
    pub memslot: &'static str,
    /// vCPUs.
    pub vcpus: usize,
    /// The pattern.
    pub pattern: String,
    /// Its seed.
    pub seed: u64,
    /// The privilege level of the guest's memory loop (3).
    pub guest_cpl: u8,
    /// What invalidation means on this backend, for humans.
    pub invalidation: &'static str,
    /// Why the kernel's and KVM's huge page figures are what they are here
    /// (set where one of them is missing), for humans.
    pub huge_figures_note: Option<String>,
    /// Give-backs punched directly, 4 KiB each.
    pub direct: VmSide,
    /// Give-backs through the engine.
    pub engine: VmSide,
    /// Direct over engine: host time releasing memory.
    pub release_time_ratio: Option<f64>,
}

/// What [`VmReport::invalidation`] says for an ordinary memslot.
pub const INVALIDATION_MEMSLOT: &str = "an ordinary memslot over the VMM's shared mapping of the \
file: every page is shared; fallocate(PUNCH_HOLE) unmaps the range from the VMM's mapping, whose \
MMU notifier zaps KVM's mapping of it and asks for a remote TLB flush. A deferred give-back stays \
mapped to the guest until its huge page is freed whole (the allowed deferral of shared memory, \
docs/CONTRACT.md §3.3); the guest does not touch it until it takes it back.";

/// What [`VmReport::invalidation`] says for guest_memfd.
pub const INVALIDATION: &str = "guest_memfd of a type-0 VM: every page is shared \
(KVM_CAP_MEMORY_ATTRIBUTES is 0) and no userspace call unmaps a page from the guest short of \
freeing it; the kernel zaps the guest's mapping inside fallocate(PUNCH_HOLE). A deferred \
give-back stays mapped to the guest until its huge page is freed whole (the allowed deferral of \
shared memory, docs/CONTRACT.md §3.3); the guest does not touch it until it takes it back.";

/// Run a real guest twice on fresh VMs: give-backs punched directly, then
/// through the engine. See the module documentation.
pub fn run(opts: &VmOptions, progress: Progress<'_>) -> Result<VmReport, VmError> {
    if opts.size == 0 || !opts.size.is_multiple_of(HUGE) || opts.size > MAX_SIZE {
        return Err(VmError::Options(format!(
            "guest memory size {:#x} must be a positive multiple of 2 MiB, at most 64 GiB",
            opts.size
        )));
    }
    if !(1..=8).contains(&opts.vcpus) {
        return Err(VmError::Options(format!("{} vCPUs: 1 to 8", opts.vcpus)));
    }
    let ops = crate::replay::ops(opts.pattern, opts.size, opts.seed)?;
    let scripts = scripts(opts, &ops);
    let direct = side::side(opts, &scripts, false, progress)?;
    let engine = side::side(opts, &scripts, true, progress)?;
    let gmem = opts.backend == Backend::GuestMemfd;
    let huge_backing = engine.huge_backing.clone();
    let mut notes = Vec::new();
    if engine.kvm_mappings_at_start.is_none() {
        notes.push("this KVM exposes no pages_4k / pages_2m statistic".to_string());
    }
    if engine.kernel.is_none() {
        notes.push(format!(
            "no kernel huge page figures: the guest's memory has no huge pages ({huge_backing})"
        ));
    }
    Ok(VmReport {
        kernel: crate::real::kernel_release(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        size: opts.size,
        backend: opts.backend.clone(),
        huge_backing,
        memslot: if gmem {
            "KVM_SET_USER_MEMORY_REGION2 (guest_memfd)"
        } else {
            "KVM_SET_USER_MEMORY_REGION over the VMM's shared mapping (2 MiB aligned)"
        },
        huge_figures_note: (!notes.is_empty()).then(|| notes.join("; ")),
        vcpus: opts.vcpus,
        pattern: opts.pattern.name().to_string(),
        seed: opts.seed,
        guest_cpl: 3,
        invalidation: if gmem {
            INVALIDATION
        } else {
            INVALIDATION_MEMSLOT
        },
        release_time_ratio: (engine.release_seconds > 0.0)
            .then(|| direct.release_seconds / engine.release_seconds),
        direct,
        engine,
    })
}
