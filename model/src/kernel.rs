//! [`Kernel`]: one file, one strategy, one simulated host, and a guest
//! that writes and reads through the MMU. It keeps what each subpage must
//! read as (the last write, or zeros after a punch) and checks it, so lost
//! writes (invariant 4) and stale data (invariant 5) are caught where they
//! happen; after each punch it checks that no private subpage of the range
//! is still mapped (invariant 2).

use crate::geometry::subpage_span;
use crate::host::{lock, HostCounters, HugePageBacking, KernelHost, MemoryFigures, Violation};
use crate::rangemap::RangeMap;
use crate::strategy::{build, build_engine, Options, Strategy, StrategyKind};
use crate::sync::{AtomicBool, Ordering};
use hugepunch::{Attribute, ByteRange, Error, Geometry, Host, Stats, SUBPAGE_SIZE};
use hugepunch_workload::{Guest, Target, Trace};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// How to build a [`Kernel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    /// File size in bytes.
    pub size: u64,
    /// Huge page order.
    pub order: u8,
    /// Start with every huge page allocated (huge) or absent.
    pub populated: bool,
    /// Initial attribute of every subpage.
    pub start: Attribute,
    /// The engine's options (ignored by the other strategies).
    pub options: Options,
}

impl ModelConfig {
    /// A populated, private file of `size` bytes with 2 MiB huge pages.
    pub fn new(size: u64) -> Self {
        ModelConfig {
            size,
            order: 9,
            populated: true,
            start: Attribute::Private,
            options: Options::default(),
        }
    }

    /// The configuration a trace's header describes.
    pub fn from_trace(t: &Trace) -> Self {
        ModelConfig {
            size: t.size,
            order: t.order,
            populated: t.populated,
            start: t.start,
            options: Options::default(),
        }
    }

    /// With these engine options.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// The geometry, validated by the engine's rules ([`Geometry::new`]:
    /// an error names the size, the order and the huge page size).
    pub fn geometry(&self) -> Result<Geometry, Error> {
        Geometry::new(self.size, self.order)
    }
}

/// How one huge page looks at the end, for pictures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PageView {
    /// A huge folio with nothing pending.
    Intact,
    /// A huge folio with this many punched subpages pending.
    Pending(u32),
    /// Split into 4 KiB pages.
    Split,
    /// Nothing allocated (freed, or never populated).
    Absent,
}

/// What a model run shows, beside the strategy's own statistics.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// The strategy.
    pub strategy: StrategyKind,
    /// The memory at the end.
    #[serde(flatten)]
    pub memory: MemoryFigures,
    /// Bytes returned to the host so far.
    pub bytes_freed: u64,
    /// Bytes freed and not allocated again: `bytes_freed` less what was
    /// allocated since the start (0 if more was allocated).
    pub bytes_freed_net: u64,
    /// Huge mappings the guest's faults installed.
    pub huge_mappings_installed: u64,
    /// 4 KiB mappings the guest's faults installed.
    pub small_mappings_installed: u64,
    /// What the host counted.
    pub host: HostCounters,
    /// Violations of CONTRACT.md §4 the model caught (0 for a correct strategy).
    pub violations: u64,
    /// By kind.
    pub violations_by_kind: BTreeMap<&'static str, u64>,
    /// Bytes of the strategy's tracking state.
    pub tracking_bytes: usize,
    /// Bytes the model holds for this file (it grows with what is touched).
    pub model_bytes: usize,
}

/// The result of reading back every subpage the guest wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Subpages checked.
    pub checked: u64,
    /// Written and not punched since, but reading something else.
    pub lost_writes: u64,
    /// Punched since the last write, but not reading zeros.
    pub stale_reads: u64,
}

/// One file driven through one strategy on the simulated kernel.
pub struct Kernel {
    geo: Geometry,
    host: Arc<KernelHost>,
    strategy: Box<dyn Strategy>,
    /// What each written subpage must read as: the last token written, or
    /// 0 once punched after it.
    expected: Mutex<BTreeMap<u64, u64>>,
    /// Huge pages some operation touched.
    touched: Mutex<RangeMap<bool>>,
    next_token: Mutex<u64>,
    torn: AtomicBool,
    /// Check reads and punches as they happen (true unless the caller
    /// races guest accesses with punches).
    sequential: AtomicBool,
}

