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
//!
//! Every subpage is written with its own byte before the clock starts, as
//! a guest's memory holds data; after the replay every subpage the pattern
//! did not give back must still hold it, and every subpage given back and
//! then taken back (populated) must read zeros ([`DataCheck`]; a run that
//! finds otherwise fails with [`RealError::DataLost`]).
//!
//! Where the file has huge pages (THP on a `huge=` tmpfs, hugetlbfs), the
//! kernel's own counters say what stayed whole ([`KernelHuge`], read as
//! the [`huge_counters`](crate::huge_counters) module says: system wide, so the figures
//! are the run's while nothing else on the machine makes or splits huge
//! pages).

use crate::host::{Backend, LinuxHost, SetupError};
use crate::huge_counters::{HugeCounters, KernelHuge, Sampler, Samples};
use crate::replay::{ops_in, replay_direct, replay_engine};
use hugepunch::{ByteRange, Geometry, HugePunch, Stats, SUBPAGE_SIZE};
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
    /// A pattern's operations could not be made.
    #[error(transparent)]
    Ops(#[from] crate::replay::PatternError),
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
    /// Memory the guest did not give back lost its data, or memory given
    /// back and taken back did not read zeros.
    #[error("{strategy}: {bad} subpages did not read back as written or as zeros; the first at offset {first:#x} ({what})")]
    DataLost {
        /// `direct` or `hugepunch`.
        strategy: &'static str,
        /// Subpages that did not read back right.
        bad: u64,
        /// The first of them.
        first: u64,
        /// What it should have held.
        what: &'static str,
    },
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
    /// Huge pages a partial free broke into pieces, from the backend's own
    /// log of frees (what a huge-page-backed file must split; where the
    /// file has huge pages, [`kernel`](Self::kernel) has the kernel's count).
    pub huge_pages_split: u64,
    /// What the kernel counted about the file's huge pages; `None` where
    /// the file has none.
    pub kernel: Option<KernelHuge>,
    /// The data check after the replay.
    pub data: DataCheck,
}

/// What the file held after the replay, subpage by subpage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DataCheck {
    /// Subpages never given back: each read back as written.
    pub kept_subpages: u64,
    /// Subpages given back, then populated: each read zeros.
    pub zeroed_subpages: u64,
    /// Subpages given back and not taken back (not read: a read would
    /// allocate them again on some backends, and their content is gone).
    pub given_back_subpages: u64,
    /// Bytes read and compared.
    pub bytes_checked: u64,
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
    /// direct time inside `fallocate` / engine time inside `fallocate`.
    pub fallocate_time: Option<f64>,
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
    /// The pattern (or workload: `conversion-stream`) replayed.
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
    /// The huge page size of the files (and the engine's geometry).
    pub huge_page_size: u64,
    /// The engine's pending-memory budget, if one was set.
    pub budget: Option<u64>,
    /// Huge pages the pattern punches at least one subpage of: what direct
    /// 4 KiB punching splits on a huge-page-backed file.
    pub huge_pages_touched: u64,
    /// Punching directly.
    pub direct: Side,
    /// Through the engine.
    pub engine: Side,
    /// The ratios.
    pub ratios: Ratios,
    /// The engine's statistics after the replay.
    pub engine_stats: Stats,
}

pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// What one subpage must hold after the replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// What was written before the replay.
    Data,
    /// Given back and not taken back: not checked.
    GivenBack,
    /// Given back, then populated: zeros.
    Zeros,
}

/// Subpage `s`'s own byte: never zero, different for neighbours.
fn tag(s: u64) -> u8 {
    (s.wrapping_mul(151) % 255) as u8 + 1
}

/// What every subpage must hold after `ops`, starting from data.
fn expectations(ops: &[Op], size: u64) -> Vec<Expect> {
    let mut e = vec![Expect::Data; (size / SUBPAGE_SIZE) as usize];
    let subs = |offset: u64, len: u64| {
        (offset / SUBPAGE_SIZE) as usize..((offset + len) / SUBPAGE_SIZE) as usize
    };
    for op in ops {
        match *op {
            Op::Punch { offset, len } => e[subs(offset, len)].fill(Expect::GivenBack),
            Op::Populate { offset, len } => {
                for x in &mut e[subs(offset, len)] {
                    if *x == Expect::GivenBack {
                        *x = Expect::Zeros;
                    }
                }
            }
            Op::Teardown => e.fill(Expect::GivenBack),
            Op::Convert { .. } | Op::Flush { .. } => {}
        }
    }
    e
}

/// Write every subpage with its own byte (before the clock).
fn write_data(host: &LinuxHost) {
    for s in 0..host.size() / SUBPAGE_SIZE {
        host.fill(ByteRange::new(s * SUBPAGE_SIZE, SUBPAGE_SIZE), tag(s));
    }
}

