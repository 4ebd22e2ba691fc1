//! `hugepunch vm`: a real guest on KVM guest_memfd or on ordinary guest
//! memory (THP, memfd, a file) giving memory back, the VMM releasing it
//! 4 KiB at a time as VMMs do today and through the engine, side by side
//! (hugepunch-linux's `vm` module does the work).

use crate::memory_args::{MemoryArgs, PatternArgs};
use anyhow::Context as _;
use hugepunch_cli::format::{bytes, count, paragraph, seconds, table};
use hugepunch_linux::vm::{KvmMappings, VmOptions, VmReport, VmSide};
use hugepunch_linux::Backend;

/// The help of `--backend` here: the shared text and this command's default.
const BACKEND_HELP: &str = "The guest's memory: guest-memfd (its own memslot), or thp (a private \
huge=always tmpfs, root only), memfd, or file (a file in --path, as QEMU's mem-path=) through an \
ordinary memslot over the VMM's mapping [default: guest-memfd where KVM offers it, else thp where \
this process may mount, else memfd, saying why]";

#[derive(clap::Args)]
#[command(mut_arg("backend", |a| a.help(BACKEND_HELP)))]
pub struct Args {
    #[command(flatten)]
    memory: MemoryArgs,
    /// vCPUs, each on its own thread (pages are dealt to them round-robin,
    /// so they give back neighbouring pages of the same huge pages).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    vcpus: u8,
    /// Guest memory (a multiple of 2 MiB, at most 64G).
    #[arg(long, default_value = "256M", value_parser = crate::number)]
    size: u64,
    /// The order in which the guest gives pages back (a pattern, or all of
    /// them one after the other), its seed, JSON output.
    #[command(flatten)]
    run: PatternArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let asked = a.memory.asked("vm")?;
    crate::real::check_memory(a.size, crate::real::mem_available())?;
    let backend = match asked {
        Some(Backend::GuestMemfd) => {
            if let Some(why) = hugepunch_linux::guest_memfd_unavailable() {
                anyhow::bail!(
                    "vm --backend guest-memfd needs KVM with mmap()able guest_memfd: {why}. It \
                     needs read and write access to /dev/kvm (root, or the kvm group) and a \
                     kernel offering GUEST_MEMFD_FLAG_MMAP and GUEST_MEMFD_FLAG_INIT_SHARED \
                     (Linux 6.18); --backend thp, memfd or file run on any KVM"
                );
            }
            Backend::GuestMemfd
        }
        Some(b) => b,
        None => {
            let (b, why) = hugepunch_linux::vm::default_backend();
            let note = format!("guest memory: {b}, because {why}");
            if a.run.json {
                // Standard output is the JSON objects only.
                eprintln!("hugepunch: {note}");
            } else {
                crate::write_stdout(&format!("{}\n", paragraph(&note, 2)))?;
            }
            b
        }
    };
    for p in a.run.pattern.0 {
        let opts = VmOptions {
            backend: backend.clone(),
            size: a.size,
            vcpus: a.vcpus.into(),
            pattern: p,
            seed: a.run.seed,
        };
        let bar = crate::progress::bar(1, !a.run.json, "");
        let report = hugepunch_linux::vm::run(&opts, &|side, done, total| {
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(format!("{p} {side}"));
        })
        .with_context(|| format!("vm {p}"))?;
        bar.finish_and_clear();
        if a.run.json {
            crate::write_stdout(&format!("{}\n", serde_json::to_string(&report)?))?;
        } else {
            crate::write_stdout(&format!("{}\n", render(&report)))?;
        }
    }
    Ok(())
}

/// Per GiB given back.
fn per_gib(v: f64, s: &VmSide) -> f64 {
    let gib = (s.give_backs * 4096) as f64 / (1u64 << 30) as f64;
    if gib > 0.0 {
        v / gib
    } else {
        0.0
    }
}

fn stat(s: &VmSide, k: &str) -> u64 {
    s.kvm.get(k).copied().unwrap_or(0)
}

