//! `hugepunch real`: the same pattern on real kernel memory, punched
//! directly and through the engine (hugepunch-linux does the work).

use crate::memory_args::{self, MemoryArgs, PatternArgs};
use anyhow::Context as _;
use hugepunch_cli::format::{bytes, count, paragraph, seconds, table};
use hugepunch_linux::{Backend, RealReport, RunOptions};

#[derive(clap::Args)]
#[command(mut_arg("backend", |a| memory_args::with_default(
    a,
    "guest-memfd where /dev/kvm offers it, else memfd, saying why"
)))]
pub struct Args {
    #[command(flatten)]
    memory: MemoryArgs,
    /// The engine's pending-memory budget (bytes, e.g. 64M): over it the
    /// engine frees pending punches 4 KiB at a time, splitting huge pages as
    /// direct punching does [default: none]
    #[arg(long, value_parser = crate::number)]
    budget: Option<u64>,
    /// File size (a multiple of 2 MiB; at most what the machine has
    /// available, less a margin).
    #[arg(long, default_value = "1G", value_parser = crate::number)]
    size: u64,
    #[command(flatten)]
    run: PatternArgs,
}

/// Bytes of bookkeeping per subpage of the file besides the file itself
/// (the pattern's operations, the engine's and the backend's logs), an
/// upper estimate.
const BOOKKEEPING_PER_SUBPAGE: u64 = 128;
/// Memory left to everything else on the machine.
const RESERVE: u64 = 256 << 20;

/// `MemAvailable` of /proc/meminfo, in bytes, if known.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// What a run of a `size` file needs: the file (the two sides run one
/// after the other, each on a fresh file) and the bookkeeping.
pub fn memory_needed(size: u64) -> u64 {
    size.saturating_add((size / 4096).saturating_mul(BOOKKEEPING_PER_SUBPAGE))
        .saturating_add(RESERVE)
}

/// Refuse a size the machine cannot hold: the files are real memory
/// (guest_memfd and memfd pages are neither reclaimable nor swapped here),
/// and running out would end in the kernel's OOM killer with no message.
pub fn check_memory(size: u64, available: Option<u64>) -> anyhow::Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    let need = memory_needed(size);
    if need > available {
        return Err(crate::arg_error(
            "real",
            format!(
                "--size {} needs about {} of memory, more than is available here ({} MemAvailable in /proc/meminfo); use a smaller --size",
                bytes(size),
                bytes(need),
                bytes(available)
            ),
        ));
    }
    Ok(())
}

