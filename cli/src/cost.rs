//! What replaying a trace will cost, before it runs: an upper estimate of
//! the time and the memory the engine and the simulated kernel need, so
//! that a trace that would run for minutes or exhaust memory (a petabyte
//! file populated, punched or torn down whole; a chunk of the engine's
//! index installed by every line) is refused at once, with the estimate,
//! the line at which the trace passes the limits and the line that costs
//! the most, instead of being run.
//!
//! # The model of the cost
//!
//! Nothing in the engine or the model is per huge page of the *file*
//! except what the contract makes so (teardown frees every allocated huge
//! page, one host call each); everything else is per huge page or per
//! subpage an operation *touches*. So, per operation of a valid range of
//! `H` huge pages and `S` subpages:
//!
//! * a constant ([`NS_PER_OP`]), and [`NS_PER_HUGE_PAGE`] (plus
//!   [`NS_PER_WORD`] per bitmap word) for each of the `H` huge pages; a
//!   populate, [`NS_PER_ALLOCATED_HUGE_PAGE`] for each huge page it may
//!   allocate (one a punch or flush touched, or, in a file that starts
//!   empty, one no populate touched yet);
//! * subpage-granular work only where a huge page has subpage state: the
//!   (at most two) partial ends of the range, and the huge pages that may
//!   hold punched bits or be split — *dirty* pages, the huge pages some
//!   punch covered in part (kept exactly: only such a punch makes a page
//!   dirty, at most two a punch). Subpages are walked
//!   ([`NS_PER_SUBPAGE_WALKED`]) or handled one by one — freed, allocated,
//!   zeroed ([`NS_PER_SUBPAGE_HANDLED`]), at most as many as were punched
//!   in part; a partial punch costs what its strategy does with it (the
//!   engine only sets bits, eager frees 4 KiB pages);
//! * installing a chunk or a directory of the engine's index
//!   ([`NS_PER_INSTALLED_BYTE`]);
//! * with a budget, the engine's shrinker scans the index (every chunk slot
//!   and the huge pages of the allocated chunks, [`NS_PER_SCANNED`]) once
//!   per forced split: at most twice per punch (the two largest pending
//!   counts cover what one punch adds), and at most once per life of a
//!   huge page punched in part;
//! * teardown: every allocated huge page (all of a populated file), every
//!   subpage of the dirty ones, and every chunk slot of the index.
//!
//! Memory is what stays: the engine's chunks (installed by the first
//! operation that touches one of their huge pages) and directories, the
//! model's entry per huge page populated or dirty, its run maps, the
//! subpage state of the dirty pages, and the operations themselves.
//! Distinct huge pages and chunks are counted exactly (with run maps, as
//! the model does). Several strategies add up: each runs on its own
//! kernel, one after the other, and all are kept for the report.
//!
//! The constants were measured on the development machine (2 cores, a
//! release build, under load) and rounded up so that every shape tried
//! took at most its estimate (1.3 to 50 times less; a whole-file operation
//! or a trace of 4 KiB punches is within a factor of 2 to 3). They are
//! measurements, not a proof: `tests/replay_lib.rs` checks the memory
//! estimate against the model's own accounts, and the tool's tests run
//! each refused case under a time and an address-space limit. A debug
//! build is several times slower than the estimate.

use hugepunch::Geometry;
use hugepunch::SUBPAGE_SHIFT;
use hugepunch_model::rangemap::RangeMap;
use hugepunch_model::StrategyKind;
use hugepunch_workload::{Op, Trace};

