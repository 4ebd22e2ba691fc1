//! The strategies compared, behind one interface, all acting on the same
//! simulated kernel ([`KernelHost`]):
//!
//! * [`StrategyKind::HugePunch`]: the engine — defer partial punches of a
//!   huge page, free it whole when all of it is punched.
//! * [`StrategyKind::Eager`]: today's guest_memfd and shmem — a partial
//!   punch splits the huge page and frees the 4 KiB pages now.
//! * [`StrategyKind::ZeroOnly`]: hugetlb — a partial punch only zeroes;
//!   memory is freed only by a punch of a whole huge page in one call.
//! * [`StrategyKind::SinglePartial`]: QEMU's and Cloud Hypervisor's
//!   balloon — one partially punched huge page is tracked; a partial punch
//!   of another drops it, and what was tracked is never freed.
//!
//! Every strategy validates ranges as the engine does, refuses everything
//! after teardown, invalidates a partial punch of possibly-private memory
//! at once (invariant 2 is not a matter of policy), and reports the
//! statistic names of CONTRACT.md §6, counting what it did.

use crate::geometry::ModelGeometry;
use crate::host::{lock, HugePageBacking, KernelHost};
use crate::sync::{AtomicBool, Ordering};
use hugepunch::{
    Attribute, ByteRange, Config, Error, Geometry, Hint, Host, HugePunch, PagePart, Policy, Stats,
    SUBPAGE_SIZE,
};
use serde::Serialize;
use std::sync::{Arc, Mutex};

/// Which strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrategyKind {
    /// The engine.
    HugePunch,
    /// Split and free 4 KiB now.
    Eager,
    /// Zero partial punches, free only whole huge pages punched at once.
    ZeroOnly,
    /// Track one partially punched huge page.
    SinglePartial,
}

impl StrategyKind {
    /// Every strategy, the engine first.
    pub const ALL: [StrategyKind; 4] = [
        StrategyKind::HugePunch,
        StrategyKind::Eager,
        StrategyKind::ZeroOnly,
        StrategyKind::SinglePartial,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::HugePunch => "hugepunch",
            StrategyKind::Eager => "eager",
            StrategyKind::ZeroOnly => "zero-only",
            StrategyKind::SinglePartial => "single-partial",
        }
    }

    /// What it models, in a few words.
    pub fn describes(self) -> &'static str {
        match self {
            StrategyKind::HugePunch => "deferred coalescing (this project)",
            StrategyKind::Eager => "guest_memfd/shmem today: split, free 4 KiB now",
            StrategyKind::ZeroOnly => "hugetlb: zero partial punches, free whole ones",
            StrategyKind::SinglePartial => {
                "QEMU/Cloud Hypervisor balloon: one partial page tracked"
            }
        }
    }

    /// Does it promise that a punched subpage reads as zeros (invariant 5)?
    /// The balloon's tracker does not zero what it un-tracks.
    pub fn zeroes_punched(self) -> bool {
        self != StrategyKind::SinglePartial
    }
}

impl Serialize for StrategyKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for StrategyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StrategyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown strategy {s:?} (expected one of: {})",
                    StrategyKind::ALL.map(|k| k.name()).join(", ")
                )
            })
    }
}

/// One strategy acting on the model. Every operation takes `&self` and
/// may be called from several threads.
pub trait Strategy: Send + Sync {
    /// Which one.
    fn kind(&self) -> StrategyKind;
    /// `punch(offset, len)` (CONTRACT.md §3 for the engine; its own rules for
    /// the others).
    fn punch(&self, offset: u64, len: u64) -> Result<(), Error>;
    /// `convert(offset, len, to)`.
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error>;
    /// `populate(offset, len)`: a fault or a fallocate allocation.
    fn populate(&self, offset: u64, len: u64) -> Result<(), Error>;
    /// `flush(offset, len)`: force out what is pending (a no-op where
    /// nothing is ever pending).
    fn flush(&self, offset: u64, len: u64) -> Result<(), Error>;
    /// Free everything; returns the ranges still allocated (failed frees).
    fn teardown(&self) -> Vec<ByteRange>;
    /// The largest mapping order the fault path may install for huge page `h`.
    fn max_mapping_order(&self, h: u64) -> u8;
    /// Punched, not yet freed subpages of huge page `h` (pending).
    fn pending_in(&self, h: u64) -> u32;
    /// Is the subpage at `offset` punched and pending (reads as zeros)?
    fn is_punched(&self, offset: u64) -> bool;
    /// The statistics of CONTRACT.md §6.
    fn stats(&self) -> Stats;
    /// Bytes of the strategy's own tracking state.
    fn tracking_bytes(&self) -> usize;
}

