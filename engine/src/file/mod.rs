//! The engine: one guest_memfd-like file and the operations of CONTRACT.md §3.
//!
//! The fast paths (`punch` of a `HUGE` huge page, the completion claim, the
//! conversion check, the un-punch of `populate`) follow the protocol of
//! [`crate::page`] and take no lock. The slow paths (forced splits by the
//! shrinker and `flush`, teardown, and operations on `SPLIT` huge pages) own
//! one huge page at a time through its `BUSY` bit; `flush` and teardown
//! also serialise on one mutex and call the host under it (CONTRACT.md §5
//! allows it). No punch ever takes that mutex: the shrinker a punch runs is
//! served by one owner at a time without a lock (see `shrink`).
//!
//! One module per operation family: [`punch`] (and the completion),
//! [`populate`] (and the un-punch), [`convert`], [`queries`], [`slow`]
//! (forced splits, the shrinker, `flush`, teardown). This module holds the
//! file itself, validation, accounting, and the host calls (each through
//! [`crate::unwind`]: a panicking callback counts as a failed call).

mod batch;
mod convert;
mod populate;
mod punch;
mod queries;
mod slow;

use crate::error::{Error, HostError};
use crate::host::{Attribute, CallbackSlot, Callbacks, Host, Policy};
use crate::index::{Index, Slot};
use crate::page::{
    self, runs, Entry, Page, Snapshot, ABSENT, BUSY, COMPLETING, CONVERT_ONE, HUGE, PUNCH_ONE,
    SPLIT, TORN, UNPUNCH_ONE,
};
use crate::range::{ByteRange, Geometry, Hint, PagePart, SUBPAGE_SHIFT, SUBPAGE_SIZE};
use crate::stats::{Counters, Delta, Stats, C};
use crate::sync::{backoff, lock, AtomicBool, AtomicU64, Mutex, Ordering};
use crate::unwind::Caught;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// How to build a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Size in bytes: a positive multiple of the huge page size.
    pub size: u64,
    /// Huge page order in 4 KiB units: 9 = 2 MiB (the default), 18 = 1 GiB;
    /// every order from 1 to 18 is accepted.
    pub order: u8,
    /// Limit on pending bytes; `None` = unlimited (the default). `Some(0)`
    /// is a real budget of zero.
    pub budget: Option<u64>,
    /// What a conversion to private does over pending punches.
    pub policy: Policy,
    /// Every huge page starts `Huge` (populated, the default) or `Absent`.
    pub populated: bool,
}

impl Config {
    /// A populated file of `size` bytes with 2 MiB huge pages, no budget and
    /// the `Reject` policy.
    pub fn new(size: u64) -> Self {
        Config {
            size,
            order: 9,
            budget: None,
            policy: Policy::Reject,
            populated: true,
        }
    }

    /// Set the huge page order.
    pub fn order(mut self, order: u8) -> Self {
        self.order = order;
        self
    }

    /// Set a pending-bytes budget.
    pub fn budget(mut self, bytes: u64) -> Self {
        self.budget = Some(bytes);
        self
    }

    /// Set the conversion policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Start with every huge page `Absent` (nothing allocated).
    pub fn empty(mut self) -> Self {
        self.populated = false;
        self
    }
}

/// How a huge page is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Backing {
    /// Nothing allocated.
    Absent,
    /// One huge folio backs it (some subpages may be punched, pending).
    Huge,
    /// Backed by individual 4 KiB pages, some of which may be absent.
    Split,
}

/// The state of one 4 KiB subpage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubpageState {
    /// No memory backs it.
    Absent,
    /// Allocated and readable.
    Present,
    /// Punched, not yet freed: reads as zeros; populate before writing.
    Punched,
}

/// What teardown could not free.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownReport {
    /// Ranges still allocated because their free failed (retried by the
    /// next `teardown`).
    pub still_allocated: Vec<ByteRange>,
}

/// One guest_memfd-like file whose 4 KiB hole punches are coalesced into
/// whole huge page frees. `Send + Sync`: every operation takes `&self`.
pub struct HugePunch {
    geo: Geometry,
    index: Index,
    callbacks: CallbackSlot,
    counters: Counters,
    budget: Option<u64>,
    /// Serialises `flush` and teardown (never taken by a punch).
    slow: Mutex<()>,
    /// Shrinker requests not yet served (see `shrink`): 0 when no
    /// shrinker runs.
    shrink_requests: AtomicU64,
    torn: AtomicBool,
}