/// Read the file back (after the clock) and compare with `expect`.
fn check_data(
    host: &LinuxHost,
    expect: &[Expect],
    strategy: &'static str,
) -> Result<DataCheck, RealError> {
    const CHUNK: u64 = 2 << 20;
    let mut check = DataCheck::default();
    let mut bad = 0u64;
    let mut first = None;
    let mut buf = vec![0u8; CHUNK as usize];
    for at in (0..host.size()).step_by(CHUNK as usize) {
        let len = CHUNK.min(host.size() - at);
        let subs = (at / SUBPAGE_SIZE)..((at + len) / SUBPAGE_SIZE);
        if expect[subs.start as usize..subs.end as usize]
            .iter()
            .all(|&e| e == Expect::GivenBack)
        {
            check.given_back_subpages += subs.end - subs.start;
            continue;
        }
        host.read(at, &mut buf[..len as usize])
            .map_err(|errno| RealError::Syscall {
                step: "read the file back",
                errno,
            })?;
        check.bytes_checked += len;
        for s in subs {
            let page = &buf[((s * SUBPAGE_SIZE - at) as usize)..][..SUBPAGE_SIZE as usize];
            let (ok, what) = match expect[s as usize] {
                Expect::GivenBack => {
                    check.given_back_subpages += 1;
                    continue;
                }
                Expect::Data => {
                    check.kept_subpages += 1;
                    (
                        page.iter().all(|&b| b == tag(s)),
                        "the data written before the run",
                    )
                }
                Expect::Zeros => {
                    check.zeroed_subpages += 1;
                    (page.iter().all(|&b| b == 0), "zeros")
                }
            };
            if !ok {
                bad += 1;
                first.get_or_insert((s * SUBPAGE_SIZE, what));
            }
        }
    }
    match first {
        None => Ok(check),
        Some((first, what)) => Err(RealError::DataLost {
            strategy,
            bad,
            first,
            what,
        }),
    }
}

