//! `hugepunch qemu`: a Debian guest kernel's virtio-balloon on QEMU, side
//! by side — Debian's QEMU as it is, and the same QEMU with the patch of
//! vmm/qemu/ (`hugepunch=on`) — on guest RAM that is a file of a private
//! `huge=always` tmpfs allocated in 2 MiB huge pages.
//!
//! Each side boots the guest of vmm/qemu/guest/ (Debian's cloud kernel,
//! a busybox initramfs, the guest program `hpguest`), which fills its
//! memory with a checkable pattern and frees half of it, scattered or in
//! contiguous runs; the balloon then inflates over QMP, the guest checks
//! every byte it kept, the balloon deflates, the guest reuses memory and
//! checks again; QEMU resets the machine (`system_reset`), the new kernel
//! writes all of memory, and more inflate/deflate cycles run, checked
//! again. The kernel counts the huge pages (ShmemHugePages,
//! thp_split_page) as `hugepunch real` does.

mod console;
mod qmp;
mod side;

use anyhow::{anyhow, bail};
use clap::ValueEnum;
use hugepunch_cli::format::{bytes, count, paragraph, seconds, table};
use serde::Serialize;
use side::{Qemu, SideReport};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How the guest frees the memory the balloon then takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Inflation {
    /// A random half of its pages: free memory in scattered 4 KiB pages,
    /// as in a guest that has run for a while.
    Scattered,
    /// The second half of its memory in one range: free memory in long
    /// physically contiguous runs.
    Contiguous,
}

/// One row group of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Its name in the table.
    pub name: String,
    /// How the guest's free memory lies.
    pub inflation: Inflation,
    /// `free-page-reporting=on` on the balloon.
    pub free_page_reporting: bool,
    /// hugepunch's budget of pending bytes (`None`: no limit).
    pub budget: Option<u64>,
    /// Run QEMU as it is too (the budget row has no stock twin).
    pub stock: bool,
}

/// The scenarios `--scenario` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioArg {
    /// Scattered free memory, no budget.
    Scattered,
    /// Contiguous free memory, no budget.
    Contiguous,
    /// Scattered, with free page reporting on.
    Reporting,
    /// Scattered, hugepunch with --budget.
    Budget,
    /// All four.
    All,
}

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
pub enum Accel {
    /// QEMU's TCG: emulation, on any host.
    Tcg,
    /// KVM.
    Kvm,
}

impl Accel {
    fn qemu_name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }

    /// KVM where it can boot an unmodified kernel, else TCG, and why.
    fn choose() -> (Accel, String) {
        if !Path::new("/dev/kvm").exists() {
            return (Accel::Tcg, "no /dev/kvm".into());
        }
        if Path::new("/sys/module/kvm_pvm").exists() {
            return (
                Accel::Tcg,
                "this host's KVM is PVM-based (module kvm_pvm) and boots no unmodified kernel"
                    .into(),
            );
        }
        (Accel::Kvm, "/dev/kvm is a standard KVM".into())
    }
}

/// The guest image vmm/qemu/guest/build.sh makes.
#[derive(Debug, Clone, Serialize)]
pub struct Guest {
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
}

/// Everything the sides share.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Guest memory, bytes.
    pub memory: u64,
    /// Bytes the balloon takes (`None`: what the guest freed, less a margin).
    pub balloon: Option<u64>,
    /// vCPUs.
    pub vcpus: u32,
    /// The accelerator.
    pub accel: Accel,
    /// Why that accelerator.
    pub accel_why: String,
    /// Inflate/deflate cycles after the reboot.
    pub cycles: u32,
    /// The longest a guest step may take.
    #[serde(skip)]
    pub timeout: Duration,
    /// The guest image.
    pub guest: Guest,
}

/// The cache directory of vmm/qemu's scripts.
fn cache() -> PathBuf {
    match std::env::var_os("HUGEPUNCH_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/hugepunch"),
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Guest memory (a multiple of 2 MiB).
    #[arg(long, default_value = "1G", value_parser = crate::number)]
    memory: u64,
    /// Bytes the balloon takes [default: what the guest's fill freed, less
    /// 48 MiB for its kernel]
    #[arg(long, value_parser = crate::number)]
    balloon: Option<u64>,
    /// The scenarios, one or more.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    scenario: Vec<ScenarioArg>,
    /// hugepunch's budget of pending bytes in the budget scenario.
    #[arg(long, default_value = "64M", value_parser = crate::number)]
    budget: u64,
    /// Run only one side [default: both]
    #[arg(long, value_parser = ["stock", "hugepunch"])]
    only: Option<String>,
    /// The accelerator [default: KVM where it boots a standard kernel, else
    /// TCG, saying why]
    #[arg(long, value_enum)]
    accel: Option<Accel>,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Inflate/deflate cycles after the reboot.
    #[arg(long, default_value_t = 1)]
    cycles: u32,
    /// QEMU with hugepunch [default: $HUGEPUNCH_CACHE/qemu/bin/qemu-system-x86_64,
    /// which vmm/qemu/build.sh builds]
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// QEMU as it is [default: Debian's /usr/bin/qemu-system-x86_64]
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/usr/bin/qemu-system-x86_64"
    )]
    stock_qemu: PathBuf,
    /// The guest image directory (vmlinuz, initramfs.cpio.gz, cmdline)
    /// [default: $HUGEPUNCH_CACHE/guest, which vmm/qemu/guest/build.sh builds]
    #[arg(long, value_name = "DIR")]
    guest: Option<PathBuf>,
    /// The longest one guest step may take, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// One JSON object: the plan and every side's figures.
    #[arg(long)]
    json: bool,
    /// A further property of the patched QEMU's balloon (`key=value`;
    /// repeatable), for tests such as `x-hugepunch-forget-on-reset=off`.
    #[arg(long, value_name = "KEY=VALUE", hide = true)]
    balloon_property: Vec<String>,
}

