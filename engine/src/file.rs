//! The engine: one guest_memfd-like file and the operations of SPEC.md §3.
//!
//! The fast paths (`punch` of a `HUGE` huge page, the completion claim, the
//! conversion check, the un-punch of `populate`) follow the protocol of
//! [`crate::page`] and take no lock. The slow paths (forced splits by the
//! shrinker and `flush`, teardown, and operations on `SPLIT` huge pages) own
//! one huge page at a time through its `BUSY` bit; the shrinker, `flush`
//! and teardown also serialise among themselves on one mutex.

use crate::error::{Error, HostError};
use crate::host::{Attribute, CallbackSlot, Callbacks, Host, Policy};
use crate::index::{Index, Slot};
use crate::page::{
    self, runs, Entry, Page, Snapshot, ABSENT, BUSY, COMPLETING, CONVERT_ONE, HUGE, PUNCH_ONE,
    SPLIT, TORN, UNPUNCH_ONE,
};
use crate::range::{ByteRange, Geometry, Hint, PagePart, SUBPAGE_SIZE};
use crate::stats::{Counters, Delta, Stats, C};
use crate::sync::{backoff, lock, AtomicBool, Mutex, Ordering};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// The largest huge page order accepted (1 GiB huge pages).
pub const MAX_ORDER: u8 = 18;

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
    /// Serialises the shrinker, `flush` and teardown.
    slow: Mutex<()>,
    torn: AtomicBool,
}

impl HugePunch {
    /// Build a file. Fails with [`Error::InvalidConfig`] when the order is
    /// outside 1..=18 or the size is not a positive multiple of the huge
    /// page size.
    pub fn new(config: Config, host: std::sync::Arc<dyn Host>) -> Result<Self, Error> {
        if !(1..=MAX_ORDER).contains(&config.order) {
            return Err(Error::InvalidConfig("order must be between 1 and 18"));
        }
        let geo = Geometry {
            size: config.size,
            order: config.order,
        };
        if config.size > Index::MAX_SIZE {
            return Err(Error::InvalidConfig("size must be at most 4 PiB"));
        }
        if config.size == 0 || config.size % geo.huge_page_size() != 0 {
            return Err(Error::InvalidConfig(
                "size must be a positive multiple of the huge page size",
            ));
        }
        Ok(HugePunch {
            geo,
            index: Index::new(geo, config.populated),
            callbacks: CallbackSlot::new(Callbacks {
                host,
                policy: config.policy,
            }),
            counters: Counters::new(),
            budget: config.budget,
            slow: Mutex::new(()),
            torn: AtomicBool::new(false),
        })
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.geo.size
    }