/// Time per operation, whatever it touches, in nanoseconds.
pub const NS_PER_OP: f64 = 300.0;
/// Time per huge page an operation touches.
pub const NS_PER_HUGE_PAGE: f64 = 700.0;
/// Time per huge page a populate may allocate (more, per huge page, than
/// anything else does).
pub const NS_PER_ALLOCATED_HUGE_PAGE: f64 = 2_500.0;
/// Time per huge page teardown frees.
pub const NS_PER_TORN_HUGE_PAGE: f64 = 1_200.0;
/// Time per bitmap word of a touched huge page (order 18: 4,096 words).
pub const NS_PER_WORD: f64 = 4.0;
/// Time per subpage walked one by one (the subpages of a split huge page,
/// of a partial part).
pub const NS_PER_SUBPAGE_WALKED: f64 = 100.0;
/// Time per subpage freed, allocated or zeroed on its own (4 KiB frees
/// and allocations, un-punch zeroing).
pub const NS_PER_SUBPAGE_HANDLED: f64 = 600.0;
/// Time per huge page split for the first time (the model's subpage
/// state for it is made).
pub const NS_PER_SPLIT: f64 = 2_000.0;
/// Time per byte of an index chunk or directory installed (allocation,
/// first touch of its memory).
pub const NS_PER_INSTALLED_BYTE: f64 = 2.0;
/// Time per chunk slot or huge page a scan of the engine's index visits.
pub const NS_PER_SCANNED: f64 = 25.0;
/// Time per chunk slot teardown closes.
pub const NS_PER_CHUNK_SLOT: f64 = 40.0;

/// Memory per operation kept (the parsed trace).
pub const BYTES_PER_OP: u64 = 48;
/// Memory per huge page the model may hold an entry for (allocated by a
/// populate, split, or zeroed in part).
pub const BYTES_PER_HUGE_PAGE: u64 = 400;
/// Memory per huge page an operation touches, held while it runs (a
/// conversion's list of the huge pages it marked).
pub const BYTES_PER_HUGE_PAGE_IN_FLIGHT: u64 = 32;
/// Memory per run of the model's run maps (and the estimator's own).
pub const BYTES_PER_RUN: u64 = 64;
/// Memory per subpage allocated again as a 4 KiB page.
pub const BYTES_PER_REALLOCATED_SUBPAGE: u64 = 48;
/// What a replay holds before any operation (the process, its tables).
pub const BYTES_BASE: u64 = 16 << 20;

/// Runs a range query of the estimator looks at before it falls back to
/// an upper bound (so the estimate itself stays linear in the trace).
const MAX_RUNS_LOOKED_AT: usize = 64;

/// Words per huge page in the engine's index (state word and bitmap).
fn stride(order: u8) -> u64 {
    1 + (1u64 << order).div_ceil(64)
}

/// The engine's chunk geometry (see engine/src/index.rs): huge pages per
/// chunk, and the number of chunk slots.
fn chunks(geo: Geometry) -> (u64, u64) {
    let hp = geo.huge_pages().max(1);
    let per = (1u64 << (4096 / stride(geo.order())).max(1).ilog2()).min(hp.next_power_of_two());
    (per, hp.div_ceil(per))
}

/// Chunk slots per directory of the engine's index.
const DIR_CHUNKS: u64 = 4096;

/// The estimate of one replay.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// Seconds, all strategies together (a release build on the machine
    /// the constants were measured on).
    pub seconds: f64,
    /// Peak bytes of memory, all strategies' kernels together (they are
    /// kept until the report is written).
    pub bytes: u64,
    /// The operation that costs the most time (in seconds, all
    /// strategies).
    pub costliest: Option<Cost>,
    /// The operation that adds the most memory (in bytes, all strategies).
    pub largest: Option<Cost>,
    /// The line at which the replay passes the limits given to
    /// [`estimate_within`] (time so far, or memory held), if it does.
    pub over_limits_at: Option<usize>,
}

/// What one line costs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Cost {
    /// The line.
    pub line: usize,
    /// Seconds (for `costliest`) or bytes (for `largest`).
    pub amount: f64,
    /// What it does, in words: "populate of 536,870,912 huge pages".
    pub what: String,
}

/// A set of points kept as runs, with its size kept up to date.
struct Set {
    map: RangeMap<bool>,
    len: u64,
}

impl Set {
    fn new() -> Self {
        Set {
            map: RangeMap::new(false),
            len: 0,
        }
    }

    /// Add `[a, b)`; returns how many points are new. Amortised cheap:
    /// the runs counted are merged into one by the set.
    fn add(&mut self, a: u64, b: u64) -> u64 {
        if a >= b {
            return 0;
        }
        // Most operations touch what is already in: one run covers it.
        if self.map.count_bounded(a, b, true, 1) == Some(b - a) {
            return 0;
        }
        let new = (b - a) - self.map.count(a, b, true);
        self.map.set(a, b, true);
        self.len += new;
        new
    }