fn need(path: &Path, what: &str, how: &str) -> anyhow::Result<()> {
    if path.exists() {
        Ok(())
    } else {
        bail!("{what} not found at {}: {how}", path.display())
    }
}

/// The guest image in `dir`.
pub fn guest_in(dir: &Path) -> anyhow::Result<Guest> {
    let how = "build it with vmm/qemu/guest/build.sh";
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio.gz");
    need(&kernel, "the guest kernel", how)?;
    need(&initrd, "the guest initramfs", how)?;
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .map_err(|e| anyhow!("{}: {e}: {how}", dir.join("cmdline").display()))?
        .trim()
        .to_string();
    Ok(Guest {
        kernel,
        initrd,
        cmdline,
    })
}

fn scenarios(a: &Args) -> Vec<Scenario> {
    let all = a.scenario.contains(&ScenarioArg::All);
    let on = |s| all || a.scenario.contains(&s);
    let mut v = Vec::new();
    let base = |name: &str, inflation| Scenario {
        name: name.into(),
        inflation,
        free_page_reporting: false,
        budget: None,
        stock: true,
    };
    if on(ScenarioArg::Scattered) {
        v.push(base("scattered", Inflation::Scattered));
    }
    if on(ScenarioArg::Contiguous) {
        v.push(base("contiguous", Inflation::Contiguous));
    }
    if on(ScenarioArg::Reporting) {
        v.push(Scenario {
            free_page_reporting: true,
            ..base("scattered, free page reporting", Inflation::Scattered)
        });
    }
    if on(ScenarioArg::Budget) {
        v.push(Scenario {
            budget: Some(a.budget),
            stock: false,
            ..base(
                &format!("scattered, budget {}", bytes(a.budget)),
                Inflation::Scattered,
            )
        });
    }
    v
}

/// The whole run: every scenario on each QEMU.
#[derive(Debug, Serialize)]
struct Report {
    plan: Plan,
    sides: Vec<SideReport>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.memory == 0 || !a.memory.is_multiple_of(2 << 20) {
        return Err(crate::arg_error(
            "qemu",
            "--memory must be a positive multiple of 2 MiB",
        ));
    }
    if !(1..=8).contains(&a.vcpus) {
        return Err(crate::arg_error("qemu", "--vcpus must be between 1 and 8"));
    }
    let (accel, accel_why) = match a.accel {
        Some(acc) => (acc, "--accel".to_string()),
        None => Accel::choose(),
    };
    let guest = guest_in(&a.guest.clone().unwrap_or_else(|| cache().join("guest")))?;
    let plan = Plan {
        memory: a.memory,
        balloon: a.balloon,
        vcpus: a.vcpus,
        accel,
        accel_why,
        cycles: a.cycles,
        timeout: Duration::from_secs(a.timeout),
        guest,
    };
    let patched = a
        .qemu
        .clone()
        .unwrap_or_else(|| cache().join("qemu/bin/qemu-system-x86_64"));
    let debian_fw = vec![
        PathBuf::from("/usr/share/seabios"),
        PathBuf::from("/usr/share/qemu"),
    ];
    let stock = Qemu {
        name: "stock",
        binary: a.stock_qemu.clone(),
        firmware: Vec::new(),
        hugepunch: false,
        balloon_properties: Vec::new(),
    };
    let hugepunch = Qemu {
        name: "hugepunch",
        binary: patched,
        firmware: debian_fw,
        hugepunch: true,
        balloon_properties: a.balloon_property.clone(),
    };
    let want_stock = a.only.as_deref() != Some("hugepunch");
    let want_hp = a.only.as_deref() != Some("stock");
    if want_stock {
        need(&stock.binary, "QEMU", "install Debian's qemu-system-x86")?;
    }
    if want_hp {
        need(
            &hugepunch.binary,
            "QEMU with hugepunch",
            "build it with vmm/qemu/build.sh",
        )?;
    }
    let mut sides = Vec::new();
    let bar = crate::progress::spinner(!a.json, "");
    for s in scenarios(&a) {
        for q in [&stock, &hugepunch] {
            let wanted = if q.hugepunch {
                want_hp
            } else {
                want_stock && s.stock
            };
            if !wanted {
                continue;
            }
            let label = format!("{} on {}", s.name, q.name);
            let phase = |p: &str| bar.set_message(format!("{label}: {p}"));
            let r = side::run(&plan, &s, q, &phase).map_err(|e| anyhow!("{label}: {e:#}"))?;
            sides.push(r);
        }
    }
    bar.finish_and_clear();
    let report = Report { plan, sides };
    if a.json {
        crate::write_stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        crate::write_stdout(&render(&report))?;
    }
    let bad: u64 = report.sides.iter().map(|s| s.checked.bad_pages).sum();
    if bad > 0 {
        bail!("the guest found {bad} pages that did not read back what it wrote");
    }
    Ok(())
}

