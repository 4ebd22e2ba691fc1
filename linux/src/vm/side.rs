//! One side of a guest run: the VMs, the checking host the engine sees,
//! the vCPU threads, and what the side measured and checked.

use super::guest::{system_image, CODE, GUEST_CODE, KEY, OP_GIVE, OP_TAKE, SYSTEM_GPA};
use super::memory::{self, KvmMappings};
use super::vcpu::{bit, run_all, vcpu, Shared, Strategy};
use super::{GuestData, Progress, VmError, VmOptions, VmSide};
use crate::host::LinuxHost;
use crate::huge_counters::{HugeCounters, KernelHuge, Samples};
use crate::replay::engine_allocated_bytes;
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, KvmStats, Vcpu};
use hugepunch::{Attribute, ByteRange, Hint, Host, HostError, HugePunch, SUBPAGE_SIZE};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The host the engine sees: the guest_memfd host, checking at every free
/// that the guest gave back every page of it.
struct Checked {
    inner: Arc<LinuxHost>,
    given_back: Arc<[AtomicU64]>,
    violations: AtomicU64,
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

/// A side's VM: its guest memory, and the system memslot holding the
/// guest's code, page tables and scripts.
struct Vm {
    memory: memory::GuestMemory,
    /// The system memslot's file (the memslot holds its mapping).
    _system: sys::SizedFile,
    /// Where each vCPU's script starts (guest addresses).
    starts: Vec<u64>,
}

impl Vm {
    /// Fresh guest memory and a system memslot written with the guest's
    /// code, its page tables and `scripts`.
    fn boot(opts: &VmOptions, scripts: &[Vec<(u64, u64)>]) -> Result<Vm, VmError> {
        let memory = memory::GuestMemory::new(&opts.backend, opts.size)?;
        let (sys_size, writes, starts) = system_image(opts.size, scripts);
        let (system, sys_map) =
            sys::private_memory("hugepunch-vm-system", sys_size).map_err(|errno| {
                VmError::Syscall {
                    step: "memfd_create + mmap (guest code and page tables)",
                    errno,
                }
            })?;
        for (at, words) in &writes {
            sys_map.write_u64s(*at, words);
        }
        sys_map.write_bytes(CODE, &GUEST_CODE);
        memory.kvm().add_memslot(1, SYSTEM_GPA, &sys_map)?;
        Ok(Vm {
            memory,
            _system: system,
            starts,
        })
    }

    /// One vCPU per script, ready to run, and the statistics of the VM
    /// (first) and of each vCPU.
    fn vcpus(&self) -> Result<(Vec<Vcpu>, Vec<KvmStats>), VmError> {
        let kvm = self.memory.kvm();
        let vcpus = self
            .starts
            .iter()
            .enumerate()
            .map(|(i, &script)| vcpu(kvm, i as u64, script))
            .collect::<Result<Vec<_>, _>>()?;
        let mut stats = vec![KvmStats::open(&kvm.vm).map_err(stats_err)?];
        for v in &vcpus {
            stats.push(v.stats().map_err(stats_err)?);
        }
        Ok((vcpus, stats))
    }
}

fn stats_err(errno: i32) -> VmError {
    VmError::Syscall {
        step: "KVM_GET_STATS_FD",
        errno,
    }
}

/// Run one side on a fresh VM: give-backs punched directly, or through the
/// engine; every check; then what it measured.
pub(super) fn side(
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
    let vm = Vm::boot(opts, scripts)?;
    let host = vm.memory.host.clone();
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
    let (vcpus, stats) = vm.vcpus()?;
    let total: u64 = scripts
        .iter()
        .flatten()
        .filter(|(op, _)| matches!(*op, OP_GIVE | OP_TAKE))
        .count() as u64;
    let strategy = match &engine {
        Some(e) => Strategy::Engine(e),
        None => Strategy::Direct(&host),
    };
    let shared = Shared::new(strategy, opts.vcpus, &stats, &given_back, total, progress);
    let counts0 = host.counts();
    let (runs, start) = run_all(vcpus, &shared)?;
    let after = stats
        .iter()
        .map(|s| s.read().map_err(stats_err))
        .collect::<Result<Vec<_>, _>>()?;
    let end_huge = HugeCounters::read();
    let before = start.kvm.map_err(stats_err)?;
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
    let mut data = read_back(&host, &given_back, engine.as_ref(), pages, strategy_name)?;
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
            check_direct_residency(opts, scripts, &host, &data, resident).map_err(check)?;
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

/// Read back every page the guest kept: each must hold what the guest
/// wrote, and the engine must not hold it as given back.
fn read_back(
    host: &LinuxHost,
    given_back: &[AtomicU64],
    engine: Option<&HugePunch>,
    pages: u64,
    strategy: &'static str,
) -> Result<GuestData, VmError> {
    let check = |what: String| VmError::Check { strategy, what };
    let is_out = |p: u64| {
        let (w, b) = bit(given_back, p);
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
        if let Some(e) = engine {
            if e.is_punched(base)? {
                return Err(check(format!(
                    "the engine holds guest page {p:#x} as given back, but the guest uses it"
                )));
            }
        }
        data.kept_pages += 1;
    }
    Ok(data)
}

/// Direct punching: what the file holds at the end (see below).
fn check_direct_residency(
    opts: &VmOptions,
    scripts: &[Vec<(u64, u64)>],
    host: &LinuxHost,
    data: &GuestData,
    resident: u64,
) -> Result<(), String> {
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
        return Err(format!(
            "guest memory holds {resident:#x} bytes, {want:#x} expected (at most \
             {slack:#x} more: the huge pages take-backs landed in)"
        ));
    }
    Ok(())
}