/// Options of a strategy (the engine's; the others have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// Pending-bytes budget (engine only).
    pub budget: Option<u64>,
    /// Conversion policy (engine only).
    pub policy: Policy,
}

/// Build strategy `kind` for a file of geometry `geo` on `host` (`geo` is
/// valid by construction: [`Geometry::new`] checked it).
pub fn build(
    kind: StrategyKind,
    geo: Geometry,
    populated: bool,
    options: Options,
    host: Arc<KernelHost>,
) -> Result<Box<dyn Strategy>, Error> {
    Ok(match kind {
        StrategyKind::HugePunch => build_engine(geo, populated, options, host)?,
        _ => Box::new(Baseline {
            kind,
            geo,
            host,
            state: Mutex::new(BaseState::default()),
        }),
    })
}

/// Build the engine for a file of geometry `geo` on any host (the model's,
/// or a wrapper around it, as the planted-bug tests use).
pub fn build_engine(
    geo: Geometry,
    populated: bool,
    options: Options,
    host: Arc<dyn Host>,
) -> Result<Box<dyn Strategy>, Error> {
    let mut cfg = Config::new(geo.size())
        .order(geo.order())
        .policy(options.policy);
    cfg.populated = populated;
    cfg.budget = options.budget;
    let engine = HugePunch::new(cfg, host)?;
    Ok(Box::new(Engine {
        engine,
        geo,
        torn: AtomicBool::new(false),
    }))
}

// ---- the engine --------------------------------------------------------

struct Engine {
    engine: HugePunch,
    geo: Geometry,
    /// Set once teardown ran: the engine's queries would then answer
    /// `TornDown` and count it, so the model stops asking.
    torn: AtomicBool,
}

impl Engine {
    fn torn(&self) -> bool {
        // ORDERING: Relaxed: only keeps the model from asking a torn-down
        // engine; the engine itself orders teardown against operations.
        self.torn.load(Ordering::Relaxed)
    }
}

impl Strategy for Engine {
    fn kind(&self) -> StrategyKind {
        StrategyKind::HugePunch
    }
    fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.engine.punch(offset, len)
    }
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        self.engine.convert(offset, len, to)
    }
    fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.engine.populate(offset, len)
    }
    fn flush(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.engine.flush(offset, len)
    }
    fn teardown(&self) -> Vec<ByteRange> {
        // ORDERING: Relaxed: see `torn`.
        self.torn.store(true, Ordering::Relaxed);
        self.engine.teardown().still_allocated
    }
    fn max_mapping_order(&self, h: u64) -> u8 {
        if self.torn() || h >= self.geo.huge_pages() {
            return 0;
        }
        self.engine.max_mapping_order(h).unwrap_or(0)
    }
    fn pending_in(&self, h: u64) -> u32 {
        if self.torn()
            || h >= self.geo.huge_pages()
            || self.max_mapping_order(h) == self.geo.order()
        {
            return 0;
        }
        if self.engine.backing(h).ok() != Some(hugepunch::Backing::Huge) {
            return 0;
        }
        let r = self.geo.huge_page_range(h);
        self.engine
            .pending_ranges(r.offset, r.len)
            .map_or(0, |v| v.iter().map(|r| r.subpages() as u32).sum())
    }
    fn is_punched(&self, offset: u64) -> bool {
        !self.torn() && offset < self.geo.size() && self.engine.is_punched(offset).unwrap_or(false)
    }
    fn stats(&self) -> Stats {
        self.engine.stats()
    }
    fn tracking_bytes(&self) -> usize {
        self.engine.tracking_bytes()
    }
}

// ---- the baselines -------------------------------------------------------

#[derive(Default)]
struct BaseState {
    stats: Stats,
    torn: bool,
    /// single-partial: the tracked huge page and its punched bits.
    tracked: Option<(u64, Vec<u64>)>,
}

impl BaseState {
    fn pending_changed(&mut self) {
        let pending = self
            .tracked
            .as_ref()
            .map_or(0, |(_, b)| b.iter().map(|w| w.count_ones() as u64).sum());
        self.stats.pending_subpages = pending;
        self.stats.pending_bytes_peak = self.stats.pending_bytes_peak.max(pending * SUBPAGE_SIZE);
    }
}

struct Baseline {
    kind: StrategyKind,
    geo: Geometry,
    host: Arc<KernelHost>,
    /// One lock per file: the baselines model kernels that serialise a
    /// file's truncations (they are not the subject of the comparison's
    /// scalability).
    state: Mutex<BaseState>,
}

impl Baseline {
    fn check(&self, st: &mut BaseState, offset: u64, len: u64) -> Result<ByteRange, Error> {
        if st.torn {
            st.stats.errors_torn_down += 1;
            return Err(Error::TornDown);
        }
        self.geo.validate(offset, len).ok_or_else(|| {
            st.stats.errors_invalid_range += 1;
            Error::InvalidRange { offset, len }
        })
    }

