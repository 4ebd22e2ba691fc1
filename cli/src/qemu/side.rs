//! One QEMU run: the guest boots on a fresh file of a private `huge=always`
//! tmpfs, fills its memory, and goes through the balloon sequence while
//! the kernel's huge page counters, the file's allocated bytes, QEMU's CPU
//! time and (with hugepunch) the engine's statistics are read between the
//! steps.

use super::console::{Console, Reply};
use super::qmp::Qmp;
use super::{Accel, Inflation, Plan, Scenario};
use anyhow::{anyhow, bail, Context as _};
use hugepunch_linux::huge_counters::HugeCounters;
use hugepunch_linux::sys;
use serde::Serialize;
use serde_json::{json, Value};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HUGE: u64 = 2 << 20;
const PAGE: u64 = 4096;

/// Which QEMU a side runs.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `stock` (QEMU as it is) or `hugepunch`.
    pub name: &'static str,
    /// The binary.
    pub binary: PathBuf,
    /// Firmware directories (`-L`), searched in order.
    pub firmware: Vec<PathBuf>,
    /// Route the balloon through hugepunch (`hugepunch=on`).
    pub hugepunch: bool,
    /// More `-device virtio-balloon-pci` properties (`key=value`).
    pub balloon_properties: Vec<String>,
}

/// What the guest program checked.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Checked {
    /// `verify` commands answered.
    pub checks: u64,
    /// Pages compared, all checks together.
    pub pages: u64,
    /// Pages that did not read back what the guest wrote.
    pub bad_pages: u64,
}

/// The figures the kernel and the file give at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
struct Snapshot {
    counters: HugeCounters,
    allocated: u64,
}

impl Snapshot {
    fn take(fd: &sys::SizedFile) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            counters: HugeCounters::read().ok_or_else(|| anyhow!("cannot read /proc/meminfo"))?,
            allocated: sys::allocated_bytes(fd)
                .map_err(|e| anyhow!("fstat of the guest's memory file: errno {e}"))?,
        })
    }
}

/// One balloon change, timed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Change {
    /// Bytes the balloon took (inflate) or gave back (deflate).
    pub bytes: u64,
    /// Wall time from the QMP command until the guest's balloon reached
    /// its target, seconds.
    pub seconds: f64,
    /// QEMU's CPU time (user + system, all threads) over the same span,
    /// seconds.
    pub qemu_cpu_seconds: f64,
}

/// A side's report: one row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct SideReport {
    /// `stock` or `hugepunch`.
    pub qemu: &'static str,
    /// The scenario's name.
    pub scenario: String,
    /// The engine's budget of pending bytes (hugepunch only; `None`: no limit).
    pub budget: Option<u64>,
    /// Huge pages of the file whole before QEMU started (ShmemHugePages).
    pub whole_at_start: u64,
    /// Huge pages whole after the first inflation.
    pub whole_after_inflate: u64,
    /// Huge pages whole at the end of the sequence, before QEMU quit.
    pub whole_at_end: u64,
    /// Huge pages the kernel split during the first inflation
    /// (thp_split_page).
    pub split_in_inflate: u64,
    /// Huge pages the kernel split over the whole run.
    pub split: u64,
    /// Discards QEMU issued during the first inflation: hugepunch's host
    /// free calls, or for QEMU as it is one per 4 KiB frame (its code
    /// discards each frame as it arrives; free page reports not counted).
    pub discards_in_inflate: u64,
    /// Whether `discards_in_inflate` was counted (hugepunch) or follows
    /// from QEMU's code (stock).
    pub discards_counted: bool,
    /// Bytes of the file released by the first inflation (allocated before
    /// minus after).
    pub released: u64,
    /// Bytes the guest ballooned in the first inflation that are still
    /// allocated, held back pending (hugepunch's pending subpages).
    pub held_back: u64,
    /// Huge pages the guest had ballooned whole after the first inflation
    /// (the guest's own count: every 4 KiB page of a 2 MiB-aligned run is
    /// a balloon page), where the guest could tell.
    pub ballooned_whole: Option<u64>,
    /// The first inflation.
    pub inflate: Change,
    /// The first deflation.
    pub deflate: Change,
    /// QEMU's CPU time over the whole run, seconds.
    pub qemu_cpu_seconds: f64,
    /// The guest's checks of what it kept, all boots.
    pub checked: Checked,
    /// Boots seen (the reboot gives two, with different boot ids).
    pub boots: u64,
    /// Guest memory access time after the first inflation, ns a page (the
    /// guest's `access` command; meaningful with KVM only).
    pub access_ns_per_page: Option<u64>,
    /// Bytes pending in the engine when the guest rebooted with its balloon
    /// inflated (hugepunch only): what the reset made safe.
    pub pending_at_reset: u64,
    /// The engine's statistics at the end (`hugepunch-stats`).
    pub hugepunch_stats: Option<Value>,
    /// The engine's statistics after the first inflation.
    pub hugepunch_stats_after_inflate: Option<Value>,
}