/// Faults give up after this many retries (a strategy that never
/// populates what a fault asks for would otherwise loop forever).
const MAX_FAULT_RETRIES: u32 = 100_000;

impl Kernel {
    /// A kernel running `kind` on a fresh file.
    pub fn new(cfg: ModelConfig, kind: StrategyKind) -> Result<Kernel, Error> {
        let (geo, host) = Self::new_host(&cfg)?;
        let strategy = build(kind, geo, cfg.populated, cfg.options, host.clone())?;
        Ok(Self::assemble(geo, host, strategy))
    }

    /// A kernel running the engine on a wrapper of the model's host (to
    /// plant bugs and show that the model's checks catch them).
    pub fn with_host_wrapper(
        cfg: ModelConfig,
        wrap: impl FnOnce(Arc<KernelHost>) -> Arc<dyn Host>,
    ) -> Result<Kernel, Error> {
        let (geo, host) = Self::new_host(&cfg)?;
        let strategy = build_engine(geo, cfg.populated, cfg.options, wrap(host.clone()))?;
        Ok(Self::assemble(geo, host, strategy))
    }

    fn new_host(cfg: &ModelConfig) -> Result<(Geometry, Arc<KernelHost>), Error> {
        let geo = cfg.geometry()?;
        Ok((
            geo,
            Arc::new(KernelHost::new(geo, cfg.populated, cfg.start)),
        ))
    }

    fn assemble(geo: Geometry, host: Arc<KernelHost>, strategy: Box<dyn Strategy>) -> Kernel {
        Kernel {
            geo,
            host,
            strategy,
            expected: Mutex::new(BTreeMap::new()),
            touched: Mutex::new(RangeMap::new(false)),
            next_token: Mutex::new(0),
            torn: AtomicBool::new(false),
            sequential: AtomicBool::new(true),
        }
    }

    /// Stop checking reads and punches as they happen: for callers that
    /// race guest accesses with punches on other threads (the host's own
    /// checks stay on).
    pub fn concurrent(self) -> Self {
        // ORDERING: Relaxed: set before the kernel is shared.
        self.sequential.store(false, Ordering::Relaxed);
        self
    }

    fn is_sequential(&self) -> bool {
        // ORDERING: Relaxed: a configuration flag set before sharing.
        self.sequential.load(Ordering::Relaxed)
    }

    fn is_torn(&self) -> bool {
        // ORDERING: Relaxed: the strategy orders teardown itself; this only
        // keeps the model from querying a torn-down strategy.
        self.torn.load(Ordering::Relaxed)
    }

    /// The strategy.
    pub fn kind(&self) -> StrategyKind {
        self.strategy.kind()
    }

    /// The file's geometry (size, huge page order, and what follows).
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The simulated host.
    pub fn host(&self) -> &KernelHost {
        &self.host
    }

    /// The strategy itself.
    pub fn strategy(&self) -> &dyn Strategy {
        &*self.strategy
    }

    /// The strategy's statistics (CONTRACT.md §6).
    pub fn stats(&self) -> Stats {
        self.strategy.stats()
    }

    fn touch(&self, r: ByteRange) {
        let hps = self.geo.huge_page_size();
        lock(&self.touched).set(r.offset / hps, (r.end() - 1) / hps + 1, true);
    }

    // ---- the VMM's operations ------------------------------------------------