    fn hint(&self, h: u64) -> Hint {
        Hint {
            huge_page: h,
            order: self.geo.order(),
        }
    }

    fn invalidate(&self, st: &mut BaseState, r: ByteRange, h: u64) {
        self.host.invalidate_begin(r, self.hint(h));
        self.host.invalidate_end(r);
        st.stats.invalidations += 1;
    }

    fn free(&self, st: &mut BaseState, r: ByteRange, order: u8) -> bool {
        st.stats.free_calls += 1;
        let ok = self.host.free(r, order).is_ok();
        if !ok {
            st.stats.free_errors += 1;
        }
        ok
    }

    /// Invalidate and free huge page `h` whole. Returns whether the free
    /// succeeded.
    fn free_whole(&self, st: &mut BaseState, h: u64) -> bool {
        let whole = self.geo.huge_page_range(h);
        self.host.invalidate_begin(whole, self.hint(h));
        let ok = self.free(st, whole, self.geo.order());
        self.host.invalidate_end(whole);
        st.stats.invalidations += 1;
        ok
    }

    /// Free the present subpages of `part` as 4 KiB runs, after one
    /// invalidation of the part (none if nothing is present).
    fn free_small(&self, st: &mut BaseState, part: PagePart) {
        let h = part.huge_page;
        let runs = self.host.present_runs(h, part.first, part.count);
        if runs.is_empty() {
            return;
        }
        self.invalidate(st, self.geo.range_of(part), h);
        for (first, count) in runs {
            let run = self.geo.part_range(h, first, count);
            if self.free(st, run, 0) {
                st.stats.small_freed_subpages += count as u64;
            }
        }
    }

    fn untrack(&self, st: &mut BaseState, h: u64) {
        if st.tracked.as_ref().is_some_and(|(t, _)| *t == h) {
            st.tracked = None;
        }
    }

    fn punch_part(&self, st: &mut BaseState, part: PagePart) {
        let h = part.huge_page;
        let r = self.geo.range_of(part);
        match self.host.backing(h) {
            HugePageBacking::Absent => {}
            HugePageBacking::Split { .. } => self.free_small(st, part),
            HugePageBacking::Huge if self.geo.is_whole(part) => {
                if self.free_whole(st, h) {
                    st.stats.huge_frees += 1;
                    self.untrack(st, h);
                }
            }
            HugePageBacking::Huge => {
                let private = !self.host.is_shared(r);
                match self.kind {
                    StrategyKind::Eager => {
                        // The folio splits; the 4 KiB pages go now, after an
                        // invalidation (a huge mapping of the folio must go).
                        if private {
                            st.stats.invalidations_immediate += 1;
                        }
                        self.free_small(st, part);
                    }
                    StrategyKind::ZeroOnly => {
                        if private {
                            self.invalidate(st, r, h);
                            st.stats.invalidations_immediate += 1;
                        }
                        self.host.zero(r);
                    }
                    _ => {
                        if private {
                            self.invalidate(st, r, h);
                            st.stats.invalidations_immediate += 1;
                        }
                        let words = (self.geo.subpages_per_huge_page() as usize).div_ceil(64);
                        if st.tracked.as_ref().is_some_and(|(t, _)| *t != h) {
                            // Touching another huge page drops the tracked
                            // one: its punched subpages are never freed.
                            st.tracked = None;
                        }
                        let (_, bits) = st.tracked.get_or_insert_with(|| (h, vec![0; words]));
                        let mut newly = 0;
                        for sub in part.first..part.first + part.count {
                            let (w, b) = ((sub / 64) as usize, sub % 64);
                            if bits[w] >> b & 1 == 0 {
                                bits[w] |= 1 << b;
                                newly += 1;
                            }
                        }
                        let all: u64 = bits.iter().map(|w| w.count_ones() as u64).sum();
                        st.stats.punched_subpages += newly;
                        st.pending_changed();
                        if all == self.geo.subpages_per_huge_page() as u64 && self.free_whole(st, h)
                        {
                            st.stats.huge_frees += 1;
                            st.tracked = None;
                        }
                    }
                }
            }
        }
    }
}

impl Strategy for Baseline {
    fn kind(&self) -> StrategyKind {
        self.kind
    }

    fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        let mut st = lock(&self.state);
        let r = self.check(&mut st, offset, len)?;
        st.stats.punch_calls += 1;
        for part in self.geo.parts(r) {
            self.punch_part(&mut st, part);
        }
        st.pending_changed();
        Ok(())
    }

    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        let mut st = lock(&self.state);
        let r = self.check(&mut st, offset, len)?;
        st.stats.convert_calls += 1;
        st.stats.conversions_ok += 1;
        self.host.set_attributes(r, to);
        Ok(())
    }

    fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        let mut st = lock(&self.state);
        let r = self.check(&mut st, offset, len)?;
        st.stats.populate_calls += 1;
        for part in self.geo.parts(r) {
            let h = part.huge_page;
            match self.host.backing(h) {
                HugePageBacking::Absent => {
                    let whole = self.geo.huge_page_range(h);
                    if let Err(e) = self.host.allocate(whole, self.geo.order()) {
                        return Err(Error::AllocationFailed {
                            offset: whole.offset,
                            errno: e.errno,
                        });
                    }
                }
                HugePageBacking::Split { .. } => {
                    let present = self.host.present_runs(h, part.first, part.count);
                    let mut at = part.first;
                    let end = part.first + part.count;
                    let mut gaps = Vec::new();
                    for (f, c) in present.into_iter().chain(std::iter::once((end, 0))) {
                        if f > at {
                            gaps.push((at, f - at));
                        }
                        at = f + c;
                    }
                    for (first, count) in gaps {
                        let run = self.geo.part_range(h, first, count);
                        if let Err(e) = self.host.allocate(run, 0) {
                            return Err(Error::AllocationFailed {
                                offset: run.offset,
                                errno: e.errno,
                            });
                        }
                    }
                }
                HugePageBacking::Huge => {
                    // single-partial: un-track what the guest touches again.
                    // The balloon does not zero it (its content is stale).
                    if let Some((t, bits)) = st.tracked.as_mut() {
                        if *t == h {
                            let mut k = 0;
                            for sub in part.first..part.first + part.count {
                                let (w, b) = ((sub / 64) as usize, sub % 64);
                                if bits[w] >> b & 1 == 1 {
                                    bits[w] &= !(1 << b);
                                    k += 1;
                                }
                            }
                            st.stats.repopulated_subpages += k;
                        }
                    }
                }
            }
        }
        st.pending_changed();
        Ok(())
    }

    fn flush(&self, offset: u64, len: u64) -> Result<(), Error> {
        let mut st = lock(&self.state);
        self.check(&mut st, offset, len)?;
        Ok(())
    }

    fn teardown(&self) -> Vec<ByteRange> {
        let mut st = lock(&self.state);
        st.torn = true;
        st.tracked = None;
        let mut left = Vec::new();
        for h in self.host.allocated_huge_pages() {
            match self.host.backing(h) {
                HugePageBacking::Absent => {}
                HugePageBacking::Huge => {
                    if self.free_whole(&mut st, h) {
                        st.stats.teardown_frees += 1;
                    } else {
                        left.push(self.geo.huge_page_range(h));
                    }
                }
                HugePageBacking::Split { .. } => {
                    let runs = self
                        .host
                        .present_runs(h, 0, self.geo.subpages_per_huge_page());
                    if !runs.is_empty() {
                        self.invalidate(&mut st, self.geo.huge_page_range(h), h);
                    }
                    for (first, count) in runs {
                        let run = self.geo.part_range(h, first, count);
                        if self.free(&mut st, run, 0) {
                            st.stats.small_freed_subpages += count as u64;
                        } else {
                            left.push(run);
                        }
                    }
                }
            }
        }
        st.pending_changed();
        left
    }

    fn max_mapping_order(&self, h: u64) -> u8 {
        let st = lock(&self.state);
        if st.torn || self.host.backing(h) != HugePageBacking::Huge {
            return 0;
        }
        match &st.tracked {
            Some((t, bits)) if *t == h && bits.iter().any(|&w| w != 0) => 0,
            _ => self.geo.order(),
        }
    }

    fn pending_in(&self, h: u64) -> u32 {
        match &lock(&self.state).tracked {
            Some((t, bits)) if *t == h => bits.iter().map(|w| w.count_ones()).sum(),
            _ => 0,
        }
    }

    fn is_punched(&self, offset: u64) -> bool {
        let s = offset / SUBPAGE_SIZE;
        let h = s >> self.geo.order();
        let sub = (s - (h << self.geo.order())) as u32;
        match &lock(&self.state).tracked {
            Some((t, bits)) if *t == h => bits[(sub / 64) as usize] >> (sub % 64) & 1 == 1,
            _ => false,
        }
    }

    fn stats(&self) -> Stats {
        lock(&self.state).stats
    }

    fn tracking_bytes(&self) -> usize {
        std::mem::size_of::<BaseState>()
            + lock(&self.state)
                .tracked
                .as_ref()
                .map_or(0, |(_, b)| b.len() * 8)
    }
}