fn run_side(
    opts: &RunOptions,
    ops: &[Op],
    expect: &[Expect],
    through_engine: bool,
) -> Result<(Side, LinuxHost, Option<Stats>), RealError> {
    let strategy = if through_engine {
        "hugepunch"
    } else {
        "direct"
    };
    let size = opts.size;
    let empty = HugeCounters::read();
    let host = Arc::new(LinuxHost::open(&opts.backend, size)?);
    host.populate_all().map_err(|e| RealError::Syscall {
        step: "fallocate (populate the file)",
        errno: e.errno,
    })?;
    write_data(&host);
    let resident_before = host.resident_bytes().map_err(|errno| RealError::Syscall {
        step: "measure residency",
        errno,
    })?;
    let backing = host.info().huge_backing.clone();
    let hp = host.huge_page_size();
    let start = HugeCounters::read();
    let sampler = match (&start, backing.available()) {
        (Some(start), true) => {
            let fd_host = host.clone();
            Some(Sampler::start(*start, hp, move || {
                fd_host.allocated_bytes().ok()
            }))
        }
        _ => None,
    };
    let c0 = host.counts();
    let (wall, stats, pending) = if through_engine {
        let mut config = host.config();
        if let Some(b) = opts.budget {
            config = config.budget(b);
        }
        let engine = HugePunch::new(config, host.clone())?;
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
    let samples = sampler.map_or(Samples::default(), Sampler::finish);
    let end = HugeCounters::read();
    let c = host.counts();
    let resident = host.resident_bytes().map_err(|errno| RealError::Syscall {
        step: "measure residency",
        errno,
    })?;
    let kernel = match (&empty, &start, &end) {
        (Some(empty), Some(start), Some(end)) => {
            KernelHuge::from_counters(&backing, hp, empty, start, end, &samples)
        }
        _ => None,
    };
    let data = check_data(&host, expect, strategy)?;
    let fallocate_seconds = (c.fallocate_nanos - c0.fallocate_nanos) as f64 / 1e9;
    let zero_seconds = (c.zero_nanos - c0.zero_nanos) as f64 / 1e9;
    let fault_seconds = (c.fault_nanos - c0.fault_nanos) as f64 / 1e9;
    let wall_seconds = wall.as_secs_f64();
    let side = Side {
        strategy,
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
        huge_pages: size / hp,
        huge_pages_split: c.huge_pages_split,
        kernel,
        data,
    };
    let host = Arc::try_unwrap(host)
        .unwrap_or_else(|_| unreachable!("the engine and the sampler were dropped"));
    Ok((side, host, stats))
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// What a real run runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The file backend.
    pub backend: Backend,
    /// File size: a positive multiple of the backend's huge page size.
    pub size: u64,
    /// The pattern.
    pub pattern: Pattern,
    /// Its seed (what `random`, `pin` and `straddling` draw).
    pub seed: u64,
    /// The engine's pending-memory budget (`None`: unbounded).
    pub budget: Option<u64>,
}

/// Run the pattern named `pattern_name`, with the default seed
/// ([`DEFAULT_SEED`]), on two fresh files of `size` bytes (a multiple of
/// 2 MiB) of `backend`; see [`run_with`].
pub fn run(backend: Backend, size: u64, pattern_name: &str) -> Result<RealReport, RealError> {
    run_seeded(backend, size, pattern_name.parse()?, DEFAULT_SEED)
}

/// Run `pattern` with `seed`, no budget; see [`run_with`].
pub fn run_seeded(
    backend: Backend,
    size: u64,
    pattern: Pattern,
    seed: u64,
) -> Result<RealReport, RealError> {
    run_with(&RunOptions {
        backend,
        size,
        pattern,
        seed,
        budget: None,
    })
}

/// Run the pattern on two fresh files of the backend: directly, then
/// through the engine. See the module documentation for the method.
pub fn run_with(opts: &RunOptions) -> Result<RealReport, RealError> {
    let hp = LinuxHost::huge_page_size_of(&opts.backend)?;
    let order = (hp / SUBPAGE_SIZE).trailing_zeros() as u8;
    let geo = Geometry::new(opts.size, order).map_err(|_| SetupError::BadSize {
        size: opts.size,
        huge_page_size: hp,
    })?;
    let ops = ops_in(opts.pattern, geo, opts.seed);
    run_ops(opts, opts.pattern.name(), &ops)
}

/// Run `ops` (any workload: the conversion stream, say) like a pattern:
/// directly, then through the engine, on two fresh files of
/// `opts.backend` (`opts.pattern` is ignored; `name` names the workload in
/// the report). The operations must lie inside `opts.size` bytes of the
/// backend's huge pages.
pub fn run_ops(opts: &RunOptions, name: &str, ops: &[Op]) -> Result<RealReport, RealError> {
    let hp = LinuxHost::huge_page_size_of(&opts.backend)?;
    let expect = expectations(ops, opts.size);
    let touched = touched_huge_pages(ops, hp);
    let (direct, host, _) = run_side(opts, ops, &expect, false)?;
    let info = host.info().clone();
    drop(host);
    let (engine, host, stats) = run_side(opts, ops, &expect, true)?;
    drop(host);
    let ratios = Ratios {
        fallocate_calls: ratio(direct.fallocate_calls as f64, engine.fallocate_calls as f64),
        wall_time: ratio(direct.wall_seconds, engine.wall_seconds),
        bytes_released: ratio(engine.bytes_released as f64, direct.bytes_released as f64),
        engine_own_share: ratio(engine.own_seconds, engine.wall_seconds).unwrap_or(0.0),
        fallocate_time: ratio(direct.fallocate_seconds, engine.fallocate_seconds),
    };
    Ok(RealReport {
        kernel: kernel_release(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        backend: opts.backend.clone(),
        size: opts.size,
        pattern: name.to_string(),
        seed: opts.seed,
        operations: ops.len() as u64,
        huge_backing: info.huge_backing.describe(),
        huge_backing_available: info.huge_backing.available(),
        memslot: info.memslot,
        huge_page_size: hp,
        budget: opts.budget,
        huge_pages_touched: touched,
        direct,
        engine,
        ratios,
        engine_stats: stats.expect("the engine side has statistics"),
    })
}

/// Huge pages of `hp` bytes that at least one punch of `ops` touches.
fn touched_huge_pages(ops: &[Op], hp: u64) -> u64 {
    let mut touched = std::collections::BTreeSet::new();
    for op in ops {
        if let Op::Punch { offset, len } = *op {
            touched.extend(offset / hp..(offset + len).div_ceil(hp));
        }
    }
    touched.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_follow_the_operations() {
        let sub = SUBPAGE_SIZE;
        let ops = [
            Op::Punch {
                offset: 0,
                len: 2 * sub,
            },
            Op::Populate {
                offset: sub,
                len: 2 * sub,
            },
        ];
        let e = expectations(&ops, 4 * sub);
        assert_eq!(
            e,
            [Expect::GivenBack, Expect::Zeros, Expect::Data, Expect::Data]
        );
        assert_eq!(touched_huge_pages(&ops, 2 << 20), 1);
        assert!((0..1024).all(|s| tag(s) != 0));
        assert_ne!(tag(0), tag(1));
    }
}