/// CPU time of process `pid` so far (utime + stime), seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; here 11 and 12.
    (ticks(11) + ticks(12)) as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// A running QEMU: the child, its console and its QMP socket.
struct Vm {
    child: Child,
    console: Console,
    qmp: Qmp,
    _dir: TempDir,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(plan: &Plan, s: &Scenario, q: &Qemu, mem_file: &Path) -> anyhow::Result<Vm> {
    let dir =
        std::env::temp_dir().join(format!("hugepunch-qemu-{}-{}", std::process::id(), q.name));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let dir = TempDir(dir);
    let sock = dir.0.join("qmp.sock");
    let mem = plan.memory;
    let mut balloon = String::from("virtio-balloon-pci,id=balloon0");
    if s.free_page_reporting {
        balloon.push_str(",free-page-reporting=on");
    }
    if q.hugepunch {
        balloon.push_str(&format!(
            ",hugepunch=on,hugepunch-budget={}",
            s.budget.unwrap_or(0)
        ));
    }
    for p in &q.balloon_properties {
        balloon.push(',');
        balloon.push_str(p);
    }
    let mut cmd = Command::new(&q.binary);
    for fw in &q.firmware {
        cmd.arg("-L").arg(fw);
    }
    cmd.args(["-accel", plan.accel.qemu_name()])
        .args(match plan.accel {
            Accel::Tcg => ["-cpu", "max"],
            Accel::Kvm => ["-cpu", "host"],
        })
        .args(["-smp", &plan.vcpus.to_string()])
        .args(["-m", &format!("{}M", mem >> 20)])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=ram0,size={mem},share=on,mem-path={}",
            mem_file.display()
        ))
        .args(["-machine", "pc,memory-backend=ram0"])
        .arg("-kernel")
        .arg(&plan.guest.kernel)
        .arg("-initrd")
        .arg(&plan.guest.initrd)
        .arg("-append")
        .arg(&plan.guest.cmdline)
        .args(["-device", &balloon])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", q.binary.display()))?;
    let console = Console::new(
        child.stdin.take().expect("piped"),
        child.stdout.take().expect("piped"),
    );
    let stderr = child.stderr.take().expect("piped");
    let qmp = match Qmp::connect(&sock, Duration::from_secs(30)) {
        Ok(q) => q,
        Err(e) => {
            let _ = child.kill();
            let mut msg = String::new();
            let _ = std::io::Read::read_to_string(&mut { stderr }, &mut msg);
            bail!("{e:#}; QEMU said: {}", msg.trim().replace('\n', " | "));
        }
    };
    // QEMU's warnings go to our stderr from here on, prefixed.
    let name = q.name;
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("qemu ({name}): {line}");
        }
    });
    Ok(Vm {
        child,
        console,
        qmp,
        _dir: dir,
    })
}

