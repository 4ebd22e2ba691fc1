//! The slow paths: forced splits (the shrinker and `flush`) and teardown.
//! They own one huge page at a time through its `BUSY` bit and serialise
//! among themselves on the file's slow-path mutex.

use super::*;

impl HugePunch {
    /// Force out what huge page `h` has pending: free it whole if every
    /// subpage is punched, otherwise invalidate it once and free its punched
    /// runs as 4 KiB pages, leaving it `SPLIT`. The caller has claimed the
    /// huge page (`BUSY`, nothing registered; `s` is its state). Applies its
    /// pending change at once. Returns whether anything was freed.
    pub(super) fn force_split(
        &self,
        cb: &Callbacks,
        h: u64,
        page: Page<'_>,
        s: Snapshot,
        d: &mut Delta,
    ) -> bool {
        let count = s.count();
        if s.mode() != HUGE || s.is(TORN) || count == 0 || count > page.full() {
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

    /// The shrinker, at the end of a punch that left pending bytes over the
    /// budget. It takes no lock and never waits for another shrinker: one
    /// thread at a time runs it (the *owner*); a punch that finds it running
    /// leaves a request and returns, and the owner runs another round for
    /// every request that arrived during its last one, so no request is
    /// lost and pending bytes are within the budget at every quiescent
    /// point (invariant 7). It does not serialise with `flush` or teardown:
    /// all three own one huge page at a time through its `BUSY` bit, and a
    /// torn-down huge page is never split.
    pub(super) fn shrink(&self, cb: &Callbacks, d: &mut Delta) {
        // ORDERING: AcqRel. Release: our pending change (applied before
        // this) happens-before the owner's next round, which reads this
        // request (its CAS below acquires it, failing or not). Acquire: a
        // new owner sees the previous owner's work.
        if self.shrink_requests.fetch_add(1, Ordering::AcqRel) != 0 {
            return;
        }
        loop {
            // ORDERING: Acquire, as above: the requests counted in `seen`
            // published their pending changes.
            let seen = self.shrink_requests.load(Ordering::Acquire);
            self.shrink_round(cb, d);
            // ORDERING: AcqRel on success (the next owner's fetch_add reads
            // our reset after our round); Acquire on failure (a request
            // that arrived during the round: its pending change is seen by
            // the next round).
            if self
                .shrink_requests
                .compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }

    /// One round of the shrinker: split the huge pages with the most
    /// punched subpages (lowest address between equals) until pending bytes
    /// are within the budget (or nothing more can be freed).
    fn shrink_round(&self, cb: &Callbacks, d: &mut Delta) {
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
                        && !s.is(COMPLETING | TORN)
                        && c > 0
                        && c <= self.index.page(h).full())
                    .then_some((c, h))
                })
                .max_by_key(|&(c, h)| (c, std::cmp::Reverse(h)));
            let Some((_, h)) = victim else { break };
            let page = self.index.page(h);
            let freed = match claim_without_waiting(page) {
                Some(s) => self.force_split(cb, h, page, s, d),
                // Operations are registered on it: not waited for (a punch
                // never waits for another); the last of their exits sees
                // `WANTED` and runs the shrinker again.
                None => false,
            };
            if !freed {
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
                        // `flush` may wait for registered operations.
                        let s = page.claim_busy();
                        self.force_split(cb, part.huge_page, page, s, &mut d);
                    }
                }
            }
        }
        self.finish(cb, &mut d, false);
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
                            if self.free_whole(cb, h, &mut d) {
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
                            self.teardown_page(cb, h, &mut d, &mut report);
                        }
                    }
                }
            }
        }
        self.finish(cb, &mut d, false);
        report
    }

    pub(super) fn teardown_page(
        &self,
        cb: &Callbacks,
        h: u64,
        d: &mut Delta,
        report: &mut TeardownReport,
    ) {
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

/// Claim huge page `page` for the shrinker if nothing is registered on it,
/// without waiting: `None` (after marking it `WANTED`) if operations are
/// registered, or a completion or another slow path owns it.
fn claim_without_waiting(page: Page<'_>) -> Option<Snapshot> {
    loop {
        if let Some(s) = page.try_claim_busy_if(HUGE) {
            return Some(s);
        }
        let before = page.want_shrink();
        if before.mode() != HUGE || before.is(TORN) || !before.idle() {
            return None;
        }
        // Everything registered left between the two RMWs: try again.
    }
}