    /// Points of `[a, b)` in the set, or an upper bound (`b - a`, at most
    /// the set's size) when that would take long to find.
    fn within(&self, a: u64, b: u64) -> u64 {
        self.map
            .count_bounded(a, b, true, MAX_RUNS_LOOKED_AT)
            .unwrap_or((b - a).min(self.len))
    }

    fn runs(&self) -> u64 {
        self.map.runs() as u64
    }
}

/// One pass over the trace, keeping what bounds the cost of what follows.
struct Walk {
    geo: Geometry,
    full: u64,
    stride: u64,
    chunk_pages: u64,
    n_chunks: u64,
    chunk_bytes: u64,
    /// Huge pages an operation touched.
    touched: Set,
    /// Huge pages a populate touched (the model may hold an entry).
    populated_pages: Set,
    /// Huge pages a punch or a flush touched (they may be absent since).
    freed_pages: Set,
    /// Huge pages a punch covered in part: they may hold punched bits, or
    /// be split (only such a punch makes them so).
    dirty: Set,
    /// Chunks and directories of the engine's index installed.
    chunks: Set,
    dirs: Set,
    /// Subpages punched in part of a huge page (so that may be freed,
    /// zeroed, or allocated again, one by one, later).
    loose: u64,
    /// Subpages that may have been allocated again one by one.
    reallocated: u64,
    /// Forced splits that may still happen (with a budget): huge pages
    /// punched in part, or allocated again, not yet counted as forced out.
    forced_splits_possible: u64,
    /// The attributes, as the model keeps them (true: shared).
    attrs: RangeMap<bool>,
    populated: bool,
    torn: bool,
}

impl Walk {
    fn new(geo: Geometry, populated: bool, start: hugepunch::Attribute) -> Self {
        let (chunk_pages, n_chunks) = chunks(geo);
        let stride = stride(geo.order());
        Walk {
            geo,
            full: geo.subpages_per_huge_page().into(),
            stride,
            chunk_pages,
            n_chunks,
            chunk_bytes: chunk_pages * stride * 8 + 64,
            touched: Set::new(),
            populated_pages: Set::new(),
            freed_pages: Set::new(),
            dirty: Set::new(),
            chunks: Set::new(),
            dirs: Set::new(),
            loose: 0,
            reallocated: 0,
            forced_splits_possible: 0,
            attrs: RangeMap::new(start == hugepunch::Attribute::Shared),
            populated,
            torn: false,
        }
    }

    fn dir_bytes() -> u64 {
        DIR_CHUNKS * 8 + 64
    }

    /// Memory the walk says one kernel holds now.
    fn bytes(&self) -> u64 {
        let huge_page = self.geo.huge_page_size();
        let region = (2u64 << 20).min(huge_page);
        // A split huge page: its bitmap of present subpages, and its
        // direct-map entries split one by one.
        let per_dirty = self.full / 8 + 128 + (huge_page / region) * 48;
        let runs = 2
            * (self.touched.runs() + self.populated_pages.runs() + self.freed_pages.runs())
            + 2 * self.dirty.len
            + self.attrs.runs() as u64
            + 2;
        (self.populated_pages.len + self.dirty.len) * BYTES_PER_HUGE_PAGE
            + self.chunks.len * self.chunk_bytes
            + self.dirs.len * Self::dir_bytes()
            + self.n_chunks.div_ceil(DIR_CHUNKS) * 8
            + self.dirty.len * per_dirty
            + self.reallocated * BYTES_PER_REALLOCATED_SUBPAGE
            + runs * BYTES_PER_RUN
    }

    /// The estimator's own memory.
    fn own_bytes(&self) -> u64 {
        (self.touched.runs()
            + self.populated_pages.runs()
            + self.freed_pages.runs()
            + self.dirty.runs()
            + self.chunks.runs()
            + self.dirs.runs()
            + self.attrs.runs() as u64)
            * BYTES_PER_RUN
    }