/// The backend to run on: the one asked for, else guest-memfd where it
/// works here, else memfd with the reason guest-memfd was passed over
/// (`unavailable` is [`hugepunch_linux::guest_memfd_unavailable`]'s answer).
fn choose_backend(
    asked: Option<Backend>,
    unavailable: impl FnOnce() -> Option<String>,
) -> (Backend, Option<String>) {
    match asked {
        Some(b) => (b, None),
        None => match unavailable() {
            None => (Backend::GuestMemfd, None),
            Some(why) => (
                Backend::Memfd,
                Some(format!(
                    "note: running on memfd, not KVM guest_memfd: {why}. guest_memfd needs \
                     read and write access to /dev/kvm (root, or the kvm group) and a kernel \
                     that offers mmap()able guest_memfd (GUEST_MEMFD_FLAG_MMAP and \
                     GUEST_MEMFD_FLAG_INIT_SHARED); --backend memfd says so and hides this note."
                )),
            ),
        },
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    check_memory(a.size, mem_available())?;
    let asked = a.memory.asked("real")?;
    let (backend, note) = choose_backend(asked, hugepunch_linux::guest_memfd_unavailable);
    if let Some(note) = note {
        if a.run.json {
            // Standard output is the JSON objects only.
            eprintln!("hugepunch: {note}");
        } else {
            crate::write_stdout(&format!("{}\n", paragraph(&note, 2)))?;
        }
    }
    let mut footnote = false;
    let mut kernel_note = false;
    for p in a.run.pattern.0 {
        let spinner = crate::progress::spinner(!a.run.json, &format!("real {p} on {backend}"));
        let report = hugepunch_linux::real::run_with(&RunOptions {
            backend: backend.clone(),
            size: a.size,
            pattern: p,
            seed: a.run.seed,
            budget: a.budget,
        })
        .with_context(|| format!("real {p} on {backend}"))?;
        spinner.finish_and_clear();
        if a.run.json {
            crate::write_stdout(&format!("{}\n", serde_json::to_string(&report)?))?;
        } else {
            footnote |= !report.huge_backing_available;
            kernel_note |= report.direct.kernel.is_some();
            crate::write_stdout(&format!("{}\n", render(&report)))?;
        }
    }
    if footnote {
        // Once, after every table it applies to.
        crate::write_stdout(&paragraph(
            "(no huge page backing here: \"huge pages split\" counts the huge pages a partial \
             free would split on a huge-page-backed host, from the backend's log of frees; \
             --backend thp runs on real transparent huge pages)",
            1,
        ))?;
    } else if kernel_note {
        crate::write_stdout(&paragraph(
            "(kernel: /proc/meminfo ShmemHugePages or HugePages in use, and /proc/vmstat \
             thp_split_page, read before and after each side and sampled every millisecond \
             during it; system-wide counters, so the figures are the run's while nothing else \
             on the machine makes or splits huge pages)",
            1,
        ))?;
    }
    Ok(())
}

/// `r`x `more` (r >= 1), or 1/r x `less`; `-` when there is no ratio.
fn times(r: Option<f64>, more: &str, less: &str) -> String {
    match r {
        None => "-".into(),
        Some(r) if r >= 1.0 => format!("{r:.1}x {more}"),
        Some(r) => format!("{:.1}x {less}", 1.0 / r),
    }
}

/// The wall-time ratio, in words: "faster" or "slower" only when both
/// sides released the same bytes (a side that released less did less of
/// the work, and one that released nothing did none of it).
fn wall_time_ratio(r: &RealReport) -> String {
    let (d, e) = (r.direct.bytes_released, r.engine.bytes_released);
    if d == e && d > 0 {
        times(r.ratios.wall_time, "faster", "slower")
    } else if e == 0 && d > 0 {
        "not compared: hugepunch released nothing".into()
    } else if d == 0 && e > 0 {
        "not compared: direct released nothing".into()
    } else if d == 0 {
        "not compared: neither released anything".into()
    } else {
        format!("not compared: released {} and {}", bytes(d), bytes(e))
    }
}

/// Subpages kept with their data / given back and read as zeros.
fn data(s: &hugepunch_linux::real::Side) -> String {
    format!(
        "{} / {}",
        count(s.data.kept_subpages),
        count(s.data.zeroed_subpages)
    )
}

/// The side-by-side report of one run for people, [`format::width`]
/// columns at most.
///
/// [`format::width`]: hugepunch_cli::format::width
fn render(r: &RealReport) -> String {
    let (d, e) = (&r.direct, &r.engine);
    let mut out = paragraph(
        &format!(
            "hugepunch real: pattern {} (seed {}), {} {} ({} operations), kernel {}, {} CPUs{}",
            r.pattern,
            r.seed,
            bytes(r.size),
            r.backend,
            count(r.operations),
            r.kernel,
            r.cpus,
            if r.memslot {
                ", guest_memfd bound to a KVM memslot"
            } else {
                ""
            }
        ),
        2,
    );
    out += &paragraph(
        &format!(
            "huge page backing: {}{}{}",
            r.huge_backing,
            if r.huge_page_size != 2 << 20 {
                format!(", {} pages", bytes(r.huge_page_size))
            } else {
                String::new()
            },
            r.budget.map_or(String::new(), |b| format!(
                "; hugepunch budget {}",
                bytes(b)
            ))
        ),
        2,
    );
    out.push('\n');
    let row = |name: &str, a: String, b: String, ratio: String| vec![name.to_string(), a, b, ratio];
    let mut rows = vec![
        row(
            "wall time",
            seconds(d.wall_seconds),
            seconds(e.wall_seconds),
            wall_time_ratio(r),
        ),
        row(
            "  in fallocate",
            seconds(d.fallocate_seconds),
            seconds(e.fallocate_seconds),
            String::new(),
        ),
        row(
            "  zeroing",
            seconds(d.zero_seconds),
            seconds(e.zero_seconds),
            String::new(),
        ),
        row(
            "  faulting in",
            seconds(d.fault_seconds),
            seconds(e.fault_seconds),
            String::new(),
        ),
        row(
            "  own work",
            seconds(d.own_seconds),
            seconds(e.own_seconds),
            format!(
                "hugepunch: {:.1}% of its run",
                r.ratios.engine_own_share * 100.0
            ),
        ),
        row(
            "fallocate calls",
            count(d.fallocate_calls),
            count(e.fallocate_calls),
            times(r.ratios.fallocate_calls, "fewer", "more"),
        ),
        row(
            "  punches",
            count(d.punch_calls),
            count(e.punch_calls),
            String::new(),
        ),
        row(
            "  allocations",
            count(d.allocate_calls),
            count(e.allocate_calls),
            String::new(),
        ),
        row(
            "bytes released",
            bytes(d.bytes_released),
            bytes(e.bytes_released),
            r.ratios
                .bytes_released
                .map_or("-".into(), |x| format!("{x:.3} of direct")),
        ),
        row(
            "still held, deferred",
            bytes(d.pending_bytes),
            bytes(e.pending_bytes),
            String::new(),
        ),
        row("data kept / zeroed", data(d), data(e), "checked".into()),
    ];
    match (&d.kernel, &e.kernel) {
        (Some(dk), Some(ek)) => {
            let n = |k: &hugepunch_linux::huge_counters::KernelHuge, v: u64| {
                format!("{} / {}", count(v), count(k.whole_at_start))
            };
            rows.extend([
                row(
                    "kernel: huge pages whole at start",
                    count(dk.whole_at_start),
                    count(ek.whole_at_start),
                    format!("of {}", count(d.huge_pages)),
                ),
                row(
                    "  split (thp_split_page)",
                    n(dk, dk.split),
                    n(ek, ek.split),
                    format!("pattern touches {}", count(r.huge_pages_touched)),
                ),
                row(
                    "  split, unreleased (sampled, >=)",
                    count(dk.split_unreleased_peak),
                    count(ek.split_unreleased_peak),
                    format!("{} + {} samples", count(dk.samples), count(ek.samples)),
                ),
                row(
                    "  freed whole",
                    n(dk, dk.freed_whole),
                    n(ek, ek.freed_whole),
                    String::new(),
                ),
                row(
                    "  still whole at the end",
                    n(dk, dk.whole_at_end),
                    n(ek, ek.whole_at_end),
                    String::new(),
                ),
            ]);
        }
        _ => rows.push(row(
            "huge pages split",
            format!("{} / {}", count(d.huge_pages_split), count(d.huge_pages)),
            format!("{} / {}", count(e.huge_pages_split), count(e.huge_pages)),
            "backend's log".into(),
        )),
    }
    out += &table(&["", "direct 4 KiB", "hugepunch", "ratio"], &rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user who cannot open /dev/kvm is told why `real` runs on memfd.
    #[test]
    fn the_fallback_to_memfd_says_why() {
        let why = || Some("open /dev/kvm failed: Permission denied (os error 13)".to_string());
        let (b, note) = choose_backend(None, why);
        assert_eq!(b, Backend::Memfd);
        let note = note.expect("a reason");
        assert!(
            note.contains("Permission denied") && note.contains("/dev/kvm"),
            "{note}"
        );
        assert_eq!(choose_backend(None, || None), (Backend::GuestMemfd, None));
        assert_eq!(
            choose_backend(Some(Backend::Memfd), || panic!("not asked")),
            (Backend::Memfd, None)
        );
    }

    #[test]
    fn sizes_beyond_the_memory_available_are_refused() {
        let gib = 1u64 << 30;
        assert!(check_memory(gib, Some(24 * gib)).is_ok());
        let e = check_memory(100 * gib, Some(24 * gib))
            .unwrap_err()
            .to_string();
        assert!(e.contains("100 GiB") && e.contains("24 GiB"), "{e}");
        assert!(
            check_memory(24 * gib, Some(24 * gib)).is_err(),
            "no margin left"
        );
        assert!(check_memory(u64::MAX, Some(24 * gib)).is_err());
        assert!(
            check_memory(100 * gib, None).is_ok(),
            "unknown: the backend decides"
        );
        assert!(
            mem_available().is_some_and(|m| m > 0),
            "Linux has MemAvailable"
        );
    }
}
