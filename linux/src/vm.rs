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
//! `KVM_SET_USER_MEMORY_REGION2` (by [`LinuxHost`]), or any other backend's
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

mod memory;

pub use memory::{default_backend, KvmMappings};

use crate::host::{Backend, LinuxHost, SetupError};
use crate::kernel::{HugeCounters, KernelHuge, Samples};
use crate::pattern::engine_allocated_bytes;
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, KvmStats};
use hugepunch::{Attribute, ByteRange, Hint, Host, HostError, HugePunch, SUBPAGE_SIZE};
use hugepunch_workload::{Op, Pattern};
use kvm_bindings::{kvm_regs, kvm_segment};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The guest's code: a script interpreter (source: `vm/guest.S`, assembled
/// with `as --64` and `objcopy -O binary`; a test re-assembles it where
/// binutils are installed and compares).
pub const GUEST_CODE: [u8; 130] = [
    0x48, 0x8b, 0x06, 0x48, 0x8b, 0x5e, 0x08, 0x48, 0x83, 0xc6, 0x10, 0x48, 0x83, 0xf8, 0x01, 0x74,
    0x2a, 0x48, 0x83, 0xf8, 0x02, 0x74, 0x3f, 0x48, 0x83, 0xf8, 0x03, 0x74, 0x45, 0x48, 0x83, 0xf8,
    0x04, 0x74, 0x0c, 0x48, 0x83, 0xf8, 0x05, 0x75, 0x0c, 0x41, 0x89, 0x46, 0x28, 0xeb, 0xd1, 0x41,
    0x89, 0x46, 0x20, 0xeb, 0xcb, 0x41, 0x89, 0x46, 0x18, 0xeb, 0xfa, 0x48, 0x89, 0xdf, 0xb9, 0x00,
    0x02, 0x00, 0x00, 0x48, 0x89, 0xf8, 0x4c, 0x31, 0xf8, 0x48, 0x89, 0x07, 0x48, 0x83, 0xc7, 0x08,
    0xff, 0xc9, 0x75, 0xef, 0xeb, 0xaa, 0x48, 0x89, 0xd8, 0x48, 0xc1, 0xe8, 0x0c, 0x41, 0x89, 0x06,
    0xeb, 0x9e, 0x48, 0x89, 0xd8, 0x48, 0xc1, 0xe8, 0x0c, 0x41, 0x89, 0x46, 0x08, 0x48, 0x89, 0xdf,
    0xb9, 0x00, 0x02, 0x00, 0x00, 0x31, 0xc0, 0xf3, 0x48, 0xaf, 0x74, 0xbf, 0x41, 0x89, 0x46, 0x10,
    0xeb, 0xb9,
];

/// Guest physical address of the system memslot (code, page tables,
/// scripts): 256 GiB, above any guest memory size `hugepunch vm` takes.
pub const SYSTEM_GPA: u64 = 256 << 30;
/// Largest guest memory: what the guest page tables map (64 GiB).
pub const MAX_SIZE: u64 = 64 << 30;

/// The guest's exits: MMIO writes to `MMIO_GPA + 8 * n` (no memslot backs
/// that page, so each write exits to the VMM with its address and data).
const MMIO_GPA: u64 = SYSTEM_GPA + (768 << 20);
const EXIT_GIVE: u64 = 0;
const EXIT_TAKE: u64 = 1;
const EXIT_NOT_ZERO: u64 = 2;
const EXIT_DONE: u64 = 3;
const EXIT_FILLED: u64 = 4;
const EXIT_SYNC: u64 = 5;

const OP_FILL: u64 = 1;
const OP_GIVE: u64 = 2;
const OP_TAKE: u64 = 3;
const OP_FILLED: u64 = 4;
const OP_SYNC: u64 = 5;
const OP_DONE: u64 = 0;

// System memslot layout (offsets from SYSTEM_GPA).
const PML4: u64 = 0;
const PDPT: u64 = 0x1000;
const PD_SYSTEM: u64 = 0x2000;
const PD_GUEST: u64 = 0x3000;
const CODE: u64 = 0x10_0000;
const SCRIPTS: u64 = 0x20_0000;
const HUGE: u64 = 2 << 20;

/// The key the guest XORs into each word it writes (the VMM checks with it).
const KEY: u64 = 0x6875_6765_7075_6e63;
/// The guest writes one still-owned page after this many give-backs.
const TOUCH_EVERY: usize = 8;
/// The guest takes back one in this many of the pages it gave back.
const TAKE_BACK_EVERY: usize = 16;

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

