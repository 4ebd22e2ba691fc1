//! `hugepunch real`: the same pattern on real kernel memory, punched
//! directly and through the engine (hugepunch-linux does the work).

use anyhow::Context as _;
use hugepunch_cli::format::bytes;
use hugepunch_linux::Backend;
use hugepunch_workload::Pattern;

#[derive(clap::Args)]
pub struct Args {
    /// memfd or guest-memfd (default: guest-memfd where /dev/kvm offers it,
    /// else memfd).
    #[arg(long, value_parser = backend)]
    backend: Option<Backend>,
    /// File size (a multiple of 2 MiB; at most what the machine has
    /// available, less a margin).
    #[arg(long, default_value = "1G", value_parser = crate::number)]
    size: u64,
    /// ascending, descending, random, strided, round-robin, pin,
    /// conversion-churn, straddling, or all.
    #[arg(long, default_value = "ascending", value_parser = patterns)]
    pattern: Patterns,
    /// Seed of the random patterns (the same operations as `gen` writes
    /// for the same pattern, size and seed).
    #[arg(long, default_value_t = hugepunch_workload::DEFAULT_SEED)]
    seed: u64,
    /// One JSON object per pattern.
    #[arg(long)]
    json: bool,
}

/// The patterns `--pattern` names: one, or `all` of them.
#[derive(Debug, Clone)]
struct Patterns(Vec<Pattern>);

fn patterns(s: &str) -> Result<Patterns, String> {
    if s == "all" {
        return Ok(Patterns(Pattern::ALL.to_vec()));
    }
    s.parse()
        .map(|p| Patterns(vec![p]))
        .map_err(|e: hugepunch_workload::UnknownPattern| format!("{e}, or all"))
}

fn backend(s: &str) -> Result<Backend, String> {
    s.parse::<Backend>().map_err(|e| e.to_string())
}

/// Bytes of bookkeeping per subpage of the file besides the file itself
/// (the pattern's operations, the engine's and the backend's logs), an
/// upper estimate.
const BOOKKEEPING_PER_SUBPAGE: u64 = 128;
/// Memory left to everything else on the machine.
const RESERVE: u64 = 256 << 20;

/// `MemAvailable` of /proc/meminfo, in bytes, if known.
fn mem_available() -> Option<u64> {
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
fn check_memory(size: u64, available: Option<u64>) -> anyhow::Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    let need = memory_needed(size);
    if need > available {
        anyhow::bail!(
            "--size {} needs about {} of memory, more than is available here ({} MemAvailable in /proc/meminfo); use a smaller --size",
            bytes(size),
            bytes(need),
            bytes(available)
        );
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    check_memory(a.size, mem_available())?;
    let backend = a.backend.unwrap_or_else(Backend::default_here);
    for p in a.pattern.0 {
        let spinner = crate::progress::spinner(!a.json, &format!("real {p} on {backend}"));
        let report = hugepunch_linux::real::run_seeded(backend, a.size, p, a.seed)
            .with_context(|| format!("real {p} on {backend}"))?;
        spinner.finish_and_clear();
        if a.json {
            crate::write_stdout(&format!("{}\n", serde_json::to_string(&report)?))?;
        } else {
            crate::write_stdout(&format!("{}\n", report.table()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