    /// Punch a range; then check invariant 2 (no private subpage of the
    /// range is still mapped).
    pub fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.strategy.punch(offset, len)?;
        let r = ByteRange::new(offset, len);
        self.touch(r);
        let (s0, s1) = subpage_span(r);
        {
            let mut exp = lock(&self.expected);
            for (_, v) in exp.range_mut(s0..s1) {
                *v = 0;
            }
        }
        if self.is_sequential() {
            let mut at = s0;
            while let Some(s) = self.host.first_mapped(at, s1) {
                if self.host.attribute(s) == Attribute::Private {
                    self.host.record(Violation::PrivateMappingSurvivedPunch {
                        offset: s * SUBPAGE_SIZE,
                    });
                    break;
                }
                at = s + 1;
            }
        }
        Ok(())
    }

    /// Convert a range.
    pub fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        let res = self.strategy.convert(offset, len, to);
        if res.is_ok() {
            self.touch(ByteRange::new(offset, len));
        }
        res
    }

    /// Populate a range.
    pub fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        let res = self.strategy.populate(offset, len);
        if self.geo.validate(offset, len).is_some() && !self.is_torn() {
            self.touch(ByteRange::new(offset, len));
        }
        res
    }

    /// Flush a range.
    pub fn flush(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.strategy.flush(offset, len)?;
        self.touch(ByteRange::new(offset, len));
        Ok(())
    }

    /// Tear the file down; then check that nothing is left allocated but
    /// what the strategy says it could not free (invariant 6).
    pub fn teardown(&self) -> Vec<ByteRange> {
        let left = self.strategy.teardown();
        // ORDERING: Relaxed: see `is_torn`.
        self.torn.store(true, Ordering::Relaxed);
        let left_bytes: u64 = left.iter().map(|r| r.len).sum();
        let resident = self.host.memory_figures().resident_bytes;
        if resident > left_bytes {
            self.host.record(Violation::Leak {
                bytes: resident - left_bytes,
            });
        }
        left
    }

    // ---- the guest -----------------------------------------------------------

    fn subpage(&self, offset: u64) -> Result<u64, Error> {
        if self.is_torn() {
            return Err(Error::TornDown);
        }
        self.geo
            .validate(offset, SUBPAGE_SIZE)
            .map(|r| r.first_subpage())
            .ok_or(Error::InvalidRange {
                offset,
                len: SUBPAGE_SIZE,
            })
    }

    /// A guest fault on subpage `s`, with KVM's retry protocol: snapshot
    /// the MMU sequence, populate (the strategy's fault-in), look up and
    /// map, retry if an invalidation got in between.
    fn fault(&self, s: u64) -> Result<(), Error> {
        let h = s >> self.geo.order();
        for _ in 0..MAX_FAULT_RETRIES {
            let seq = self.host.mmu_seq();
            self.strategy.populate(s * SUBPAGE_SIZE, SUBPAGE_SIZE)?;
            let order = self.strategy.max_mapping_order(h);
            if self.host.fault_install(seq, s, order) {
                return Ok(());
            }
        }
        Err(Error::AllocationFailed {
            offset: s * SUBPAGE_SIZE,
            errno: hugepunch::EAGAIN,
        })
    }

    fn access(&self, s: u64, write: Option<u64>) -> Result<u64, Error> {
        loop {
            if self.host.attribute(s) == Attribute::Shared {
                return Ok(self.host.shared_access(s, write));
            }
            match self.host.access_mapped(s, write) {
                Some(Ok(v)) => return Ok(v),
                // Recorded by the host; the access itself went nowhere.
                Some(Err(_)) => return Ok(0),
                None => self.fault(s)?,
            }
        }
    }

    /// The guest writes a fresh token to the subpage at `offset`; returns it.
    pub fn guest_write(&self, offset: u64) -> Result<u64, Error> {
        let token = {
            let mut t = lock(&self.next_token);
            *t += 1;
            *t
        };
        self.guest_write_value(offset, token)?;
        Ok(token)
    }

    /// The guest writes `value` (nonzero) to the subpage at `offset`.
    pub fn guest_write_value(&self, offset: u64, value: u64) -> Result<(), Error> {
        let s = self.subpage(offset)?;
        let private = self.host.attribute(s) == Attribute::Private;
        self.access(s, Some(value))?;
        if private {
            lock(&self.expected).insert(s, value);
        }
        Ok(())
    }

    /// The guest reads the subpage at `offset` (faulting it in if needed);
    /// a private subpage's content is checked against what it must be.
    pub fn guest_read(&self, offset: u64) -> Result<u64, Error> {
        let s = self.subpage(offset)?;
        let private = self.host.attribute(s) == Attribute::Private;
        let found = self.access(s, None)?;
        if private && self.is_sequential() {
            let want = lock(&self.expected).get(&s).copied().unwrap_or(0);
            self.judge(s, want, found);
        }
        Ok(found)
    }

    fn judge(&self, s: u64, want: u64, found: u64) -> Option<Violation> {
        if found == want {
            return None;
        }
        let offset = s * SUBPAGE_SIZE;
        let v = if want == 0 {
            Violation::StaleRead { offset, found }
        } else {
            Violation::LostWrite {
                offset,
                expected: want,
                found,
            }
        };
        self.host.record(v);
        Some(v)
    }

    /// What the VMM reads at `offset` when it reads the file's memory
    /// itself (no fault): zeros for a punched subpage, else the memory.
    pub fn vmm_read(&self, offset: u64) -> u64 {
        if self.strategy.is_punched(offset) {
            0
        } else {
            self.host.content(offset / SUBPAGE_SIZE)
        }
    }

    /// Read back (as the VMM, changing nothing) every subpage the guest
    /// wrote and check it.
    pub fn verify(&self) -> Verification {
        let mut out = Verification::default();
        if self.is_torn() {
            return out;
        }
        let exp: Vec<(u64, u64)> = lock(&self.expected).iter().map(|(&s, &v)| (s, v)).collect();
        for (s, want) in exp {
            out.checked += 1;
            match self.judge(s, want, self.vmm_read(s * SUBPAGE_SIZE)) {
                Some(Violation::StaleRead { .. }) => out.stale_reads += 1,
                Some(_) => out.lost_writes += 1,
                None => {}
            }
        }
        out
    }

    // ---- reports -------------------------------------------------------------

    /// How huge page `h` looks now.
    pub fn page_view(&self, h: u64) -> PageView {
        match self.host.backing(h) {
            HugePageBacking::Absent => PageView::Absent,
            HugePageBacking::Split { .. } => PageView::Split,
            HugePageBacking::Huge => {
                let touched = lock(&self.touched).get(h);
                match if touched && !self.is_torn() {
                    self.strategy.pending_in(h)
                } else {
                    0
                } {
                    0 => PageView::Intact,
                    k => PageView::Pending(k),
                }
            }
        }
    }

    /// The model's figures now.
    pub fn figures(&self) -> Figures {
        let host = self.host.counters();
        let (huge, small) = self.host.mappings_installed();
        let by_kind = self.host.violation_counts();
        Figures {
            strategy: self.kind(),
            memory: self.host.memory_figures(),
            bytes_freed: host.bytes_freed,
            bytes_freed_net: host.bytes_freed.saturating_sub(host.bytes_allocated),
            huge_mappings_installed: huge,
            small_mappings_installed: small,
            host,
            violations: by_kind.values().sum(),
            violations_by_kind: by_kind,
            tracking_bytes: self.strategy.tracking_bytes(),
            model_bytes: self.host.model_bytes()
                + lock(&self.expected).len() * 32
                + lock(&self.touched).runs() * 48,
        }
    }

    /// The violations recorded so far (the first 256).
    pub fn violations(&self) -> Vec<Violation> {
        self.host.violations()
    }
}

/// The operations of a trace or a pattern on the kernel
/// ([`hugepunch_workload::apply`]).
impl Target for Kernel {
    type Error = Error;
    fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        Kernel::punch(self, offset, len)
    }
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        Kernel::convert(self, offset, len, to)
    }
    fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        Kernel::populate(self, offset, len)
    }
    fn flush(&self, offset: u64, len: u64) -> Result<(), Error> {
        Kernel::flush(self, offset, len)
    }
    /// Tears down; what the strategy could not free is checked by the
    /// kernel (invariant 6) and shows in its figures.
    fn teardown(&self) -> Result<(), Error> {
        Kernel::teardown(self);
        Ok(())
    }
}

/// The guest's accesses of a demo workload
/// ([`hugepunch_workload::run_step`]); a failed one (after teardown) is an
/// error for the caller to count.
impl Guest for Kernel {
    fn guest_write(&self, offset: u64) -> Result<(), Error> {
        Kernel::guest_write(self, offset).map(drop)
    }
    fn guest_read(&self, offset: u64) -> Result<(), Error> {
        Kernel::guest_read(self, offset).map(drop)
    }
}
