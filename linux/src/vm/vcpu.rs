//! The vCPUs: each set up at CPL3 in 64-bit mode at the guest's code, run
//! on its own thread, its exits handled (a give-back released, directly or
//! through the engine; a take-back populated), the vCPUs meeting at gates
//! between the phases of their scripts.

use super::guest::{
    CODE, EXIT_DONE, EXIT_FILLED, EXIT_GIVE, EXIT_NOT_ZERO, EXIT_SYNC, EXIT_TAKE, KEY, MMIO_GPA,
    PML4, SYSTEM_GPA,
};
use super::{Progress, VmError};
use crate::host::LinuxHost;
use crate::huge_counters::HugeCounters;
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, KvmStats, Vcpu, VcpuExit};
use hugepunch::{ByteRange, Host, HugePunch, SUBPAGE_SIZE};
use kvm_bindings::{kvm_regs, kvm_segment};
use std::collections::BTreeMap;
use std::time::Instant;

/// The word and bit of `page` in a bitmap of pages.
pub(super) fn bit(words: &[AtomicU64], page: u64) -> (&AtomicU64, u64) {
    (&words[(page / 64) as usize], 1 << (page % 64))
}

/// A vCPU ready to run at CPL3 in 64-bit mode at the guest code with its
/// script.
pub(super) fn vcpu(kvm: &sys::Kvm, id: u64, script: u64) -> Result<Vcpu, VmError> {
    let vcpu = kvm.create_vcpu(id)?;
    let cpuid = kvm.supported_cpuid()?;
    vcpu.set_cpuid(&cpuid)?;
    let mut sregs = vcpu.sregs()?;
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
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_regs {
        rip: SYSTEM_GPA + CODE,
        rsi: script,
        r15: KEY,
        r14: MMIO_GPA,
        rflags: 0x2, // reserved bit 1
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    Ok(vcpu)
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
pub(super) struct VcpuRun {
    /// When its setup fill was over (every vCPU's).
    pub started: Option<Instant>,
    /// When its script was done.
    pub finished: Option<Instant>,
    /// Time inside `KVM_RUN` after `started`.
    pub run_nanos: u64,
    /// Time releasing given-back pages.
    pub release_nanos: u64,
    /// Time taking pages back.
    pub take_nanos: u64,
    /// Pages given back.
    pub gives: u64,
    /// Pages taken back (each checked zero by the guest).
    pub takes: u64,
    /// Exits handled.
    pub exits: u64,
    /// Taken-back pages the guest did not read as zeros.
    pub not_zero: u64,
}

/// How a side releases and takes back memory.
pub(super) enum Strategy<'a> {
    /// `fallocate` at each give-back and take-back.
    Direct(&'a LinuxHost),
    /// Through the engine.
    Engine(&'a HugePunch),
}

impl Strategy<'_> {
    /// `direct` or `hugepunch`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Direct(_) => "direct",
            Strategy::Engine(_) => "hugepunch",
        }
    }
}

/// The readings taken when every vCPU has finished its setup fill, before
/// any gives memory back.
pub(super) struct Start {
    /// KVM's statistics of the VM and of each vCPU (or the errno of a read).
    pub kvm: Result<Vec<BTreeMap<String, u64>>, i32>,
    /// The kernel's huge page counters.
    pub huge: Option<HugeCounters>,
}

/// What the vCPU threads of a side share.
pub(super) struct Shared<'a> {
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

impl<'a> Shared<'a> {
    /// For `vcpus` vCPUs releasing memory by `strategy`: `stats` are the
    /// VM's and each vCPU's statistics (read when the setup fill is over),
    /// `given_back` one bit per guest page, `total` the give-backs and
    /// take-backs of all the scripts (for `progress`).
    pub fn new(
        strategy: Strategy<'a>,
        vcpus: usize,
        stats: &'a [KvmStats],
        given_back: &'a [AtomicU64],
        total: u64,
        progress: Progress<'a>,
    ) -> Self {
        Shared {
            strategy,
            vcpus: vcpus as u64,
            filled: Gate::new(vcpus),
            stats,
            start: std::sync::Mutex::new(None),
            barrier: Gate::new(vcpus),
            given_back,
            done: AtomicU64::new(0),
            total,
            progress,
        }
    }
}

/// Run each vCPU on its own thread until every one is done; what each did,
/// and the readings taken when their setup fill was over. On failure, the
/// first vCPU's own error (not that of a vCPU that stopped because of it).
pub(super) fn run_all(vcpus: Vec<Vcpu>, sh: &Shared<'_>) -> Result<(Vec<VcpuRun>, Start), VmError> {
    let runs = std::thread::scope(|scope| {
        let handles: Vec<_> = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
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
    let start = sh
        .start
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .expect("every vCPU finished its setup fill");
    Ok((runs, start))
}

fn run_vcpu(id: usize, mut vcpu: Vcpu, sh: &Shared<'_>) -> Result<VcpuRun, VmError> {
    let mut r = VcpuRun::default();
    loop {
        let t = Instant::now();
        let exit = vcpu.run();
        let ran = t.elapsed().as_nanos() as u64;
        if r.started.is_some() {
            r.run_nanos += ran;
        }
        let (which, data) = match exit {
            Ok(VcpuExit::MmioWrite { addr, data }) if (MMIO_GPA..MMIO_GPA + 64).contains(&addr) => {
                // The guest writes 32-bit words.
                ((addr - MMIO_GPA) / 8, data & 0xffff_ffff)
            }
            Ok(other) => {
                let mut exit = match other {
                    VcpuExit::Other(what) => what,
                    mmio => format!("{mmio:?}"),
                };
                let regs = vcpu.regs().unwrap_or_default();
                if let Ok(sregs) = vcpu.sregs() {
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
            Err(e) => return Err(e.into()),
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
                    rip: vcpu.regs().map_or(0, |r| r.rip),
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