/// Set the balloon's target (guest memory left, bytes) and wait until the
/// guest reaches it; fails when the balloon stops moving for a minute.
fn balloon_to(vm: &mut Vm, target: u64) -> anyhow::Result<Change> {
    let pid = vm.child.id();
    let before = vm.qmp.balloon_actual()?;
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    vm.qmp.execute("balloon", json!({ "value": target }))?;
    let mut last = before;
    let mut moved = Instant::now();
    loop {
        let actual = vm.qmp.balloon_actual()?;
        if actual == target {
            break;
        }
        if actual != last {
            last = actual;
            moved = Instant::now();
        } else if moved.elapsed() > Duration::from_secs(60) {
            bail!(
                "the balloon stopped at {} MiB of guest memory, target {} MiB",
                actual >> 20,
                target >> 20
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Change {
        bytes: before.abs_diff(target),
        seconds: t0.elapsed().as_secs_f64(),
        qemu_cpu_seconds: cpu_seconds(pid) - cpu0,
    })
}

fn stats(vm: &mut Vm, q: &Qemu) -> anyhow::Result<Option<Value>> {
    if !q.hugepunch {
        return Ok(None);
    }
    vm.qmp
        .qom_get("/machine/peripheral/balloon0", "hugepunch-stats")
        .map(Some)
}

fn field(v: &Option<Value>, key: &str) -> u64 {
    v.as_ref().and_then(|v| v[key].as_u64()).unwrap_or(0)
}

fn verify(vm: &mut Vm, plan: &Plan, checked: &mut Checked) -> anyhow::Result<()> {
    let r = vm.console.ask("verify", plan.timeout)?;
    checked.checks += 1;
    checked.pages += r.num("pages")?;
    checked.bad_pages += r.num("bad_pages")?;
    Ok(())
}

fn mode(i: Inflation) -> &'static str {
    match i {
        Inflation::Scattered => "scattered",
        Inflation::Contiguous => "contiguous",
    }
}

/// How much the balloon takes: what the plan asks, else what the guest's
/// fill freed less a margin for the kernel, in whole 2 MiB.
fn balloon_bytes(plan: &Plan, fill: &Reply) -> anyhow::Result<u64> {
    let freed = fill.num("freed")? * PAGE;
    let room = freed.saturating_sub(48 << 20) / HUGE * HUGE;
    let want = plan.balloon.unwrap_or(room);
    if want == 0 || want > room {
        bail!(
            "the guest freed {} MiB; a balloon of {} MiB does not fit (at most {} MiB)",
            freed >> 20,
            want >> 20,
            room >> 20
        );
    }
    Ok(want)
}

/// Run the balloon sequence of `s` on `q`; `phase` reports progress.
pub fn run(
    plan: &Plan,
    s: &Scenario,
    q: &Qemu,
    phase: &dyn Fn(&str),
) -> anyhow::Result<SideReport> {
    let mem = plan.memory;
    let fd = sys::thp_tmpfs_file(mem).map_err(|e| {
        anyhow!(
            "the guest's memory (a private huge=always tmpfs): {} failed: {} (needs root)",
            e.step,
            std::io::Error::from_raw_os_error(e.errno)
        )
    })?;
    let empty = Snapshot::take(&fd)?;
    phase("allocating the guest's memory in huge pages (fallocate)");
    sys::allocate(&fd, 0, mem)
        .map_err(|e| anyhow!("fallocate of the guest's memory: errno {e}"))?;
    let start = Snapshot::take(&fd)?;
    let whole = |snap: &Snapshot| {
        (snap
            .counters
            .shmem_huge_bytes
            .saturating_sub(empty.counters.shmem_huge_bytes))
            / HUGE
    };
    // QEMU opens the file through our descriptor (it stays unnamed).
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_fd().as_raw_fd()
    ));

    phase("booting");
    let mut vm = spawn(plan, s, q, &path)?;
    let pid = vm.child.id();
    let ready = vm.console.wait("ready", plan.timeout)?;
    let boot_a = ready.text("boot_id")?.to_string();
    let mut checked = Checked::default();

    phase("filling guest memory");
    let fill = vm
        .console
        .ask(&format!("fill max {} 1", mode(s.inflation)), plan.timeout)?;
    let balloon = balloon_bytes(plan, &fill)?;

    phase("inflating");
    let stats0 = stats(&mut vm, q)?;
    let before = Snapshot::take(&fd)?;
    let inflate = balloon_to(&mut vm, mem - balloon)?;
    if s.free_page_reporting {
        // Free page reporting runs two seconds after pages are freed.
        std::thread::sleep(Duration::from_secs(3));
    }
    let after = Snapshot::take(&fd)?;
    let stats1 = stats(&mut vm, q)?;
    let ballooned_whole = vm
        .console
        .ask("balloonmap", plan.timeout)
        .ok()
        .and_then(|r| r.num("whole_huge").ok());
    let access_ns_per_page = vm
        .console
        .ask("access 64", plan.timeout)
        .ok()
        .and_then(|r| r.num("ns_per_page").ok());
    verify(&mut vm, plan, &mut checked)?;

    phase("deflating");
    let deflate = balloon_to(&mut vm, mem)?;
    vm.console.ask("reuse 64 2", plan.timeout)?;
    verify(&mut vm, plan, &mut checked)?;

    // The guest reboots with its balloon inflated: the ballooned pages
    // (with hugepunch, pending ones among them) belong to the new kernel
    // without any deflate.
    phase("inflating again, to reboot inflated");
    balloon_to(&mut vm, mem - balloon)?;
    verify(&mut vm, plan, &mut checked)?;
    let pending_at_reset = field(&stats(&mut vm, q)?, "pending-subpages") * PAGE;
    phase("rebooting inflated (system_reset)");
    vm.qmp.execute("system_reset", json!({}))?;
    let ready = vm.console.wait("ready", plan.timeout)?;
    if ready.text("boot_id")? == boot_a {
        bail!("the guest did not reboot (same boot id)");
    }
    // The balloon's target outlives the reset and the new driver inflates
    // to it as it loads; give everything back before the new kernel fills
    // memory, so that what it writes is all of its memory.
    balloon_to(&mut vm, mem)?;
    phase("filling guest memory after the reboot");
    let fill = vm
        .console
        .ask(&format!("fill max {} 3", mode(s.inflation)), plan.timeout)?;
    let again = balloon_bytes(plan, &fill)?.min(balloon);
    for cycle in 0..plan.cycles {
        phase(&format!("cycle {} of {}", cycle + 1, plan.cycles));
        balloon_to(&mut vm, mem - again)?;
        verify(&mut vm, plan, &mut checked)?;
        balloon_to(&mut vm, mem)?;
        vm.console
            .ask(&format!("reuse 32 {}", 4 + cycle), plan.timeout)?;
        verify(&mut vm, plan, &mut checked)?;
    }
    let end = Snapshot::take(&fd)?;
    let stats2 = stats(&mut vm, q)?;
    let qemu_cpu_seconds = cpu_seconds(pid);
    let _ = vm.qmp.execute("quit", json!({}));
    let _ = vm.child.wait();

    let pending = field(&stats1, "pending-subpages") * PAGE;
    Ok(SideReport {
        qemu: q.name,
        scenario: s.name.clone(),
        budget: if q.hugepunch { s.budget } else { None },
        whole_at_start: whole(&start),
        whole_after_inflate: whole(&after),
        whole_at_end: whole(&end),
        split_in_inflate: after.counters.thp_split_page - before.counters.thp_split_page,
        split: end.counters.thp_split_page - start.counters.thp_split_page,
        discards_in_inflate: if q.hugepunch {
            field(&stats1, "free-calls") - field(&stats0, "free-calls")
        } else {
            inflate.bytes / PAGE
        },
        discards_counted: q.hugepunch,
        released: before.allocated.saturating_sub(after.allocated),
        held_back: pending,
        ballooned_whole,
        inflate,
        deflate,
        qemu_cpu_seconds,
        checked,
        boots: 2,
        access_ns_per_page,
        pending_at_reset,
        hugepunch_stats: stats2,
        hugepunch_stats_after_inflate: stats1,
    })
}