    /// Install the index chunks (and directories) of huge pages
    /// `[h0, h1)`; returns the nanoseconds it takes.
    fn install(&mut self, h0: u64, h1: u64) -> f64 {
        let (c0, c1) = (h0 / self.chunk_pages, (h1 - 1) / self.chunk_pages + 1);
        let chunks = self.chunks.add(c0, c1);
        let dirs = if chunks > 0 {
            self.dirs.add(c0 / DIR_CHUNKS, (c1 - 1) / DIR_CHUNKS + 1)
        } else {
            0
        };
        (chunks * self.chunk_bytes + dirs * Self::dir_bytes()) as f64 * NS_PER_INSTALLED_BYTE
    }

    /// What one operation costs one kernel (see [`OpCost`]), and what it
    /// does in words.
    fn op(&mut self, op: &Op, budget: bool) -> (OpCost, What) {
        let (offset, len, kind) = match *op {
            Op::Punch { offset, len } => (offset, len, "punch"),
            Op::Populate { offset, len } => (offset, len, "populate"),
            Op::Convert { offset, len, .. } => (offset, len, "convert"),
            Op::Flush { offset, len } => (offset, len, "flush"),
            Op::Teardown => return self.teardown(),
        };
        let Some(r) = self.geo.validate(offset, len).filter(|_| !self.torn) else {
            // Refused before it touches anything.
            let cost = OpCost {
                ns: NS_PER_OP,
                ..OpCost::default()
            };
            let what = What {
                kind,
                huge_pages: 0,
                subpages: 0,
                refused: true,
            };
            return (cost, what);
        };
        let order = self.geo.order();
        let s0 = r.offset >> SUBPAGE_SHIFT;
        let s1 = s0 + (r.len >> SUBPAGE_SHIFT);
        let (h0, h1) = (s0 >> order, ((s1 - 1) >> order) + 1);
        let h = h1 - h0;
        let s = s1 - s0;
        let mut ns = NS_PER_OP + h as f64 * (NS_PER_HUGE_PAGE + self.stride as f64 * NS_PER_WORD);
        // The (at most two) partial ends of the range.
        let partial = s.min(2 * self.full);
        if matches!(op, Op::Punch { .. }) {
            let mut split = 0;
            if !s0.is_multiple_of(self.full) || s1 - s0 < self.full {
                split += self.dirty.add(h0, h0 + 1);
            }
            if !s1.is_multiple_of(self.full) {
                split += self.dirty.add(h1 - 1, h1);
            }
            ns += split as f64 * NS_PER_SPLIT;
            self.forced_splits_possible += split;
            self.loose = (self.loose + partial).min(self.dirty.len * self.full);
        }
        let dirty_in_range = self.dirty.within(h0, h1);
        // Walked one by one: the partial ends and the dirty pages of the
        // range (a flush splits a dirty page whole, whatever part of it
        // the range covers). Handled one by one: at most what was punched
        // in part.
        // The partial ends of a punch are handled by the strategy (see
        // [`OpCost::punched_in_part`]).
        let (walked, handled) = match op {
            Op::Flush { .. } => {
                let w = dirty_in_range * self.full;
                (w, w.min(self.loose))
            }
            Op::Punch { .. } => (s.min((2 + dirty_in_range) * self.full), 0),
            _ => (s.min((2 + dirty_in_range) * self.full), s.min(self.loose)),
        };
        ns += walked as f64 * NS_PER_SUBPAGE_WALKED + handled as f64 * NS_PER_SUBPAGE_HANDLED;
        let mut in_flight = 0;
        match op {
            Op::Populate { .. } => {
                // What may be absent: what a punch or flush touched, and
                // (in a file that starts empty) what no populate has yet.
                let mut absent = self.freed_pages.within(h0, h1);
                if !self.populated {
                    absent += h - self.populated_pages.within(h0, h1);
                }
                ns += absent.min(h) as f64 * NS_PER_ALLOCATED_HUGE_PAGE;
                // A huge page allocated again may be punched in part, and
                // forced out, again.
                self.forced_splits_possible += absent.min(h);
                self.reallocated = (self.reallocated + handled).min(self.loose);
                self.populated_pages.add(h0, h1);
            }
            Op::Convert { to, .. } => {
                // Cheap when nothing changes (a conversion's runs merge).
                let shared = *to == hugepunch::Attribute::Shared;
                if self.attrs.count_bounded(s0, s1, shared, 1) != Some(s) {
                    self.attrs.set(s0, s1, shared);
                }
                in_flight = h * BYTES_PER_HUGE_PAGE_IN_FLIGHT;
            }
            Op::Punch { .. } | Op::Flush { .. } => {
                self.freed_pages.add(h0, h1);
            }
            Op::Teardown => {}
        }
        if !matches!(op, Op::Flush { .. }) {
            self.touched.add(h0, h1);
            ns += self.install(h0, h1);
        }
        let engine_extra = if budget && matches!(op, Op::Punch { .. }) {
            // The shrinker runs when a punch leaves pending bytes above the
            // budget; each round scans the index for the huge page with the
            // most pending and forces it out (two rounds cover what one
            // punch adds). A huge page is forced out once per life: there
            // are no more rounds than huge pages ever punched in part, plus
            // huge pages allocated again. And what this punch defers is
            // freed later, one 4 KiB run at a time at worst.
            let rounds = self.forced_splits_possible.min(2);
            self.forced_splits_possible -= rounds;
            let scanned = self.n_chunks + self.chunks.len * self.chunk_pages;
            rounds as f64
                * (scanned as f64 * NS_PER_SCANNED
                    + NS_PER_HUGE_PAGE
                    + self.stride as f64 * NS_PER_WORD)
                + partial as f64 * (NS_PER_OP + NS_PER_HUGE_PAGE)
        } else {
            0.0
        };
        let what = What {
            kind,
            huge_pages: h,
            subpages: s,
            refused: false,
        };
        let cost = OpCost {
            ns,
            punched_in_part: if matches!(op, Op::Punch { .. }) {
                partial
            } else {
                0
            },
            engine_extra,
            in_flight,
        };
        (cost, what)
    }