impl HugePunch {
    /// Build a file. Fails with [`Error::InvalidGeometry`] (naming the
    /// size, the order and the huge page size) when the order is outside
    /// 1..=18 or the size is not a positive multiple of the huge page size
    /// of at most 4 PiB.
    #[allow(clippy::disallowed_types)] // the public API's `Arc`: std's, also under loom
    pub fn new(config: Config, host: std::sync::Arc<dyn Host>) -> Result<Self, Error> {
        let geo = Geometry::new(config.size, config.order)?;
        Ok(HugePunch {
            geo,
            index: Index::new(geo, config.populated),
            callbacks: CallbackSlot::new(Callbacks::new(host, config.policy)),
            counters: Counters::new(config.budget.is_some()),
            budget: config.budget,
            slow: Mutex::new(()),
            shrink_requests: AtomicU64::new(0),
            torn: AtomicBool::new(false),
        })
    }

    /// The file's geometry: its size, huge page order, and the split of a
    /// range into parts per huge page.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.geo.size()
    }

    /// Huge page order.
    pub fn order(&self) -> u8 {
        self.geo.order()
    }

    /// Huge page size in bytes.
    pub fn huge_page_size(&self) -> u64 {
        self.geo.huge_page_size()
    }

    /// Number of huge pages.
    pub fn huge_pages(&self) -> u64 {
        self.geo.huge_pages()
    }

    /// Replace the host. Operations that already started finish with the
    /// callbacks they loaded; later ones use the new host.
    #[allow(clippy::disallowed_types)] // the public API's `Arc`: std's, also under loom
    pub fn set_host(&self, host: std::sync::Arc<dyn Host>) {
        self.callbacks
            .update(|cur| Callbacks::new(host.clone(), cur.policy));
    }

    /// Replace the conversion policy (same rules as [`set_host`](Self::set_host)).
    pub fn set_policy(&self, policy: Policy) {
        self.callbacks
            .update(|cur| Callbacks::new(cur.host.clone(), policy));
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }

    /// Bytes of tracking state allocated now (the index and its chunks).
    pub fn tracking_bytes(&self) -> usize {
        self.index.tracking_bytes()
    }

    // ---- validation and accounting -------------------------------------

    pub(super) fn count_error(&self, c: C) {
        let mut d = Delta::default();
        d.add(c, 1);
        self.counters.flush_counts(&mut d);
    }

    /// Is the file torn down? (Validation of every call but teardown.)
    pub(super) fn live(&self) -> Result<(), Error> {
        // ORDERING: Acquire pairs with teardown's Release store: an
        // operation that sees the file live may still run concurrently with
        // teardown, which waits for it page by page; one that sees it torn
        // refuses.
        if self.torn.load(Ordering::Acquire) {
            return Err(Error::TornDown);
        }
        Ok(())
    }

    /// Validate a range (`TornDown` first, then `InvalidRange`), counting
    /// nothing: the read-only queries, which a VMM may poll freely.
    pub(super) fn validate(&self, offset: u64, len: u64) -> Result<ByteRange, Error> {
        self.live()?;
        self.geo
            .validate(offset, len)
            .ok_or(Error::InvalidRange { offset, len })
    }

    /// Validate a range for an operation that changes something, counting
    /// a failure in its error counter (CONTRACT.md §6).
    pub(super) fn check(&self, offset: u64, len: u64) -> Result<ByteRange, Error> {
        self.validate(offset, len).inspect_err(|e| {
            self.count_error(match e {
                Error::TornDown => C::ErrorsTornDown,
                _ => C::ErrorsInvalidRange,
            })
        })
    }

    pub(super) fn hint(&self, h: u64) -> Hint {
        Hint {
            huge_page: h,
            order: self.geo.order(),
        }
    }

    pub(super) fn part_range(&self, p: PagePart) -> ByteRange {
        self.geo.part_range(p.huge_page, p.first, p.count)
    }

    pub(super) fn over_budget(&self, pending: i64) -> bool {
        self.budget
            .is_some_and(|b| pending.max(0) as u64 * SUBPAGE_SIZE > b)
    }

    /// End of an operation: counters, pending, the shrinker, the peak.
    pub(super) fn finish(&self, cb: &Callbacks, d: &mut Delta, may_shrink: bool) {
        let mut pending = self.counters.apply_pending(d);
        if (may_shrink || d.shrink_wanted) && self.over_budget(pending) {
            self.shrink(cb, d);
            pending = self.counters.pending();
        }
        self.counters.observe_peak(pending);
        self.counters.flush_counts(d);
        // Only now, with the statistics applied, may a host panic go on.
        d.caught.resume();
    }

    // ---- host calls (each through `Caught`: a panic counts as a failure) --

    /// The shared-state check; a panic counts as "not shared".
    pub(super) fn is_shared(&self, cb: &Callbacks, r: ByteRange, d: &mut Delta) -> bool {
        d.caught.call(|| cb.host().is_shared(r)).unwrap_or(false)
    }

    /// One invalidation of `r`. Returns `false` when `invalidate_begin`
    /// panicked: the invalidation did not happen, nothing may be freed
    /// under it.
    pub(super) fn invalidate(&self, cb: &Callbacks, r: ByteRange, h: u64, d: &mut Delta) -> bool {
        let hint = self.hint(h);
        if d.caught
            .call(|| cb.host().invalidate_begin(r, hint))
            .is_none()
        {
            return false;
        }
        d.add(C::Invalidations, 1);
        // A panicking end: the invalidation happened all the same.
        let _ = d.caught.call(|| cb.host().invalidate_end(r));
        true
    }

    /// Free one run and count it; `true` if it was freed.
    pub(super) fn free(&self, cb: &Callbacks, r: ByteRange, order: u8, d: &mut Delta) -> bool {
        d.add(C::FreeCalls, 1);
        let freed = matches!(d.caught.call(|| cb.host().free(r, order)), Some(Ok(())));
        if !freed {
            d.add(C::FreeErrors, 1);
        }
        freed
    }

    /// Free huge page `h` whole inside one invalidation of it (a
    /// completion, teardown, a fully punched huge page forced out); `true`
    /// if it was freed. Nothing is freed when `invalidate_begin` panics.
    pub(super) fn free_whole(&self, cb: &Callbacks, h: u64, d: &mut Delta) -> bool {
        let whole = self.geo.huge_page_range(h);
        let hint = self.hint(h);
        if d.caught
            .call(|| cb.host().invalidate_begin(whole, hint))
            .is_none()
        {
            return false;
        }
        let freed = self.free(cb, whole, self.geo.order(), d);
        let _ = d.caught.call(|| cb.host().invalidate_end(whole));
        d.add(C::Invalidations, 1);
        freed
    }

    /// Zero `r`; `false` if `zero` panicked (the subpages were not zeroed).
    pub(super) fn zero(&self, cb: &Callbacks, r: ByteRange, d: &mut Delta) -> bool {
        d.caught.call(|| cb.host().zero(r)).is_some()
    }
}

/// Allocate through the host; a panic counts as a failed allocation.
pub(super) fn allocate(
    cb: &Callbacks,
    r: ByteRange,
    order: u8,
    d: &mut Delta,
) -> Result<(), HostError> {
    d.caught
        .call(|| cb.host().allocate(r, order))
        .unwrap_or(Err(HostError {
            errno: crate::error::EIO,
        }))
}

/// Absent subpages of a `SPLIT` huge page (owner only).
pub(super) fn page_absent(page: Page<'_>) -> u32 {
    page.owner_bits().iter().map(|(_, b)| b.count_ones()).sum()
}

/// Runs of present (bit clear) subpages of a `SPLIT` huge page within
/// `first .. first + count` (owner only).
pub(super) fn present_runs(page: Page<'_>, first: u32, count: u32) -> page::Runs {
    let absent = page.read_bits(first, count);
    runs(page::word_masks(first, count).map(|(w, mask)| {
        let a = absent
            .iter()
            .find(|(aw, _)| *aw == w)
            .map_or(0, |(_, b)| *b);
        (w, mask & !a)
    }))
}