fn kvm_err(step: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Syscall {
        step,
        errno: e.errno(),
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

/// The pages of each vCPU's script, in order, and the script's entries.
fn scripts(opts: &VmOptions, ops: &[Op]) -> Vec<Vec<(u64, u64)>> {
    let n = opts.vcpus as u64;
    let pages = opts.size / SUBPAGE_SIZE;
    let mut scripts: Vec<Vec<(u64, u64)>> = vec![Vec::new(); opts.vcpus];
    // Setup: every vCPU fills its own pages, then says so.
    for p in 0..pages {
        scripts[(p % n) as usize].push((OP_FILL, p * SUBPAGE_SIZE));
    }
    for s in &mut scripts {
        s.push((OP_FILLED, 0));
    }
    let mut given: Vec<Vec<u64>> = vec![Vec::new(); opts.vcpus];
    let mut out = vec![false; pages as usize];
    // The keep-running cursor of each vCPU, over its own pages.
    let mut cursor: Vec<u64> = (0..n).collect();
    for op in ops {
        let (offset, len, give) = match *op {
            Op::Punch { offset, len } => (offset, len, true),
            Op::Populate { offset, len } => (offset, len, false),
            _ => continue,
        };
        for p in offset / SUBPAGE_SIZE..(offset + len) / SUBPAGE_SIZE {
            let v = (p % n) as usize;
            if give && !out[p as usize] {
                out[p as usize] = true;
                scripts[v].push((OP_GIVE, p * SUBPAGE_SIZE));
                given[v].push(p);
                if given[v].len().is_multiple_of(TOUCH_EVERY) {
                    // Keep running on the rest: write the next page it
                    // still owns (if any).
                    for _ in 0..pages / n + 1 {
                        let c = cursor[v];
                        cursor[v] = if c + n < pages { c + n } else { v as u64 };
                        if !out[c as usize] {
                            scripts[v].push((OP_FILL, c * SUBPAGE_SIZE));
                            break;
                        }
                    }
                }
            } else if !give && out[p as usize] {
                out[p as usize] = false;
                scripts[v].push((OP_TAKE, p * SUBPAGE_SIZE));
            }
        }
    }
    // Once every vCPU has given its pages back, take some back, as a
    // balloon deflates: the most recently given back first, a sixteenth of
    // what each vCPU gave.
    for (v, pages) in given.iter().enumerate() {
        scripts[v].push((OP_SYNC, 0));
        let mut left = pages.len().div_ceil(TAKE_BACK_EVERY);
        for &p in pages.iter().rev() {
            if left == 0 {
                break;
            }
            if out[p as usize] {
                out[p as usize] = false;
                scripts[v].push((OP_TAKE, p * SUBPAGE_SIZE));
                left -= 1;
            }
        }
    }
    for s in &mut scripts {
        s.push((OP_DONE, 0));
    }
    scripts
}

/// Words to write at an offset of the system memslot.
type Writes = Vec<(u64, Vec<u64>)>;

/// The system memslot's size and contents (page tables, code, scripts), and
/// where each script starts (guest virtual = guest physical).
fn system_image(size: u64, scripts: &[Vec<(u64, u64)>]) -> (u64, Writes, Vec<u64>) {
    let script_bytes: u64 = scripts.iter().map(|s| s.len() as u64 * 16).sum();
    let sys_size = (SCRIPTS + script_bytes).div_ceil(HUGE) * HUGE;
    let gib = size.div_ceil(1 << 30);
    let mut writes: Vec<(u64, Vec<u64>)> = Vec::new();
    const TABLE: u64 = 0x7; // present, writable, user
    const LEAF: u64 = 0x87; // present, writable, user, 2 MiB page
    writes.push((PML4, vec![(SYSTEM_GPA + PDPT) | TABLE]));
    let mut pdpt = vec![0u64; 512];
    for g in 0..gib {
        pdpt[g as usize] = (SYSTEM_GPA + PD_GUEST + g * 0x1000) | TABLE;
        let pd: Vec<u64> = (0..512)
            .map(|i| {
                let addr = (g << 30) + i * HUGE;
                if addr < size {
                    addr | LEAF
                } else {
                    0
                }
            })
            .collect();
        writes.push((PD_GUEST + g * 0x1000, pd));
    }
    pdpt[(SYSTEM_GPA >> 30) as usize] = (SYSTEM_GPA + PD_SYSTEM) | TABLE;
    writes.push((PDPT, pdpt));
    let mut pd_system: Vec<u64> = (0..sys_size / HUGE)
        .map(|i| (SYSTEM_GPA + i * HUGE) | LEAF)
        .collect();
    // The exit page: mapped in the guest's page tables, backed by no
    // memslot.
    let mmio = ((MMIO_GPA - SYSTEM_GPA) / HUGE) as usize;
    pd_system.resize(mmio + 1, 0);
    pd_system[mmio] = MMIO_GPA | LEAF;
    writes.push((PD_SYSTEM, pd_system));
    let mut starts = Vec::new();
    let mut at = SCRIPTS;
    for s in scripts {
        starts.push(SYSTEM_GPA + at);
        writes.push((at, s.iter().flat_map(|&(op, arg)| [op, arg]).collect()));
        at += s.len() as u64 * 16;
    }
    (sys_size, writes, starts)
}

/// A vCPU ready to run at CPL3 in 64-bit mode at the guest code with its
/// script.
fn vcpu(kvm: &sys::Kvm, id: u64, script: u64) -> Result<kvm_ioctls::VcpuFd, VmError> {
    let vcpu = kvm.vm.create_vcpu(id).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let cpuid = kvm.supported_cpuid().map_err(|e| VmError::Syscall {
        step: e.step,
        errno: e.errno,
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x1b, // GDT index 3, RPL 3
        type_: 11,      // execute/read, accessed
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
        selector: 0x23, // GDT index 4, RPL 3
        type_: 3,       // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x28,
        type_: 11, // 64-bit TSS, busy
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cr3 = SYSTEM_GPA + PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
    sregs.efer = 0x500; // LME, LMA
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: SYSTEM_GPA + CODE,
        rsi: script,
        r15: KEY,
        r14: MMIO_GPA,
        rflags: 0x2, // reserved bit 1
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(vcpu)
}

/// The host the engine sees: the guest_memfd host, checking at every free
/// that the guest gave back every page of it.
struct Checked {
    inner: Arc<LinuxHost>,
    given_back: Arc<[AtomicU64]>,
    violations: AtomicU64,
}

fn bit(words: &[AtomicU64], page: u64) -> (&AtomicU64, u64) {
    (&words[(page / 64) as usize], 1 << (page % 64))
}

impl Host for Checked {
    fn is_shared(&self, range: ByteRange) -> bool {
        self.inner.is_shared(range)
    }
    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        self.inner.set_attributes(range, to);
    }
    fn invalidate_begin(&self, range: ByteRange, hint: Hint) {
        self.inner.invalidate_begin(range, hint);
    }
    fn invalidate_end(&self, range: ByteRange) {
        self.inner.invalidate_end(range);
    }
    fn allocate(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        self.inner.allocate(range, order)
    }
    fn free(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        for p in range.first_subpage()..range.first_subpage() + range.subpages() {
            let (w, b) = bit(&self.given_back, p);
            // ORDERING: Acquire pairs with the Release that marks a page
            // given back before it is punched.
            if w.load(Ordering::Acquire) & b == 0 {
                // ORDERING: Relaxed: a count read after the vCPU threads
                // are joined.
                self.violations.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.inner.free(range, order)
    }
    fn zero(&self, range: ByteRange) {
        self.inner.zero(range);
    }
}

/// Where the vCPUs wait for each other (between giving back and taking
/// back): a barrier that a failing vCPU opens for the others, so that one
/// vCPU's error ends the run instead of hanging the rest.
struct Gate {
    state: std::sync::Mutex<(usize, bool)>,
    changed: std::sync::Condvar,
    parties: usize,
}

impl Gate {
    fn new(parties: usize) -> Self {
        Gate {
            state: std::sync::Mutex::new((0, false)),
            changed: std::sync::Condvar::new(),
            parties,
        }
    }

    /// Wait for every party; `false` if one failed instead.
    fn wait(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += 1;
        self.changed.notify_all();
        while s.0 < self.parties && !s.1 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.1
    }

    /// Wait for every party, the last to arrive first running `last`
    /// (before any party goes on); `false` if one failed instead.
    fn wait_last(&self, last: impl FnOnce()) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += 1;
        if s.0 == self.parties && !s.1 {
            last();
        }
        self.changed.notify_all();
        while s.0 < self.parties && !s.1 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.1
    }

    /// A party failed: release every waiter, now and later.
    fn fail(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.changed.notify_all();
    }
}

/// What one vCPU thread did.
#[derive(Default)]
struct VcpuRun {
    started: Option<Instant>,
    finished: Option<Instant>,
    run_nanos: u64,
    release_nanos: u64,
    take_nanos: u64,
    gives: u64,
    takes: u64,
    exits: u64,
    not_zero: u64,
}

/// How a side releases and takes back memory.
enum Strategy<'a> {
    Direct(&'a LinuxHost),
    Engine(&'a HugePunch),
}

impl Strategy<'_> {
    fn name(&self) -> &'static str {
        match self {
            Strategy::Direct(_) => "direct",
            Strategy::Engine(_) => "hugepunch",
        }
    }
}

/// The readings taken when every vCPU has finished its setup fill, before
/// any gives memory back.
struct Start {
    kvm: Result<Vec<BTreeMap<String, u64>>, i32>,
    huge: Option<HugeCounters>,
}

struct Shared<'a> {
    strategy: Strategy<'a>,
    vcpus: u64,
    /// Where the vCPUs wait for each other at the end of their setup fill
    /// (the last one in takes the start readings).
    filled: Gate,
    stats: &'a [KvmStats],
    start: std::sync::Mutex<Option<Start>>,
    /// Where the vCPUs wait for each other between giving back and taking
    /// back.
    barrier: Gate,
    given_back: &'a [AtomicU64],
    done: AtomicU64,
    total: u64,
    progress: Progress<'a>,
}

fn run_vcpu(id: usize, mut vcpu: kvm_ioctls::VcpuFd, sh: &Shared<'_>) -> Result<VcpuRun, VmError> {
    use kvm_ioctls::VcpuExit;
    let mut r = VcpuRun::default();
    loop {
        let t = Instant::now();
        let exit = vcpu.run();
        let ran = t.elapsed().as_nanos() as u64;
        if r.started.is_some() {
            r.run_nanos += ran;
        }
        let (which, data) = match exit {
            Ok(VcpuExit::MmioWrite(addr, data)) if (MMIO_GPA..MMIO_GPA + 64).contains(&addr) => {
                let mut w = [0u8; 4];
                w[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                ((addr - MMIO_GPA) / 8, u32::from_le_bytes(w) as u64)
            }
            Ok(other) => {
                let mut exit = format!("{other:?}");
                let regs = vcpu.get_regs().unwrap_or_default();
                if let Ok(sregs) = vcpu.get_sregs() {
                    exit += &format!(
                        " (rflags {:#x}, cs.dpl {}, ss.dpl {}, cr0 {:#x}, efer {:#x})",
                        regs.rflags, sregs.cs.dpl, sregs.ss.dpl, sregs.cr0, sregs.efer
                    );
                }
                return Err(VmError::Exit {
                    vcpu: id,
                    exit,
                    rip: regs.rip,
                });
            }
            Err(e) => return Err(kvm_err("KVM_RUN")(e)),
        };
        r.exits += 1;
        let offset = data * SUBPAGE_SIZE;
        match which {
            EXIT_GIVE => {
                let (w, b) = bit(sh.given_back, data);
                // ORDERING: Release: the free callback that may follow
                // (from any vCPU's thread) sees the page given back.
                w.fetch_or(b, Ordering::Release);
                let t = Instant::now();
                match &sh.strategy {
                    Strategy::Direct(host) => host
                        .free(ByteRange::new(offset, SUBPAGE_SIZE), 0)
                        .map_err(|e| VmError::Syscall {
                            step: "fallocate(PUNCH_HOLE) of a given-back page",
                            errno: e.errno,
                        })?,
                    Strategy::Engine(engine) => engine.punch(offset, SUBPAGE_SIZE)?,
                }
                r.release_nanos += t.elapsed().as_nanos() as u64;
                r.gives += 1;
            }
            EXIT_TAKE => {
                let t = Instant::now();
                match &sh.strategy {
                    Strategy::Direct(host) => host
                        .allocate(ByteRange::new(offset, SUBPAGE_SIZE), 0)
                        .map_err(|e| VmError::Syscall {
                            step: "fallocate of a taken-back page",
                            errno: e.errno,
                        })?,
                    Strategy::Engine(engine) => {
                        let hp = engine.huge_page_size();
                        let h = offset / hp;
                        let absent = engine.backing(h)? == hugepunch::Backing::Absent;
                        engine.populate(offset, SUBPAGE_SIZE)?;
                        if absent {
                            // The populate allocated the whole huge page
                            // (docs/CONTRACT.md §3.6, populate). The pages of it this vCPU
                            // still has given back go back to the engine,
                            // deferred: no fallocate, no flush. (Only this
                            // vCPU's own pages: no other thread changes
                            // their state.)
                            let first = h * hp / SUBPAGE_SIZE;
                            let ranges: Vec<(u64, u64)> = (first..first + hp / SUBPAGE_SIZE)
                                .filter(|&p| p != data && p % sh.vcpus == id as u64)
                                .filter(|&p| {
                                    let (w, b) = bit(sh.given_back, p);
                                    // ORDERING: Relaxed: this thread
                                    // wrote the bits of its own pages.
                                    w.load(Ordering::Relaxed) & b != 0
                                })
                                .map(|p| (p * SUBPAGE_SIZE, SUBPAGE_SIZE))
                                .collect();
                            for (o, l) in ranges {
                                engine.punch(o, l)?;
                            }
                        }
                    }
                }
                r.take_nanos += t.elapsed().as_nanos() as u64;
                let (w, b) = bit(sh.given_back, data);
                // ORDERING: Release, as for a give-back (after the
                // populate: until it returns the page is still given back).
                w.fetch_and(!b, Ordering::Release);
                r.takes += 1;
            }
            EXIT_NOT_ZERO => r.not_zero += 1,
            EXIT_FILLED => {
                let read = || {
                    let start = Start {
                        kvm: sh.stats.iter().map(KvmStats::read).collect(),
                        huge: HugeCounters::read(),
                    };
                    *sh.start.lock().unwrap_or_else(|p| p.into_inner()) = Some(start);
                };
                if !sh.filled.wait_last(read) {
                    return Err(VmError::Options(format!(
                        "vCPU {id} stopped: another vCPU failed"
                    )));
                }
                r.started = Some(Instant::now());
            }
            EXIT_SYNC => {
                if !sh.barrier.wait() {
                    return Err(VmError::Options(format!(
                        "vCPU {id} stopped: another vCPU failed"
                    )));
                }
            }
            EXIT_DONE => {
                r.finished = Some(Instant::now());
                return Ok(r);
            }
            other => {
                return Err(VmError::Exit {
                    vcpu: id,
                    exit: format!("MMIO write at exit page offset {:#x}", other * 8),
                    rip: vcpu.get_regs().map_or(0, |r| r.rip),
                })
            }
        }
        if matches!(which, EXIT_GIVE | EXIT_TAKE) {
            // ORDERING: Relaxed: a progress count.
            let done = sh.done.fetch_add(1, Ordering::Relaxed) + 1;
            if done.is_multiple_of(4096) || done == sh.total {
                (sh.progress)(sh.strategy.name(), done, sh.total);
            }
        }
    }
}

fn stats_delta(
    before: &[BTreeMap<String, u64>],
    after: &[BTreeMap<String, u64>],
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (b, a) in before.iter().zip(after) {
        for (k, v) in a {
            let d = v.saturating_sub(*b.get(k).unwrap_or(&0));
            if d > 0 {
                *out.entry(k.clone()).or_insert(0) += d;
            }
        }
    }
    out
}

fn side(
    opts: &VmOptions,
    scripts: &[Vec<(u64, u64)>],
    through_engine: bool,
    progress: Progress<'_>,
) -> Result<VmSide, VmError> {
    let strategy_name = if through_engine {
        "hugepunch"
    } else {
        "direct"
    };
    let check = |what: String| VmError::Check {
        strategy: strategy_name,
        what,
    };
    let empty = HugeCounters::read();
    let memory = memory::GuestMemory::new(&opts.backend, opts.size)?;
    let host = memory.host.clone();
    let kvm = memory.kvm();
    let (sys_size, writes, starts) = system_image(opts.size, scripts);
    let (_sys_fd, sys_map) =
        sys::private_memory("hugepunch-vm-system", sys_size).map_err(|errno| VmError::Syscall {
            step: "memfd_create + mmap (guest code and page tables)",
            errno,
        })?;
    for (at, words) in &writes {
        sys_map.write_u64s(*at, words);
    }
    sys_map.write_bytes(CODE, &GUEST_CODE);
    kvm.add_memslot(1, SYSTEM_GPA, &sys_map)
        .map_err(|e| VmError::Syscall {
            step: e.step,
            errno: e.errno,
        })?;
    let pages = opts.size / SUBPAGE_SIZE;
    let given_back: Arc<[AtomicU64]> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    let checked = Arc::new(Checked {
        inner: host.clone(),
        given_back: given_back.clone(),
        violations: AtomicU64::new(0),
    });
    let engine = if through_engine {
        Some(HugePunch::new(host.config(), checked.clone())?)
    } else {
        None
    };
    let vcpus = starts
        .iter()
        .enumerate()
        .map(|(i, &script)| vcpu(kvm, i as u64, script))
        .collect::<Result<Vec<_>, _>>()?;
    let stat_err = |errno| VmError::Syscall {
        step: "KVM_GET_STATS_FD",
        errno,
    };
    let mut stats = vec![KvmStats::open(&kvm.vm).map_err(stat_err)?];
    for v in &vcpus {
        stats.push(KvmStats::open(v).map_err(stat_err)?);
    }
    let total: u64 = scripts
        .iter()
        .flatten()
        .filter(|(op, _)| matches!(*op, OP_GIVE | OP_TAKE))
        .count() as u64;
    let shared = Shared {
        strategy: match &engine {
            Some(e) => Strategy::Engine(e),
            None => Strategy::Direct(&host),
        },
        vcpus: opts.vcpus as u64,
        filled: Gate::new(opts.vcpus),
        stats: &stats,
        start: std::sync::Mutex::new(None),
        barrier: Gate::new(opts.vcpus),
        given_back: &given_back,
        done: AtomicU64::new(0),
        total,
        progress,
    };
    let counts0 = host.counts();
    let read_all = |stats: &[KvmStats]| {
        stats
            .iter()
            .map(|s| s.read().map_err(stat_err))
            .collect::<Result<Vec<_>, _>>()
    };
    let runs = std::thread::scope(|scope| {
        let handles: Vec<_> = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let sh = &shared;
                std::thread::Builder::new()
                    .name(format!("vcpu{i}"))
                    .spawn_scoped(scope, move || {
                        let run = run_vcpu(i, v, sh);
                        if run.is_err() {
                            // No vCPU may wait for this one any more.
                            sh.barrier.fail();
                            sh.filled.fail();
                        }
                        run
                    })
                    .expect("spawn a vCPU thread")
            })
            .collect();
        let results: Vec<Result<VcpuRun, VmError>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        // The first vCPU's own error, not a vCPU that stopped because of it.
        let secondary =
            |e: &VmError| matches!(e, VmError::Options(m) if m.ends_with("another vCPU failed"));
        let mut errors: Vec<VmError> = Vec::new();
        let mut runs = Vec::new();
        for r in results {
            match r {
                Ok(run) => runs.push(run),
                Err(e) => errors.push(e),
            }
        }
        errors.sort_by_key(secondary);
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(runs),
        }
    })?;
    let after = read_all(&stats)?;
    let end_huge = HugeCounters::read();
    let start = shared
        .start
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .expect("every vCPU finished its setup fill");
    let before = start.kvm.map_err(stat_err)?;
    let backing = &host.info().huge_backing;
    let kernel = match (&empty, &start.huge, &end_huge) {
        (Some(empty), Some(start), Some(end)) => KernelHuge::from_counters(
            backing,
            host.huge_page_size(),
            empty,
            start,
            end,
            &Samples::default(),
        ),
        _ => None,
    };
    let counts = host.counts();
    let resident = host.resident_bytes().map_err(|errno| VmError::Syscall {
        step: "mincore",
        errno,
    })?;

    // Checks.
    let not_zero: u64 = runs.iter().map(|r| r.not_zero).sum();
    if not_zero > 0 {
        return Err(check(format!(
            "{not_zero} taken-back pages did not read zeros in the guest"
        )));
    }
    // ORDERING: Relaxed: the vCPU threads are joined.
    let violations = checked.violations.load(Ordering::Relaxed);
    if violations > 0 {
        return Err(check(format!(
            "the engine freed {violations} pages the guest had not given back"
        )));
    }
    let is_out = |p: u64| {
        let (w, b) = bit(&given_back, p);
        // ORDERING: Relaxed: the vCPU threads are joined.
        w.load(Ordering::Relaxed) & b != 0
    };
    let mut data = GuestData::default();
    let mut page = vec![0u8; SUBPAGE_SIZE as usize];
    for p in 0..pages {
        if is_out(p) {
            data.given_back_pages += 1;
            continue;
        }
        host.read(p * SUBPAGE_SIZE, &mut page)
            .map_err(|errno| VmError::Syscall {
                step: "read guest memory back",
                errno,
            })?;
        let base = p * SUBPAGE_SIZE;
        if let Some(i) = page.chunks_exact(8).enumerate().position(|(i, w)| {
            u64::from_ne_bytes(w.try_into().unwrap()) != (base + i as u64 * 8) ^ KEY
        }) {
            return Err(check(format!(
                "guest page {p:#x} (offset {:#x}) lost the data the guest wrote",
                p * SUBPAGE_SIZE + i as u64 * 8
            )));
        }
        if let Some(e) = &engine {
            if e.is_punched(base)? {
                return Err(check(format!(
                    "the engine holds guest page {p:#x} as given back, but the guest uses it"
                )));
            }
        }
        data.kept_pages += 1;
    }
    data.taken_back_zeroed = runs.iter().map(|r| r.takes).sum();
    let pending_bytes = match &engine {
        Some(e) => {
            let held = engine_allocated_bytes(e);
            if held != resident {
                return Err(check(format!(
                    "guest memory holds {resident:#x} bytes, the engine says {held:#x}"
                )));
            }
            e.stats().pending_subpages * SUBPAGE_SIZE
        }
        None => {
            // The pages the guest uses, and at most the rest of each huge
            // page a take-back landed in: a file of huge pages may back a
            // 4 KiB allocation in a hole with a larger folio, up to a whole
            // huge page (a huge=always tmpfs does, where the whole 2 MiB
            // around it is a hole).
            let want = opts.size - data.given_back_pages * SUBPAGE_SIZE;
            let hp = host.huge_page_size();
            let landed: std::collections::BTreeSet<u64> = scripts
                .iter()
                .flatten()
                .filter(|(op, _)| *op == OP_TAKE)
                .map(|(_, addr)| addr / hp)
                .collect();
            let slack = if host.info().huge_backing.available() || resident > want {
                landed.len() as u64 * hp
            } else {
                0
            };
            if resident < want || resident > want + slack {
                return Err(check(format!(
                    "guest memory holds {resident:#x} bytes, {want:#x} expected (at most \
                     {slack:#x} more: the huge pages take-backs landed in)"
                )));
            }
            0
        }
    };
    let held_unused = resident.saturating_sub(data.kept_pages * SUBPAGE_SIZE);
    let start = runs.iter().filter_map(|r| r.started).min();
    let end = runs.iter().filter_map(|r| r.finished).max();
    let wall = match (start, end) {
        (Some(s), Some(e)) => e.saturating_duration_since(s),
        _ => Duration::ZERO,
    };
    let gives: u64 = runs.iter().map(|r| r.gives).sum();
    let guest_seconds = runs.iter().map(|r| r.run_nanos).sum::<u64>() as f64 / 1e9;
    Ok(VmSide {
        strategy: strategy_name,
        wall_seconds: wall.as_secs_f64(),
        guest_seconds,
        guest_us_per_give_back: if gives > 0 {
            guest_seconds * 1e6 / gives as f64
        } else {
            0.0
        },
        release_seconds: runs.iter().map(|r| r.release_nanos).sum::<u64>() as f64 / 1e9,
        fallocate_seconds: (counts.fallocate_nanos - counts0.fallocate_nanos) as f64 / 1e9,
        take_back_seconds: runs.iter().map(|r| r.take_nanos).sum::<u64>() as f64 / 1e9,
        give_backs: gives,
        take_backs: runs.iter().map(|r| r.takes).sum(),
        vmm_exits: runs.iter().map(|r| r.exits).sum(),
        fallocate_calls: counts.fallocate_calls() - counts0.fallocate_calls(),
        punch_calls: counts.punch_calls - counts0.punch_calls,
        // Every page is resident once the guest's setup fill has written it.
        bytes_released: opts.size.saturating_sub(resident),
        held_unused_bytes: held_unused,
        pending_bytes,
        kvm: stats_delta(&before, &after),
        kvm_mappings_at_start: KvmMappings::from_stats(&before[0]),
        kvm_mappings_at_end: KvmMappings::from_stats(&after[0]),
        kernel,
        huge_backing: backing.describe(),
        data,
    })
}

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
    let ops = crate::pattern::ops(opts.pattern, opts.size, opts.seed)?;
    let scripts = scripts(opts, &ops);
    let direct = side(opts, &scripts, false, progress)?;
    let engine = side(opts, &scripts, true, progress)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    hugepunch_probe::include_needs!();

    fn opts(vcpus: usize, pattern: &str) -> VmOptions {
        VmOptions {
            backend: Backend::Memfd,
            size: 4 << 20,
            vcpus,
            pattern: pattern.parse().unwrap(),
            seed: 1,
        }
    }

    #[test]
    fn scripts_give_every_page_back_once_and_take_some_back() {
        for vcpus in [1, 2, 3] {
            let o = opts(vcpus, "random");
            let ops = crate::pattern::ops(o.pattern, o.size, o.seed).unwrap();
            let s = scripts(&o, &ops);
            assert_eq!(s.len(), vcpus);
            let mut gave = vec![0u32; 1024];
            let mut took = 0;
            for (v, script) in s.iter().enumerate() {
                assert_eq!(script.last(), Some(&(OP_DONE, 0)));
                let filled = script.iter().position(|e| e.0 == OP_FILLED).unwrap();
                for &(op, addr) in &script[filled..] {
                    let p = addr / SUBPAGE_SIZE;
                    if matches!(op, OP_FILL | OP_GIVE | OP_TAKE) {
                        assert_eq!(p as usize % vcpus, v, "pages dealt round-robin");
                    }
                    match op {
                        OP_GIVE => gave[p as usize] += 1,
                        OP_TAKE => took += 1,
                        _ => {}
                    }
                }
            }
            assert!(gave.iter().all(|&g| g == 1), "{vcpus}");
            // A sixteenth of what each vCPU gave, rounded up.
            let want: usize = (0..vcpus)
                .map(|v| (1024 - v).div_ceil(vcpus).div_ceil(TAKE_BACK_EVERY))
                .sum();
            assert_eq!(took, want, "{vcpus}");
            for script in &s {
                let sync = script.iter().position(|e| e.0 == OP_SYNC).unwrap();
                assert!(
                    script[..sync].iter().all(|e| e.0 != OP_TAKE),
                    "take-backs only after every vCPU gave back"
                );
            }
        }
    }

    #[test]
    fn a_fill_never_touches_a_page_that_is_given_back() {
        let o = opts(2, "strided");
        let ops = crate::pattern::ops(o.pattern, o.size, o.seed).unwrap();
        for script in scripts(&o, &ops) {
            let mut out = std::collections::HashSet::new();
            for (op, addr) in script {
                match op {
                    OP_GIVE => assert!(out.insert(addr)),
                    OP_TAKE => assert!(out.remove(&addr)),
                    OP_FILL => assert!(!out.contains(&addr), "{addr:#x}"),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_failing_vcpu_opens_the_gate_for_the_others() {
        let _watchdog = hugepunch::testing::watchdog::Watchdog::arm(
            "a_failing_vcpu_opens_the_gate_for_the_others",
        );
        let gate = Gate::new(3);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| gate.wait());
            gate.fail();
            assert!(!waiter.join().unwrap(), "released, told of the failure");
        });
        assert!(!gate.wait(), "a later waiter does not block either");
        let gate = Gate::new(2);
        std::thread::scope(|s| {
            let other = s.spawn(|| gate.wait());
            assert!(gate.wait());
            assert!(other.join().unwrap());
        });
    }

    #[test]
    fn page_tables_map_guest_memory_and_the_system_slot() {
        let (sys_size, writes, starts) = system_image(3 << 30, &[vec![(OP_DONE, 0)]]);
        assert_eq!(sys_size, 2 * HUGE, "the scripts start at 2 MiB");
        assert_eq!(starts, vec![SYSTEM_GPA + SCRIPTS]);
        let at = |o: u64| writes.iter().find(|(w, _)| *w == o).unwrap().1.clone();
        assert_eq!(at(PML4)[0], (SYSTEM_GPA + PDPT) | 7);
        let pdpt = at(PDPT);
        assert_eq!(pdpt[2], (SYSTEM_GPA + PD_GUEST + 0x2000) | 7);
        assert_eq!(pdpt[256], (SYSTEM_GPA + PD_SYSTEM) | 7);
        assert_eq!(at(PD_GUEST + 0x1000)[1], ((1 << 30) + HUGE) | 0x87);
        let pd = at(PD_SYSTEM);
        assert_eq!(pd[..2], [SYSTEM_GPA | 0x87, (SYSTEM_GPA + HUGE) | 0x87]);
        assert_eq!(
            pd[2..384],
            [0; 382],
            "nothing else mapped but the exit page"
        );
        assert_eq!(pd[384], MMIO_GPA | 0x87);
    }

    needs! { binutils;
        /// The bytes above are what `guest.S` assembles to (ignored where
        /// binutils are not installed).
        #[test]
        fn guest_code_matches_its_source() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vm");
            let out = std::env::temp_dir().join(format!("hugepunch-guest-{}", std::process::id()));
            let obj = out.with_extension("o");
            let bin = out.with_extension("bin");
            let assembled = std::process::Command::new("as")
                .args(["--64", "-o"])
                .arg(&obj)
                .arg(dir.join("guest.S"))
                .status()
                .is_ok_and(|s| s.success())
                && std::process::Command::new("objcopy")
                    .args(["-O", "binary", "-j", ".text"])
                    .arg(&obj)
                    .arg(&bin)
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(assembled, "`as` and `objcopy` assemble guest.S");
            let bytes = std::fs::read(&bin).unwrap();
            let _ = std::fs::remove_file(&obj);
            let _ = std::fs::remove_file(&bin);
            assert_eq!(
                bytes, GUEST_CODE,
                "re-assemble guest.S and update GUEST_CODE"
            );
        }
    }
}