    /// Huge page order.
    pub fn order(&self) -> u8 {
        self.geo.order
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
    pub fn set_host(&self, host: std::sync::Arc<dyn Host>) {
        self.callbacks.update(|cur| Callbacks {
            host: host.clone(),
            policy: cur.policy,
        });
    }

    /// Replace the conversion policy (same rules as [`set_host`](Self::set_host)).
    pub fn set_policy(&self, policy: Policy) {
        self.callbacks.update(|cur| Callbacks {
            host: cur.host.clone(),
            policy,
        });
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

    fn count_error(&self, c: C) {
        let mut d = Delta::default();
        d.add(c, 1);
        self.counters.flush_counts(&mut d);
    }

    fn live(&self) -> Result<(), Error> {
        // ORDERING: Acquire pairs with teardown's Release store: an
        // operation that sees the file live may still run concurrently with
        // teardown, which waits for it page by page; one that sees it torn
        // refuses.
        if self.torn.load(Ordering::Acquire) {
            self.count_error(C::ErrorsTornDown);
            return Err(Error::TornDown);
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: u64) -> Result<ByteRange, Error> {
        self.live()?;
        self.geo.validate(offset, len).ok_or_else(|| {
            self.count_error(C::ErrorsInvalidRange);
            Error::InvalidRange { offset, len }
        })
    }

    fn hint(&self, h: u64) -> Hint {
        Hint {
            huge_page: h,
            order: self.geo.order,
        }
    }

    fn part_range(&self, p: PagePart) -> ByteRange {
        self.geo.part_range(p.huge_page, p.first, p.count)
    }

    fn over_budget(&self, pending: i64) -> bool {
        self.budget
            .is_some_and(|b| pending.max(0) as u64 * SUBPAGE_SIZE > b)
    }

    /// End of an operation: counters, pending, the shrinker, the peak.
    fn finish(&self, cb: &Callbacks, d: &mut Delta, may_shrink: bool) {
        let mut pending = self.counters.apply_pending(d);
        if may_shrink && self.over_budget(pending) {
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
    fn is_shared(&self, cb: &Callbacks, r: ByteRange, d: &mut Delta) -> bool {
        d.caught.call(|| cb.host.is_shared(r)).unwrap_or(false)
    }

    /// One invalidation of `r`. Returns `false` when `invalidate_begin`
    /// panicked: the invalidation did not happen, nothing may be freed
    /// under it.
    fn invalidate(&self, cb: &Callbacks, r: ByteRange, h: u64, d: &mut Delta) -> bool {
        let hint = self.hint(h);
        if d.caught
            .call(|| cb.host.invalidate_begin(r, hint))
            .is_none()
        {
            return false;
        }
        d.add(C::Invalidations, 1);
        // A panicking end: the invalidation happened all the same.
        let _ = d.caught.call(|| cb.host.invalidate_end(r));
        true
    }

    /// Free one run and count it; `true` if it was freed.
    fn free(&self, cb: &Callbacks, r: ByteRange, order: u8, d: &mut Delta) -> bool {
        d.add(C::FreeCalls, 1);
        let freed = matches!(d.caught.call(|| cb.host.free(r, order)), Some(Ok(())));
        if !freed {
            d.add(C::FreeErrors, 1);
        }
        freed
    }

    /// Free huge page `h` whole inside one invalidation of it (a
    /// completion, teardown, a fully punched huge page forced out); `true`
    /// if it was freed. Nothing is freed when `invalidate_begin` panics.
    fn free_whole(&self, cb: &Callbacks, h: u64, d: &mut Delta) -> bool {
        let whole = self.geo.huge_page_range(h);
        let hint = self.hint(h);
        if d.caught
            .call(|| cb.host.invalidate_begin(whole, hint))
            .is_none()
        {
            return false;
        }
        let freed = self.free(cb, whole, self.geo.order, d);
        let _ = d.caught.call(|| cb.host.invalidate_end(whole));
        d.add(C::Invalidations, 1);
        freed
    }

    /// Zero `r`; `false` if `zero` panicked (the subpages were not zeroed).
    fn zero(&self, cb: &Callbacks, r: ByteRange, d: &mut Delta) -> bool {
        d.caught.call(|| cb.host.zero(r)).is_some()
    }

    // ---- punch -----------------------------------------------------------

    /// Punch `offset .. offset + len`: defer what can be deferred, free what
    /// must be freed, invalidate what may be private (SPEC.md §3).
    pub fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        let r = self.check(offset, len)?;
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        d.add(C::PunchCalls, 1);
        for part in self.geo.parts(r) {
            self.punch_part(&cb, part, &mut d);
        }
        self.finish(&cb, &mut d, true);
        Ok(())
    }

    fn punch_part(&self, cb: &Callbacks, part: PagePart, d: &mut Delta) {
        let h = part.huge_page;
        let page = match self.index.existing(h) {
            Some(page) => page,
            None if self.index.initial().mode() == ABSENT => return,
            None => self.index.page(h),
        };
        let whole = part.count == page.full();
        let r = self.part_range(part);
        loop {
            match page.enter(PUNCH_ONE) {
                Entry::Registered => {
                    let newly = page.set_bits(part.first, part.count);
                    let exit = page.exit(PUNCH_ONE, newly as i64);
                    d.pending += newly as i64;
                    if !whole {
                        d.add(C::PunchedSubpages, newly as u64);
                        // The shared-state check, after the exit: see the
                        // punch-vs-conversion race in `page`.
                        #[cfg(not(hugepunch_broken = "conversion"))]
                        let converting = exit.after.converting() > 0;
                        // BROKEN on purpose, test-only (`--cfg
                        // hugepunch_broken="conversion"`, see loom-tests):
                        // the punch ignores a conversion in flight and trusts
                        // `is_shared` alone, so a conversion that checked the
                        // bits before this punch set them, and changes the
                        // attribute after `is_shared` answered, goes ahead
                        // over a pending punch that was never invalidated.
                        #[cfg(hugepunch_broken = "conversion")]
                        let converting = false;
                        if (converting || !self.is_shared(cb, r, d)) && self.invalidate(cb, r, h, d)
                        {
                            d.add(C::InvalidationsImmediate, 1);
                        }
                    }
                    if exit.claimed_completion {
                        self.complete(cb, h, page, d);
                    } else if whole {
                        // Another operation is registered and will complete
                        // the huge page when it leaves; we may not wait for
                        // it, so this range is invalidated now.
                        self.invalidate(cb, r, h, d);
                    }
                    return;
                }
                Entry::Completing => {
                    // The huge page is being freed whole; we may not wait
                    // for that completion to invalidate, so we do it now
                    // when the range may be private, or may be becoming
                    // private: a conversion marked on the huge page (read
                    // with an RMW after the shared-state check, so that a
                    // conversion that marks later also changes the
                    // attribute after that check answered) — either the
                    // conversion is refused or this punch invalidates.
                    if whole {
                        self.invalidate(cb, r, h, d);
                    } else if (!self.is_shared(cb, r, d) || page.load_rmw().converting() > 0)
                        && self.invalidate(cb, r, h, d)
                    {
                        d.add(C::InvalidationsImmediate, 1);
                    }
                    return;
                }
                Entry::NotHuge(s) if s.is(TORN) || s.mode() == ABSENT => return,
                Entry::NotHuge(_) => {
                    if self.punch_split(cb, part, page, d) {
                        return;
                    }
                }
            }
        }
    }

    /// Punch part of a `SPLIT` huge page: free its present subpages now.
    /// Returns `false` if the huge page was no longer `SPLIT`.
    fn punch_split(&self, cb: &Callbacks, part: PagePart, page: Page<'_>, d: &mut Delta) -> bool {
        let h = part.huge_page;
        let s = page.claim_busy();
        if s.mode() != SPLIT {
            page.release_busy(s.mode(), s.count(), 0);
            return false;
        }
        let mut absent = s.count();
        let present = present_runs(page, part.first, part.count);
        // Nothing is freed unless the invalidation happened.
        let invalidated = present.is_empty() || self.invalidate(cb, self.part_range(part), h, d);
        for (first, count) in present {
            let run = self.geo.part_range(h, first, count);
            if invalidated && self.free(cb, run, 0, d) {
                page.owner_set(first, count, true);
                absent += count;
                d.add(C::SmallFreedSubpages, count as u64);
            } else {
                // The subpages stay present; they were punched, so they
                // must read as zeros (invariant 5).
                let _ = self.zero(cb, run, d);
            }
        }
        if absent == page.full() {
            page.owner_set(0, page.full(), false);
            page.release_busy(ABSENT, 0, 0);
        } else {
            page.release_busy(SPLIT, absent, 0);
        }
        true
    }

    /// Run a completion this thread claimed: one invalidation of the whole
    /// huge page, one free of its order.
    fn complete(&self, cb: &Callbacks, h: u64, page: Page<'_>, d: &mut Delta) {
        let freed = self.free_whole(cb, h, d);
        page.end_completion(freed);
        if freed {
            d.add(C::HugeFrees, 1);
            d.pending -= page.full() as i64;
        }
    }

    // ---- populate --------------------------------------------------------

    /// Populate `offset .. offset + len` (a fault, or a fallocate
    /// allocation): allocate `Absent` huge pages whole, un-punch and zero
    /// punched subpages, allocate absent subpages of `Split` huge pages.
    pub fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        let r = self.check(offset, len)?;
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        d.add(C::PopulateCalls, 1);
        let mut res = Ok(());
        for part in self.geo.parts(r) {
            res = self.populate_part(&cb, part, &mut d);
            if res.is_err() {
                break;
            }
        }
        self.finish(&cb, &mut d, false);
        res
    }

    fn populate_part(&self, cb: &Callbacks, part: PagePart, d: &mut Delta) -> Result<(), Error> {
        let h = part.huge_page;
        let page = self.index.page(h);
        loop {
            if nothing_to_unpunch(page, part) {
                return Ok(());
            }
            match page.enter(POPULATE_ONE) {
                Entry::Registered => {
                    let k = self.unpunch(cb, h, page, part, d);
                    let exit = page.exit(POPULATE_ONE, -(k as i64));
                    if d.caught.any() {
                        // A `zero` panicked: its subpages stay punched, and
                        // this populate stops here (the panic goes on).
                        if exit.claimed_completion {
                            self.complete(cb, h, page, d);
                        }
                        return Ok(());
                    }
                    if exit.claimed_completion {
                        // Concurrent punches filled the huge page while we
                        // found nothing to un-punch: complete it, then
                        // populate again.
                        self.complete(cb, h, page, d);
                        continue;
                    }
                    if exit.after.unpunching() > 0 {
                        // Another un-punch is still registered: it may have
                        // claimed (and be zeroing) part of our range, and
                        // we may not return before that is done. (One that
                        // left before our exit has finished its zeroing.)
                        // Then look again: if its `zero` panicked, it set
                        // its bits again, and they are ours to un-punch.
                        page.wait_unpunches();
                        if page.read_bits(part.first, part.count).is_empty() {
                            return Ok(());
                        }
                        continue;
                    }
                    return Ok(());
                }
                Entry::Completing => page.wait_completion(),
                Entry::NotHuge(s) if s.is(TORN) => return Err(Error::TornDown),
                Entry::NotHuge(s) if s.mode() == ABSENT => {
                    if page.try_claim_busy_if(ABSENT).is_none() {
                        continue;
                    }
                    let whole = self.geo.huge_page_range(h);
                    let order = self.geo.order;
                    let res = allocate(cb, whole, order, d);
                    return match res {
                        Ok(()) => {
                            page.release_busy(HUGE, 0, 0);
                            Ok(())
                        }
                        Err(e) => {
                            page.release_busy(ABSENT, 0, 0);
                            Err(Error::AllocationFailed {
                                offset: whole.offset,
                                errno: e.errno,
                            })
                        }
                    };
                }
                Entry::NotHuge(_) => {
                    if let Some(res) = self.populate_split(cb, part, page, d) {
                        return res;
                    }
                }
            }
        }
    }

    /// Un-punch the punched subpages of `part` (caller registered as an
    /// un-punch): claim their bits, zero them. Returns how many it
    /// un-punched (net of those a panicking `zero` left punched).
    fn unpunch(
        &self,
        cb: &Callbacks,
        h: u64,
        page: Page<'_>,
        part: PagePart,
        d: &mut Delta,
    ) -> u32 {
        let cleared = page.clear_bits(part.first, part.count);
        let mut k: u32 = cleared.iter().map(|(_, b)| b.count_ones()).sum();
        for (first, count) in runs(cleared) {
            if !self.zero(cb, self.geo.part_range(h, first, count), d) {
                // A panicking `zero`: the subpages stay punched. A punch
                // may have set some of these bits again meanwhile (and
                // counted them); `k` is what this un-punch took away net,
                // so `COUNT` and the pending count keep matching the bits.
                k -= page.set_bits(first, count);
            }
        }
        d.pending -= k as i64;
        d.add(C::RepopulatedSubpages, k as u64);
        k
    }

    /// Allocate the absent subpages of part of a `SPLIT` huge page.
    /// `None` if the huge page was no longer `SPLIT`.
    fn populate_split(
        &self,
        cb: &Callbacks,
        part: PagePart,
        page: Page<'_>,
        d: &mut Delta,
    ) -> Option<Result<(), Error>> {
        let h = part.huge_page;
        let s = page.claim_busy();
        if s.mode() != SPLIT || s.is(TORN) {
            page.release_busy(s.mode(), s.count(), 0);
            return s.is(TORN).then_some(Err(Error::TornDown));
        }
        let mut res = Ok(());
        for (first, count) in runs(page.read_bits(part.first, part.count)) {
            let run = self.geo.part_range(h, first, count);
            if let Err(e) = allocate(cb, run, 0, d) {
                res = Err(Error::AllocationFailed {
                    offset: run.offset,
                    errno: e.errno,
                });
                break;
            }
            page.owner_set(first, count, false);
        }
        page.release_busy(SPLIT, page_absent(page), 0);
        Some(res)
    }

    // ---- convert ---------------------------------------------------------

    /// Change the attribute of `offset .. offset + len`. To private, a
    /// pending punch in the range refuses the whole conversion (`Reject`,
    /// [`Error::PendingPunch`]) or is un-punched and zeroed first
    /// (`CancelAndZero`).
    pub fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        let r = self.check(offset, len)?;
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        d.add(C::ConvertCalls, 1);
        let res = match (to, cb.policy) {
            (Attribute::Shared, _) => {
                let _ = d
                    .caught
                    .call(|| cb.host.set_attributes(r, Attribute::Shared));
                Ok(())
            }
            (Attribute::Private, Policy::Reject) => self.convert_reject(&cb, r, &mut d),
            (Attribute::Private, Policy::CancelAndZero) => self.convert_cancel(&cb, r, &mut d),
        };
        d.add(
            if res.is_ok() {
                C::ConversionsOk
            } else {
                C::ConversionsRejected
            },
            1,
        );
        self.finish(&cb, &mut d, false);
        res
    }

    fn convert_reject(&self, cb: &Callbacks, r: ByteRange, d: &mut Delta) -> Result<(), Error> {
        let mut marked: SmallVec<[Page<'_>; 4]> = SmallVec::new();
        let mut refused = None;
        for part in self.geo.parts(r) {
            let page = self.index.page(part.huge_page);
            let before = page.mark_converting();
            marked.push(page);
            let pending = if before.mode() != HUGE {
                None
            } else if before.is(COMPLETING) {
                Some(part.first)
            } else {
                page.first_set_bit(part.first, part.count)
            };
            if let Some(sub) = pending {
                refused = Some(self.geo.part_range(part.huge_page, sub, 1).offset);
                break;
            }
        }
        if refused.is_none() {
            let _ = d
                .caught
                .call(|| cb.host.set_attributes(r, Attribute::Private));
        }
        marked.iter().for_each(|p| p.unmark_converting());
        match refused {
            Some(offset) => Err(Error::PendingPunch { offset }),
            None => Ok(()),
        }
    }

    fn convert_cancel(&self, cb: &Callbacks, r: ByteRange, d: &mut Delta) -> Result<(), Error> {
        // Every huge page of the range stays registered (or marked) until
        // the attribute has changed: (huge page, page, `Some(k)` if
        // registered with `k` subpages un-punched, `None` if only marked).
        let mut held: SmallVec<[(u64, Page<'_>, Option<u32>); 4]> = SmallVec::new();
        for part in self.geo.parts(r) {
            let h = part.huge_page;
            let page = self.index.page(h);
            loop {
                match page.enter(CANCEL_ONE) {
                    Entry::Registered => {
                        let k = self.unpunch(cb, h, page, part, d);
                        held.push((h, page, Some(k)));
                        break;
                    }
                    Entry::Completing => page.wait_completion(),
                    Entry::NotHuge(_) => {
                        // Not `HUGE` when we looked: a plain mark suffices,
                        // unless it became `HUGE` meanwhile.
                        let before = page.mark_converting();
                        if before.mode() == HUGE && !before.is(TORN) {
                            page.unmark_converting();
                            continue;
                        }
                        held.push((h, page, None));
                        break;
                    }
                }
            }
        }
        // A `zero` that panicked left its subpages punched: converting
        // them to private now would break invariant 3, so the conversion
        // does not go ahead (counted as refused; the panic goes on).
        let refused = d.caught.any();
        if !refused {
            let _ = d
                .caught
                .call(|| cb.host.set_attributes(r, Attribute::Private));
        }
        while let Some((h, page, k)) = held.pop() {
            match k {
                Some(k) => {
                    if page.exit(CANCEL_ONE, -(k as i64)).claimed_completion {
                        self.complete(cb, h, page, d);
                    }
                }
                None => page.unmark_converting(),
            }
        }
        match refused {
            true => Err(Error::PendingPunch { offset: r.offset }),
            false => Ok(()),
        }
    }

    // ---- queries -----------------------------------------------------------

    /// Stable state of subpage `sub` of huge page `h`.
    fn subpage(&self, h: u64, sub: u32) -> SubpageState {
        let Some(page) = self.index.existing(h) else {
            return if self.index.initial().mode() == HUGE {
                SubpageState::Present
            } else {
                SubpageState::Absent
            };
        };
        let mut spins = 0;
        loop {
            let s = page.load();
            if s.is(COMPLETING) {
                return SubpageState::Punched;
            }
            if !s.is(BUSY) && s.unpunching() == 0 {
                let bit = !page.read_bits(sub, 1).is_empty();
                let again = page.load();
                if again.mode() == s.mode()
                    && !again.is(BUSY | COMPLETING)
                    && again.unpunching() == 0
                {
                    return match (s.mode(), bit) {
                        (HUGE, true) => SubpageState::Punched,
                        (HUGE, false) | (SPLIT, false) => SubpageState::Present,
                        _ => SubpageState::Absent,
                    };
                }
            }
            backoff(&mut spins);
        }
    }

    /// The state of the subpage at `offset` (4 KiB aligned).
    pub fn subpage_state(&self, offset: u64) -> Result<SubpageState, Error> {
        let r = self.check(offset, SUBPAGE_SIZE)?;
        let part = self.geo.parts(r).next().expect("a valid range has a part");
        Ok(self.subpage(part.huge_page, part.first))
    }

    /// Is the subpage at `offset` punched and pending? A VMM reading guest
    /// memory itself must treat it as zeros, and populate before writing.
    pub fn is_punched(&self, offset: u64) -> Result<bool, Error> {
        Ok(self.subpage_state(offset)? == SubpageState::Punched)
    }

    /// The punched (pending) runs inside `offset .. offset + len`.
    pub fn pending_ranges(&self, offset: u64, len: u64) -> Result<Vec<ByteRange>, Error> {
        let r = self.check(offset, len)?;
        let mut out: Vec<ByteRange> = Vec::new();
        for part in self.geo.parts(r) {
            let punched = (part.first..part.first + part.count)
                .filter(|&sub| self.subpage(part.huge_page, sub) == SubpageState::Punched)
                .map(|sub| (sub / 64, 1u64 << (sub % 64)))
                .fold(page::Words::new(), |mut acc, (w, bit)| {
                    match acc.last_mut() {
                        Some((lw, bits)) if *lw == w as usize => *bits |= bit,
                        _ => acc.push((w as usize, bit)),
                    }
                    acc
                });
            for (first, count) in runs(punched) {
                let run = self.geo.part_range(part.huge_page, first, count);
                match out.last_mut() {
                    Some(last) if last.end() == run.offset => last.len += run.len,
                    _ => out.push(run),
                }
            }
        }
        Ok(out)
    }

    fn huge_page_state(&self, h: u64) -> Result<Snapshot, Error> {
        self.live()?;
        if h >= self.geo.huge_pages() {
            self.count_error(C::ErrorsInvalidRange);
            let size = self.geo.huge_page_size();
            return Err(Error::InvalidRange {
                offset: h.saturating_mul(size),
                len: size,
            });
        }
        Ok(self
            .index
            .existing(h)
            .map_or(self.index.initial(), |p| p.load()))
    }

    /// The largest mapping order the fault path may install for huge page
    /// `h`: the file's order when `h` is `Huge` with no punched subpage (and
    /// nothing in flight on it), 0 otherwise.
    pub fn max_mapping_order(&self, h: u64) -> Result<u8, Error> {
        let s = self.huge_page_state(h)?;
        Ok(if s.mode() == HUGE && s.idle() && s.count() == 0 {
            self.geo.order
        } else {
            0
        })
    }

    /// How huge page `h` is backed now.
    pub fn backing(&self, h: u64) -> Result<Backing, Error> {
        let s = self.huge_page_state(h)?;
        Ok(match s.mode() {
            HUGE => Backing::Huge,
            SPLIT => Backing::Split,
            _ => Backing::Absent,
        })
    }

    // ---- slow paths: forced split, shrinker, flush, teardown ---------------

    /// Force out what huge page `h` has pending: free it whole if every
    /// subpage is punched, otherwise invalidate it once and free its punched
    /// runs as 4 KiB pages, leaving it `SPLIT`. Applies its pending change
    /// at once. Returns whether anything was freed.
    fn force_split(&self, cb: &Callbacks, h: u64, page: Page<'_>, d: &mut Delta) -> bool {
        let s = page.claim_busy();
        let count = s.count();
        if s.mode() != HUGE || count == 0 || count > page.full() {
            page.release_busy(s.mode(), count, 0);
            return false;
        }
        if count == page.full() {
            // A completion whose free failed: free it whole now.
            if !self.free_whole(cb, h, d) {
                page.release_busy(HUGE, count, 0);
                return false;
            }
            page.owner_set(0, page.full(), false);
            page.release_busy(ABSENT, 0, 0);
            d.add(C::HugeFrees, 1);
        } else {
            if !self.invalidate(cb, self.geo.huge_page_range(h), h, d) {
                // Nothing may be freed: the huge page stays as it was.
                page.release_busy(HUGE, count, 0);
                return false;
            }
            let mut absent = count;
            for (first, count) in runs(page.owner_bits()) {
                let run = self.geo.part_range(h, first, count);
                if self.free(cb, run, 0, d) {
                    d.add(C::SmallFreedSubpages, count as u64);
                } else {
                    // A failed 4 KiB free leaves the subpages present; they
                    // were punched, so they must read as zeros.
                    let _ = self.zero(cb, run, d);
                    page.owner_set(first, count, false);
                    absent -= count;
                }
            }
            page.release_busy(SPLIT, absent, 0);
            d.add(C::ForcedSplits, 1);
        }
        d.pending -= count as i64;
        self.counters.apply_pending(d);
        true
    }

    /// Split the huge pages with the most punched subpages (lowest address
    /// between equals) until pending bytes are within the budget.
    fn shrink(&self, cb: &Callbacks, d: &mut Delta) {
        let _slow = lock(&self.slow);
        let mut failed: Vec<u64> = Vec::new();
        while self.over_budget(self.counters.pending()) {
            let victim = self
                .index
                .touched()
                .filter(|h| !failed.contains(h))
                .filter_map(|h| {
                    let s = self.index.existing(h)?.load();
                    let c = s.count();
                    (s.mode() == HUGE
                        && !s.is(COMPLETING)
                        && c > 0
                        && c <= self.index.page(h).full())
                    .then_some((c, h))
                })
                .max_by_key(|&(c, h)| (c, std::cmp::Reverse(h)));
            let Some((_, h)) = victim else { break };
            if !self.force_split(cb, h, self.index.page(h), d) {
                failed.push(h);
            }
        }
    }

    /// Force out what is pending in the huge pages `offset .. offset + len`
    /// touches: split each (all of its punched subpages, also those outside
    /// the range), or free it whole if every subpage is punched.
    pub fn flush(&self, offset: u64, len: u64) -> Result<(), Error> {
        let r = self.check(offset, len)?;
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        {
            let _slow = lock(&self.slow);
            for part in self.geo.parts(r) {
                if let Some(page) = self.index.existing(part.huge_page) {
                    if page.load().mode() == HUGE {
                        self.force_split(&cb, part.huge_page, page, &mut d);
                    }
                }
            }
        }
        self.finish(&cb, &mut d, false);
        Ok(())
    }

    /// Guest shutdown: free everything allocated (whole huge pages where
    /// they are whole); afterwards every other operation is
    /// [`Error::TornDown`]. A second teardown frees only what an earlier
    /// one failed to free (usually nothing) and is no error.
    pub fn teardown(&self) -> TeardownReport {
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        let mut report = TeardownReport::default();
        {
            let _slow = lock(&self.slow);
            // ORDERING: Release pairs with `live`'s Acquire; operations that
            // started before it are waited for page by page (`claim_busy`).
            self.torn.store(true, Ordering::Release);
            for c in 0..self.index.chunks() {
                match self.index.close(c) {
                    // Never touched: in the initial state, and closed now,
                    // so nothing else can touch them.
                    Slot::Closed(pages) if self.index.initial().mode() == HUGE => {
                        let mut unfreed = Vec::new();
                        for h in pages {
                            if self.free_whole(&cb, h, &mut d) {
                                d.add(C::TeardownFrees, 1);
                            } else {
                                unfreed.push(h);
                                report.still_allocated.push(self.geo.huge_page_range(h));
                            }
                        }
                        if !unfreed.is_empty() {
                            self.index.reopen(c, &unfreed);
                        }
                    }
                    Slot::Closed(_) | Slot::Gone => {}
                    Slot::Live(pages) => {
                        for h in pages {
                            self.teardown_page(&cb, h, &mut d, &mut report);
                        }
                    }
                }
            }
        }
        self.finish(&cb, &mut d, false);
        report
    }

    fn teardown_page(&self, cb: &Callbacks, h: u64, d: &mut Delta, report: &mut TeardownReport) {
        let page = self.index.page(h);
        let s = page.claim_busy();
        let whole = self.geo.huge_page_range(h);
        match s.mode() {
            HUGE => {
                if self.free_whole(cb, h, d) {
                    d.add(C::TeardownFrees, 1);
                    d.pending -= s.count() as i64;
                    page.owner_set(0, page.full(), false);
                    page.release_busy(ABSENT, 0, TORN);
                } else {
                    report.still_allocated.push(whole);
                    page.release_busy(HUGE, s.count(), TORN);
                }
            }
            SPLIT => {
                let present = present_runs(page, 0, page.full());
                // Nothing is freed unless the invalidation happened.
                let invalidated = present.is_empty() || self.invalidate(cb, whole, h, d);
                for (first, count) in present {
                    let run = self.geo.part_range(h, first, count);
                    if invalidated && self.free(cb, run, 0, d) {
                        page.owner_set(first, count, true);
                        d.add(C::SmallFreedSubpages, count as u64);
                    } else {
                        report.still_allocated.push(run);
                    }
                }
                let absent = page_absent(page);
                if absent == page.full() {
                    page.owner_set(0, page.full(), false);
                    page.release_busy(ABSENT, 0, TORN);
                } else {
                    page.release_busy(SPLIT, absent, TORN);
                }
            }
            _ => page.release_busy(ABSENT, 0, TORN),
        }
    }
}

/// A `CancelAndZero` conversion's registration: an un-punch and a mark.
const CANCEL_ONE: u64 = UNPUNCH_ONE + CONVERT_ONE;

/// What populate's un-punch registers on the state word.
#[cfg(not(hugepunch_broken = "unpunch"))]
const POPULATE_ONE: u64 = UNPUNCH_ONE;
/// BROKEN on purpose, test-only (`--cfg hugepunch_broken="unpunch"`, see
/// loom-tests): populate's un-punch registers nothing (its entry still
/// checks that the huge page is `HUGE` with no completion or slow path in
/// flight, its exit still lowers `COUNT`), so a punch exit that fills the
/// huge page while the un-punch clears bits and zeroes claims the
/// completion, which frees a subpage populate un-punched and hands out.
#[cfg(hugepunch_broken = "unpunch")]
const POPULATE_ONE: u64 = 0;

/// Allocate through the host; a panic counts as a failed allocation.
fn allocate(cb: &Callbacks, r: ByteRange, order: u8, d: &mut Delta) -> Result<(), HostError> {
    d.caught
        .call(|| cb.host.allocate(r, order))
        .unwrap_or(Err(HostError { errno: crate::EIO }))
}

/// Is there nothing to un-punch in `part`, and no un-punch in flight that
/// could be zeroing part of it? (The populate fast path: no RMW.)
fn nothing_to_unpunch(page: Page<'_>, part: PagePart) -> bool {
    let s = page.load();
    if s.mode() != HUGE || s.is(COMPLETING | BUSY) || s.unpunching() > 0 {
        return false;
    }
    page.read_bits(part.first, part.count).is_empty() && {
        let again = page.load();
        again.mode() == HUGE && !again.is(COMPLETING | BUSY) && again.unpunching() == 0
    }
}

/// Absent subpages of a `SPLIT` huge page (owner only).
fn page_absent(page: Page<'_>) -> u32 {
    page.owner_bits().iter().map(|(_, b)| b.count_ones()).sum()
}

/// Runs of present (bit clear) subpages of a `SPLIT` huge page within
/// `first .. first + count` (owner only).
fn present_runs(page: Page<'_>, first: u32, count: u32) -> page::Runs {
    let absent = page.read_bits(first, count);
    runs(page::word_masks(first, count).map(|(w, mask)| {
        let a = absent
            .iter()
            .find(|(aw, _)| *aw == w)
            .map_or(0, |(_, b)| *b);
        (w, mask & !a)
    }))
}