fn render(r: &Report) -> String {
    let p = &r.plan;
    let mut out = format!(
        "hugepunch qemu: a {} guest (Debian's kernel, {} vCPU{}) on a file of a private \
         huge=always tmpfs; accelerator {} ({}).\n\n",
        bytes(p.memory),
        p.vcpus,
        if p.vcpus == 1 { "" } else { "s" },
        p.accel.qemu_name(),
        p.accel_why
    );
    // One column per side, scenarios side by side; one row per figure.
    let header: Vec<String> = std::iter::once("".to_string())
        .chain(
            r.sides
                .iter()
                .map(|s| format!("{}: {}", s.scenario, s.qemu)),
        )
        .collect();
    let row = |name: &str, f: &dyn Fn(&SideReport) -> String| -> Vec<String> {
        std::iter::once(name.to_string())
            .chain(r.sides.iter().map(f))
            .collect()
    };
    let rows = vec![
        row("whole at start", &|s| count(s.whole_at_start)),
        row("whole after inflate", &|s| count(s.whole_after_inflate)),
        row("whole at end", &|s| count(s.whole_at_end)),
        row("split in inflate", &|s| count(s.split_in_inflate)),
        row("split in all", &|s| count(s.split)),
        row("ballooned whole (guest)", &|s| {
            s.ballooned_whole.map(count).unwrap_or_else(|| "?".into())
        }),
        row("discard calls", &|s| {
            format!(
                "{}{}",
                count(s.discards_in_inflate),
                if s.discards_counted { "" } else { "*" }
            )
        }),
        row("released", &|s| bytes(s.released)),
        row("held back", &|s| bytes(s.held_back)),
        row("inflate", &|s| seconds(s.inflate.seconds)),
        row("deflate", &|s| seconds(s.deflate.seconds)),
        row("QEMU CPU in inflate", &|s| {
            seconds(s.inflate.qemu_cpu_seconds)
        }),
        row("QEMU CPU in all", &|s| seconds(s.qemu_cpu_seconds)),
        row("pending at reboot", &|s| {
            if s.qemu == "stock" {
                "-".into()
            } else {
                bytes(s.pending_at_reset)
            }
        }),
        row("guest ns a page", &|s| {
            s.access_ns_per_page
                .map(count)
                .unwrap_or_else(|| "?".into())
        }),
        row("guest data", &|s| {
            if s.checked.bad_pages == 0 {
                format!("ok ({} checks)", s.checked.checks)
            } else {
                format!("{} BAD pages", count(s.checked.bad_pages))
            }
        }),
    ];
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    out.push_str(&table(&header, &rows));
    out.push('\n');
    out.push_str(&paragraph(
        &format!(
            "whole: huge pages of the guest's file whole (the kernel's ShmemHugePages) \
             before QEMU started, after the first inflation and before QEMU quit; split: \
             the kernel's thp_split_page during the first inflation, and over the whole run \
             (the reboot and the cycles after it included); ballooned whole: huge pages every \
             4 KiB frame of which the guest's balloon held after the first inflation (the \
             guest's /proc/kpageflags); discard calls, released (the file's allocated bytes), \
             held back (pending in hugepunch), inflate, deflate and QEMU CPU in inflate \
             (user + system, all threads): the first inflation of {} and its deflation. \
             * QEMU as it is discards each 4 KiB frame as it arrives (balloon_inflate_page): \
             one call per frame, from its code, not counted. pending at reboot: what \
             hugepunch held when the guest rebooted with its balloon inflated, which the \
             reset forgets. guest access: the guest's time to touch 64 MiB after the \
             inflation{}. guest data: the guest's checks of every byte it kept, both boots.",
            r.sides
                .first()
                .map(|s| bytes(s.inflate.bytes))
                .unwrap_or_default(),
            if p.accel == Accel::Tcg {
                " (under TCG every access is emulated: not a mapping-size figure)"
            } else {
                ""
            }
        ),
        0,
    ));
    out
}
