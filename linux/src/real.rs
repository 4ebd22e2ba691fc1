//! `hugepunch real`: one pattern, twice, on fresh real files in one process —
//! once punching directly as a VMM does today (one `fallocate` per punch
//! request, 4 KiB for every pattern but `straddling`), once through the
//! engine — and what each cost and released. The pattern's operations are
//! [`hugepunch_workload::Pattern`]'s, the same as `hugepunch gen` writes
//! for the same size and seed.
//!
//! Method: each side gets a fresh file of `size` bytes, fully allocated
//! with one `fallocate` and mapped (one read per 4 KiB through the
//! backend's shared mapping, as a VMM maps guest memory) before the clock
//! starts (the engine's default "populated" start). Populates allocate with
//! `fallocate`; on guest_memfd the backend then faults the pages in (see
//! [`LinuxHost`]). Only the replay of the pattern is timed; the
//! released bytes are measured on the file itself (`st_blocks` for memfd,
//! `mincore` for guest_memfd) before and after. The engine side ends
//! without teardown: what it still defers is reported as pending, not as
//! released. The first file is closed before the second is made.

use crate::host::{Backend, HugeBacking, LinuxHost, SetupError, HUGE_PAGE_SIZE};
use crate::pattern::{ops as pattern_ops, replay_direct, replay_engine};
use hugepunch::{Config, HugePunch, Stats, SUBPAGE_SIZE};
use hugepunch_workload::{Op, Pattern, UnknownPattern, DEFAULT_SEED};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Why a real run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RealError {
    /// The host could not be built.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// Not a pattern.
    #[error(transparent)]
    Pattern(#[from] UnknownPattern),
    /// A syscall outside the replay failed.
    #[error("{step} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Syscall {
        /// What was being done.
        step: &'static str,
        /// The errno.
        errno: i32,
    },
    /// The engine refused the file.
    #[error("engine: {0}")]
    Engine(#[from] hugepunch::Error),
}

/// What one side (direct or engine) did.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// `direct` or `hugepunch`.
    pub strategy: &'static str,
    /// Wall time of the replay, seconds.
    pub wall_seconds: f64,
    /// Of which inside `fallocate`, seconds.
    pub fallocate_seconds: f64,
    /// Of which zeroing un-punched subpages through the mapping, seconds.
    pub zero_seconds: f64,
    /// Of which faulting in guest_memfd allocations, seconds.
    pub fault_seconds: f64,
    /// The rest: the strategy's own work (the engine's bookkeeping, or the
    /// direct replay's loop), seconds.
    pub own_seconds: f64,
    /// `fallocate` calls (punches and allocations).
    pub fallocate_calls: u64,
    /// Of which punches.
    pub punch_calls: u64,
    /// Of which allocations.
    pub allocate_calls: u64,
    /// Bytes the file held before the replay minus after (measured on the file).
    pub bytes_released: u64,
    /// Bytes the file holds after the replay (measured).
    pub resident_bytes: u64,
    /// Bytes punched but still held, deferred (the engine's pending; 0 direct).
    pub pending_bytes: u64,
    /// Huge pages in the file.
    pub huge_pages: u64,
    /// Huge pages a partial free broke into 4 KiB pieces (from the
    /// backend's log of frees: what a huge-page-backed host must split).
    pub huge_pages_split: u64,
    /// Huge pages the kernel still backs with a huge page after the replay
    /// (THP: `ShmemHugePages`, hugetlb: pages in use, from /proc/meminfo);
    /// `None` when the file has no huge page backing here.
    pub huge_pages_kept_intact: Option<u64>,
}

/// Direct over engine (or engine over direct where more is better).
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// direct fallocate calls / engine fallocate calls (`None`: engine made none).
    pub fallocate_calls: Option<f64>,
    /// direct wall time / engine wall time (> 1: the engine was faster).
    pub wall_time: Option<f64>,
    /// engine bytes released / direct bytes released (`None`: direct released none).
    pub bytes_released: Option<f64>,
    /// The engine's own time as a share of its run (0.01 = 1%).
    pub engine_own_share: f64,
}

