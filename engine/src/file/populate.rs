//! `populate`: allocation of `Absent` huge pages, the un-punch (and
//! zeroing) of punched subpages, allocation of absent subpages of `Split`
//! ones.

use super::*;

impl HugePunch {
    /// Populate `offset .. offset + len` (a fault, or a fallocate
    /// allocation): allocate `Absent` huge pages whole, un-punch and zero
    /// punched subpages, allocate absent subpages of `Split` huge pages.
    pub fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        if len == SUBPAGE_SIZE && offset % SUBPAGE_SIZE == 0 && offset < self.geo.size() {
            if let Some(res) = self.populate_one(offset) {
                return res;
            }
        }
        self.populate_general(offset, len)
    }

    /// The fast path: one valid 4 KiB subpage of a `HUGE` huge
    /// page whose chunk exists, on a live file. The same steps as
    /// `populate_part` (nothing to un-punch: no RMW; otherwise the entry,
    /// the bit cleared, the subpage zeroed, the exit) without the range
    /// split or the per-operation `Delta`. Returns `None`, having changed
    /// nothing, when the general path must run instead; the rare endings
    /// (a completion claimed, another un-punch in flight, a panicking
    /// `zero`, a budget, no statistics shard) go on in `populate_one_rest`.
    #[inline(always)]
    fn populate_one(&self, offset: u64) -> Option<Result<(), Error>> {
        self.live().ok()?;
        let h = self.geo.huge_page_of(offset);
        let page = self.index.existing(h)?;
        let sub = (offset >> SUBPAGE_SHIFT) as u32 & (page.full() - 1);
        let part = PagePart {
            huge_page: h,
            first: sub,
            count: 1,
        };
        if nothing_to_unpunch_one(page, sub) {
            if self.counters.count1(C::PopulateCalls).is_none() {
                let mut d = Delta::default();
                d.add(C::PopulateCalls, 1);
                self.finish(self.callbacks.load(), &mut d, false);
            }
            return Some(Ok(()));
        }
        let cb = self.callbacks.load();
        if page.enter(POPULATE_ONE) != Entry::Registered {
            return None;
        }
        let mut caught = Caught::default();
        let mut k = page.clear_bit(sub);
        if k == 1 {
            let r = ByteRange::new(offset, SUBPAGE_SIZE);
            if caught.call(|| cb.host().zero(r)).is_none() {
                // A panicking `zero`: the subpage stays punched (net of a
                // punch that set it again meanwhile), as in `unpunch`.
                k -= page.set_bit(sub);
            }
        }
        let exit = page.exit(POPULATE_ONE, -(k as i64));
        if !(exit.claimed_completion
            || exit.shrink_wanted
            || exit.after.unpunching() > 0
            || caught.any())
            && self.counters.populate_one(k as u64).is_some()
        {
            return Some(Ok(()));
        }
        Some(self.populate_one_rest(cb, part, page, k, exit, caught))
    }

    /// The rest of a fast-path populate that needs the general machinery.
    #[cold]
    #[inline(never)]
    fn populate_one_rest(
        &self,
        cb: &Callbacks,
        part: PagePart,
        page: Page<'_>,
        k: u32,
        exit: crate::page::Exit,
        caught: Caught,
    ) -> Result<(), Error> {
        let mut d = Delta::default();
        d.caught = caught;
        d.add(C::PopulateCalls, 1);
        d.add(C::RepopulatedSubpages, k as u64);
        d.pending -= k as i64;
        d.shrink_wanted |= exit.shrink_wanted;
        if exit.claimed_completion {
            // As in `populate_part`: complete it, then populate again.
            self.complete(cb, part.huge_page, page, &mut d);
        }
        let mut res = Ok(());
        if !d.caught.any() && (exit.claimed_completion || exit.after.unpunching() > 0) {
            // The huge page was just freed, or another un-punch may be
            // zeroing our subpage: the general loop finishes the job (it
            // allocates, or waits and looks again), as `populate_part`
            // would have gone on.
            res = self.populate_part(cb, part, &mut d);
            if res == Err(Error::TornDown) {
                d.add(C::ErrorsTornDown, 1);
            }
        }
        self.finish(cb, &mut d, false);
        res
    }

    /// Every other populate.
    #[inline(never)]
    fn populate_general(&self, offset: u64, len: u64) -> Result<(), Error> {
        let r = self.check(offset, len)?;
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        d.add(C::PopulateCalls, 1);
        let mut res = Ok(());
        for part in self.geo.parts(r) {
            res = self.populate_part(cb, part, &mut d);
            if res.is_err() {
                break;
            }
        }
        if res == Err(Error::TornDown) {
            // It passed validation before a concurrent teardown reached its
            // huge page: a call (counted above) that ends torn down.
            d.add(C::ErrorsTornDown, 1);
        }
        self.finish(cb, &mut d, false);
        res
    }

    pub(super) fn populate_part(
        &self,
        cb: &Callbacks,
        part: PagePart,
        d: &mut Delta,
    ) -> Result<(), Error> {
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
                    d.shrink_wanted |= exit.shrink_wanted;
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
                    let order = self.geo.order();
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
    pub(super) fn unpunch(
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
    pub(super) fn populate_split(
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
}

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

/// `nothing_to_unpunch` for one subpage: the same two state loads around
/// one bit load, without building the set of words.
#[inline(always)]
fn nothing_to_unpunch_one(page: Page<'_>, sub: u32) -> bool {
    let quiet = |s: Snapshot| s.mode() == HUGE && !s.is(COMPLETING | BUSY) && s.unpunching() == 0;
    quiet(page.load()) && !page.bit(sub) && quiet(page.load())
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