    fn teardown(&mut self) -> (OpCost, What) {
        let hp = self.geo.huge_pages();
        // Every allocated huge page: all of a populated file (the walk
        // does not follow frees), else what a populate touched.
        let allocated = if self.populated {
            hp
        } else {
            self.populated_pages.len
        };
        self.torn = true;
        let ns = NS_PER_OP
            + allocated as f64 * (NS_PER_TORN_HUGE_PAGE + self.stride as f64 * NS_PER_WORD)
            + (self.dirty.len * self.full) as f64 * NS_PER_SUBPAGE_WALKED
            + self.loose as f64 * NS_PER_SUBPAGE_HANDLED
            + self.n_chunks as f64 * NS_PER_CHUNK_SLOT
            // The baselines look at every huge page of a populated file.
            + if self.populated { hp as f64 * NS_PER_SCANNED } else { 0.0 };
        // Teardown installs every directory of the index; the baselines
        // list the allocated huge pages.
        let dirs = self.n_chunks.div_ceil(DIR_CHUNKS);
        let ns =
            ns + self.dirs.add(0, dirs) as f64 * (Self::dir_bytes() as f64) * NS_PER_INSTALLED_BYTE;
        let cost = OpCost {
            ns,
            in_flight: allocated * 8,
            ..OpCost::default()
        };
        let what = What {
            kind: "teardown",
            huge_pages: allocated,
            subpages: self.n_chunks,
            refused: false,
        };
        (cost, what)
    }
}

/// What an operation does, in numbers (put in words only for the line
/// that is reported).
#[derive(Debug, Clone, Copy)]
struct What {
    kind: &'static str,
    huge_pages: u64,
    subpages: u64,
    refused: bool,
}

impl What {
    fn words(self) -> String {
        use crate::format::count;
        if self.refused {
            format!("{} (refused)", self.kind)
        } else if self.kind == "teardown" {
            // `subpages` holds the index's chunk slots here.
            format!(
                "teardown of {} huge pages and {} chunk slots of the engine's index",
                count(self.huge_pages),
                count(self.subpages)
            )
        } else if self.huge_pages == 1 && self.subpages == 1 {
            format!("{} of 1 subpage", self.kind)
        } else if self.huge_pages == 1 {
            format!("{} of {} subpages", self.kind, count(self.subpages))
        } else {
            format!("{} of {} huge pages", self.kind, count(self.huge_pages))
        }
    }
}