/// The side-by-side figures of one real run.
#[derive(Debug, Clone, Serialize)]
pub struct RealReport {
    /// `uname -r`.
    pub kernel: String,
    /// CPUs online.
    pub cpus: usize,
    /// Backend used.
    pub backend: Backend,
    /// File size in bytes.
    pub size: u64,
    /// Pattern name.
    pub pattern: String,
    /// Seed of the pattern (what `random`, `pin` and `straddling` draw).
    pub seed: u64,
    /// Operations in the pattern.
    pub operations: u64,
    /// Huge page backing of the files, for humans.
    pub huge_backing: String,
    /// Whether the files really had huge page backing.
    pub huge_backing_available: bool,
    /// Whether the guest_memfd was bound to a KVM memslot.
    pub memslot: bool,
    /// Punching directly.
    pub direct: Side,
    /// Through the engine.
    pub engine: Side,
    /// The ratios.
    pub ratios: Ratios,
    /// The engine's statistics after the replay.
    pub engine_stats: Stats,
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines().find_map(|l| {
        l.strip_prefix(key)?
            .strip_prefix(':')?
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Huge pages the kernel backs with huge pages now, system wide, for the
/// kind of backing the file has.
fn huge_pages_in_use(backing: &HugeBacking) -> Option<u64> {
    match backing {
        HugeBacking::None(_) => None,
        HugeBacking::Thp(_) => Some(meminfo_kib("ShmemHugePages")? * 1024 / HUGE_PAGE_SIZE),
        HugeBacking::Hugetlb(_) => {
            Some(meminfo_kib("HugePages_Total")?.saturating_sub(meminfo_kib("HugePages_Free")?))
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn run_side(
    backend: Backend,
    size: u64,
    ops: &[Op],
    through_engine: bool,
) -> Result<(Side, LinuxHost, Option<Stats>), RealError> {
    let before_file = huge_pages_in_use(&crate::host::memfd_huge_backing(size));
    let host = Arc::new(LinuxHost::open(backend, size)?);
    host.populate_all().map_err(|e| RealError::Syscall {
        step: "fallocate (populate the file)",
        errno: e.errno,
    })?;
    let resident_before = host.resident_bytes().map_err(|errno| RealError::Syscall {
        step: "measure residency",
        errno,
    })?;
    let c0 = host.counts();
    let (wall, stats, pending) = if through_engine {
        let engine = HugePunch::new(Config::new(size), host.clone())?;
        let t = Instant::now();
        replay_engine(&engine, ops);
        let wall = t.elapsed();
        let stats = engine.stats();
        let pending = stats.pending_subpages * SUBPAGE_SIZE;
        drop(engine);
        (wall, Some(stats), pending)
    } else {
        let t = Instant::now();
        replay_direct(&host, ops);
        (t.elapsed(), None, 0)
    };
    let c = host.counts();
    let resident = host.resident_bytes().map_err(|errno| RealError::Syscall {
        step: "measure residency",
        errno,
    })?;
    let backing = host.info().huge_backing.clone();
    let kept = match (huge_pages_in_use(&backing), before_file) {
        (Some(now), Some(before)) => Some(now.saturating_sub(before)),
        _ => None,
    };
    let fallocate_seconds = (c.fallocate_nanos - c0.fallocate_nanos) as f64 / 1e9;
    let zero_seconds = (c.zero_nanos - c0.zero_nanos) as f64 / 1e9;
    let fault_seconds = (c.fault_nanos - c0.fault_nanos) as f64 / 1e9;
    let wall_seconds = wall.as_secs_f64();
    let side = Side {
        strategy: if through_engine {
            "hugepunch"
        } else {
            "direct"
        },
        wall_seconds,
        fallocate_seconds,
        zero_seconds,
        fault_seconds,
        own_seconds: (wall_seconds - fallocate_seconds - zero_seconds - fault_seconds).max(0.0),
        fallocate_calls: c.fallocate_calls() - c0.fallocate_calls(),
        punch_calls: c.punch_calls - c0.punch_calls,
        allocate_calls: c.allocate_calls - c0.allocate_calls,
        bytes_released: resident_before.saturating_sub(resident),
        resident_bytes: resident,
        pending_bytes: pending,
        huge_pages: size / HUGE_PAGE_SIZE,
        huge_pages_split: c.huge_pages_split,
        huge_pages_kept_intact: kept,
    };
    let host = Arc::try_unwrap(host).unwrap_or_else(|_| unreachable!("the engine was dropped"));
    Ok((side, host, stats))
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// Run the pattern named `pattern_name`, with the default seed
/// ([`DEFAULT_SEED`]), on two fresh files of `size` bytes (a multiple of
/// 2 MiB) of `backend`; see [`run_seeded`].
pub fn run(backend: Backend, size: u64, pattern_name: &str) -> Result<RealReport, RealError> {
    run_seeded(backend, size, pattern_name.parse()?, DEFAULT_SEED)
}

/// Run `pattern` with `seed` on two fresh files of `size` bytes (a
/// multiple of 2 MiB) of `backend`: directly, then through the engine. See
/// the module documentation for the method.
pub fn run_seeded(
    backend: Backend,
    size: u64,
    pattern: Pattern,
    seed: u64,
) -> Result<RealReport, RealError> {
    let ops = pattern_ops(pattern, size, seed)?;
    let (direct, host, _) = run_side(backend, size, &ops, false)?;
    let info = host.info().clone();
    drop(host);
    let (engine, host, stats) = run_side(backend, size, &ops, true)?;
    drop(host);
    let ratios = Ratios {
        fallocate_calls: ratio(direct.fallocate_calls as f64, engine.fallocate_calls as f64),
        wall_time: ratio(direct.wall_seconds, engine.wall_seconds),
        bytes_released: ratio(engine.bytes_released as f64, direct.bytes_released as f64),
        engine_own_share: ratio(engine.own_seconds, engine.wall_seconds).unwrap_or(0.0),
    };
    Ok(RealReport {
        kernel: kernel_release(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        backend,
        size,
        pattern: pattern.name().to_string(),
        seed,
        operations: ops.len() as u64,
        huge_backing: info.huge_backing.describe(),
        huge_backing_available: info.huge_backing.available(),
        memslot: info.memslot,
        direct,
        engine,
        ratios,
        engine_stats: stats.expect("the engine side has statistics"),
    })
}