fn render(r: &VmReport) -> String {
    let (d, e) = (&r.direct, &r.engine);
    let mut out = paragraph(
        &format!(
            "hugepunch vm: pattern {} (seed {}), {} of {} guest memory ({}; {}), {} vCPU{} at \
             CPL{}, kernel {}, {} CPUs",
            r.pattern,
            r.seed,
            bytes(r.size),
            r.backend,
            r.huge_backing,
            r.memslot,
            r.vcpus,
            if r.vcpus == 1 { "" } else { "s" },
            r.guest_cpl,
            r.kernel,
            r.cpus
        ),
        2,
    );
    out += &paragraph(&format!("invalidation: {}", r.invalidation), 2);
    if let Some(note) = &r.huge_figures_note {
        out += &paragraph(&format!("note: {note}"), 2);
    }
    out.push('\n');
    let row = |name: &str, a: String, b: String, c: String| vec![name.to_string(), a, b, c];
    let ratio = |a: f64, b: f64, more: &str| {
        if b > 0.0 {
            format!("{:.1}x {more}", a / b)
        } else {
            "-".into()
        }
    };
    let counter = |name: &str, key: &str, per: bool| {
        let (a, b) = (stat(d, key) as f64, stat(e, key) as f64);
        if per {
            row(
                name,
                count(per_gib(a, d).round() as u64),
                count(per_gib(b, e).round() as u64),
                ratio(a, b, "fewer"),
            )
        } else {
            row(name, count(a as u64), count(b as u64), ratio(a, b, "fewer"))
        }
    };
    let rows = vec![
        row(
            "wall time (after setup)",
            seconds(d.wall_seconds),
            seconds(e.wall_seconds),
            ratio(d.wall_seconds, e.wall_seconds, "faster"),
        ),
        row(
            "host time releasing",
            seconds(d.release_seconds),
            seconds(e.release_seconds),
            ratio(d.release_seconds, e.release_seconds, "less"),
        ),
        row(
            "  per GiB given back",
            seconds(per_gib(d.release_seconds, d)),
            seconds(per_gib(e.release_seconds, e)),
            String::new(),
        ),
        row(
            "  of which in fallocate",
            seconds(d.fallocate_seconds),
            seconds(e.fallocate_seconds),
            String::new(),
        ),
        row(
            "host time taking back",
            seconds(d.take_back_seconds),
            seconds(e.take_back_seconds),
            String::new(),
        ),
        row(
            "guest time per give-back",
            format!("{:.1} us", d.guest_us_per_give_back),
            format!("{:.1} us", e.guest_us_per_give_back),
            String::new(),
        ),
        row(
            "pages given / taken back",
            format!("{} / {}", count(d.give_backs), count(d.take_backs)),
            format!("{} / {}", count(e.give_backs), count(e.take_backs)),
            String::new(),
        ),
        row(
            "fallocate calls",
            count(d.fallocate_calls),
            count(e.fallocate_calls),
            ratio(d.fallocate_calls as f64, e.fallocate_calls as f64, "fewer"),
        ),
        row(
            "bytes released",
            bytes(d.bytes_released),
            bytes(e.bytes_released),
            String::new(),
        ),
        row(
            "still held, deferred",
            bytes(d.pending_bytes),
            bytes(e.pending_bytes),
            String::new(),
        ),
        row(
            "held, not used by the guest",
            bytes(d.held_unused_bytes),
            bytes(e.held_unused_bytes),
            String::new(),
        ),
        counter("KVM: exits", "exits", false),
        counter(
            "  remote TLB flush requests / GiB",
            "remote_tlb_flush_requests",
            true,
        ),
        counter("  TLB flushes / GiB", "tlb_flush", true),
        counter("  page faults taken", "pf_taken", false),
    ];
    let mut rows = rows;
    rows.extend(huge_rows(d, e));
    rows.extend([row(
        "guest data kept / zeroed",
        format!(
            "{} / {}",
            count(d.data.kept_pages),
            count(d.data.taken_back_zeroed)
        ),
        format!(
            "{} / {}",
            count(e.data.kept_pages),
            count(e.data.taken_back_zeroed)
        ),
        "checked".into(),
    )]);
    out += &table(&["", "direct 4 KiB", "hugepunch", "ratio"], &rows);
    out
}

/// The kernel's huge page figures (THP, hugetlb) and the mappings KVM
/// keeps, where this host has them.
fn huge_rows(d: &VmSide, e: &VmSide) -> Vec<Vec<String>> {
    let row = |name: &str, a: String, b: String| vec![name.to_string(), a, b, String::new()];
    let mut rows = Vec::new();
    if let (Some(dk), Some(ek)) = (&d.kernel, &e.kernel) {
        let n = |k: &hugepunch_linux::huge_counters::KernelHuge, v: u64| {
            format!("{} / {}", count(v), count(k.whole_at_start))
        };
        rows.push(row(
            "kernel: huge pages whole at start",
            count(dk.whole_at_start),
            count(ek.whole_at_start),
        ));
        rows.push(row(
            "  split (thp_split_page)",
            n(dk, dk.split),
            n(ek, ek.split),
        ));
        rows.push(row(
            "  freed whole",
            n(dk, dk.freed_whole),
            n(ek, ek.freed_whole),
        ));
        rows.push(row(
            "  still whole at the end",
            n(dk, dk.whole_at_end),
            n(ek, ek.whole_at_end),
        ));
    }
    let maps = |m: &Option<KvmMappings>| match m {
        Some(m) => format!("{} / {}", count(m.pages_2m), count(m.pages_4k)),
        None => "-".into(),
    };
    if d.kvm_mappings_at_start.is_some() || e.kvm_mappings_at_start.is_some() {
        rows.push(row(
            "KVM: 2 MiB / 4 KiB mappings at start",
            maps(&d.kvm_mappings_at_start),
            maps(&e.kvm_mappings_at_start),
        ));
        rows.push(row(
            "  at the end (pages_2m / pages_4k)",
            maps(&d.kvm_mappings_at_end),
            maps(&e.kvm_mappings_at_end),
        ));
    }
    rows
}