/// What one operation costs one kernel.
#[derive(Debug, Clone, Copy, Default)]
struct OpCost {
    /// Nanoseconds, whatever the strategy.
    ns: f64,
    /// Subpages a punch covers in part of a huge page: the engine only
    /// sets their bits (a forced split frees them later: see
    /// `engine_extra`), eager frees them one by one, zero-only zeroes them,
    /// single-partial records them.
    punched_in_part: u64,
    /// Nanoseconds of the engine's shrinker, with a budget.
    engine_extra: f64,
    /// Bytes held only while the operation runs.
    in_flight: u64,
}

/// Nanoseconds per subpage of a partial punch, by strategy.
fn ns_per_punched_in_part(kind: StrategyKind) -> f64 {
    match kind {
        StrategyKind::HugePunch => 0.0,
        StrategyKind::Eager => NS_PER_SUBPAGE_HANDLED,
        StrategyKind::ZeroOnly | StrategyKind::SinglePartial => NS_PER_SUBPAGE_WALKED,
    }
}

/// The estimate of replaying `trace` with `strategies` (the engine with a
/// budget when `budget`). A trace whose size and order make no file
/// ([`hugepunch::Geometry::new`] refuses them) costs only its operations:
/// a replay refuses it before it runs.
pub fn estimate(trace: &Trace, strategies: &[StrategyKind], budget: bool) -> Estimate {
    estimate_within(trace, strategies, budget, f64::INFINITY, u64::MAX)
}

/// [`estimate`], noting the line at which the replay passes
/// `max_seconds` or `max_bytes` (see [`Estimate::over_limits_at`]).
pub fn estimate_within(
    trace: &Trace,
    strategies: &[StrategyKind],
    budget: bool,
    max_seconds: f64,
    max_bytes: u64,
) -> Estimate {
    let fixed = BYTES_BASE + trace.ops.len() as u64 * BYTES_PER_OP;
    let Ok(geo) = Geometry::new(trace.size, trace.order) else {
        // No file of this size and order: a replay refuses it before any
        // operation (what `replay::check` says), so only the trace is held.
        return Estimate {
            seconds: trace.ops.len() as f64 * NS_PER_OP / 1e9,
            bytes: fixed,
            costliest: None,
            largest: None,
            over_limits_at: None,
        };
    };
    let kernels = strategies.len().max(1) as f64;
    let engine_budget = budget && strategies.contains(&StrategyKind::HugePunch);
    let mut w = Walk::new(geo, trace.populated, trace.start);
    let mut total_ns = 0.0;
    let mut peak = w.bytes();
    let mut costliest: Option<(usize, f64, What)> = None;
    let mut largest: Option<(usize, f64, What)> = None;
    let per_punched: f64 = strategies.iter().map(|&k| ns_per_punched_in_part(k)).sum();
    let mut over_limits_at = None;
    for &(line, ref op) in &trace.ops {
        let before = w.bytes();
        let (c, what) = w.op(op, engine_budget);
        let ns = c.ns * kernels + c.punched_in_part as f64 * per_punched + c.engine_extra;
        total_ns += ns;
        let after = w.bytes();
        peak = peak.max(after + c.in_flight);
        let secs = ns / 1e9;
        if costliest.is_none_or(|c| secs > c.1) {
            costliest = Some((line, secs, what));
        }
        let grew = (after + c.in_flight).saturating_sub(before) as f64 * kernels;
        if grew > 0.0 && largest.is_none_or(|c| grew > c.1) {
            largest = Some((line, grew, what));
        }
        let held = fixed + ((after + c.in_flight) as f64 * kernels) as u64 + w.own_bytes();
        if over_limits_at.is_none() && (total_ns / 1e9 > max_seconds || held > max_bytes) {
            over_limits_at = Some(line);
        }
    }
    let cost = |c: (usize, f64, What)| Cost {
        line: c.0,
        amount: c.1,
        what: c.2.words(),
    };
    let (costliest, largest) = (costliest.map(cost), largest.map(cost));
    let bytes = fixed + (peak as f64 * kernels) as u64 + w.own_bytes();
    Estimate {
        seconds: total_ns / 1e9,
        bytes,
        costliest,
        largest,
        over_limits_at,
    }
}
