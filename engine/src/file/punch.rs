//! `punch` (CONTRACT.md §3) and the completion it may claim.

use super::*;

impl HugePunch {
    /// Punch `offset .. offset + len`: defer what can be deferred, free what
    /// must be freed, invalidate what may be private (CONTRACT.md §3).
    pub fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        if len == SUBPAGE_SIZE
            && offset % SUBPAGE_SIZE == 0
            && offset < self.geo.size()
            && self.punch_one(offset)
        {
            return Ok(());
        }
        self.punch_general(offset, len)
    }

    /// The fast path: one valid 4 KiB subpage of a `HUGE` huge
    /// page whose chunk exists, on a live file. The same protocol as
    /// `punch_part` (entry, one bit, exit, the shared-state check after the
    /// exit), without the range split, the per-operation `Delta` or the
    /// statistics list walk: the counts go straight to this thread's shard.
    /// Returns `false`, having changed nothing, when the general path must
    /// run instead (torn down, no chunk yet, the huge page not `HUGE` or a
    /// completion in flight).
    ///
    /// No check of the file's torn flag: after teardown every huge page is
    /// `TORN` (or in a closed chunk slot, whose sentinel's are), so the
    /// entry fails and the general path answers `TornDown`; a punch that
    /// races teardown may go ahead on a huge page teardown has not reached
    /// yet, as it may after checking the flag.
    ///
    /// The counts are applied before the shared-state check (they do not
    /// depend on it; only an immediate invalidation adds two more), so that
    /// little lives across the host call.
    #[inline(always)]
    fn punch_one(&self, offset: u64) -> bool {
        let Some(page) = self.index.existing_at(offset) else {
            return false;
        };
        let sub = (offset >> SUBPAGE_SHIFT) as u32 & (page.full() - 1);
        if !page.try_enter_punch() {
            // Nothing changed: the general path decides (it enters again).
            return false;
        }
        let newly = page.set_bit(sub);
        // The state word after the exit (`COMPLETING` set if it claimed
        // the completion), and whether it cleared `WANTED`.
        let (after, wanted) = page.exit_punch(newly);
        let cb = self.callbacks.load();
        // Counted here, or in `punch_one_rest` (a completion or the
        // shrinker to run, a budget, no shard).
        let shard = if after.is(COMPLETING) || wanted {
            None
        } else {
            self.counters.punch_one(newly as u64)
        };
        let Some(shard) = shard else {
            self.punch_one_rest(cb, offset, page, newly, after, wanted);
            return true;
        };
        // The shared-state check after the exit, as in `punch_part`.
        #[cfg(not(hugepunch_broken = "conversion"))]
        let converting = after.converting() > 0;
        // BROKEN on purpose, test-only: as in `punch_part`.
        #[cfg(hugepunch_broken = "conversion")]
        let converting = false;
        let r = ByteRange::new(offset, SUBPAGE_SIZE);
        let mut caught = Caught::default();
        // A panic counts as "not shared".
        if converting || !caught.call(|| cb.host().is_shared(r)).unwrap_or(false) {
            self.invalidate_one(cb, r, self.geo.huge_page_of(offset), caught, shard);
        }
        true
    }

    /// The immediate invalidation of a fast-path punch (whose other counts
    /// are applied), counted in this thread's shard; then the first panic
    /// of the punch's host calls, if any, goes on.
    #[inline(never)]
    fn invalidate_one(
        &self,
        cb: &Callbacks,
        r: ByteRange,
        h: u64,
        mut caught: Caught,
        shard: crate::stats::MyShard<'_>,
    ) {
        let hint = self.hint(h);
        if caught
            .call(|| cb.host().invalidate_begin(r, hint))
            .is_some()
        {
            // A panicking end: the invalidation happened all the same.
            let _ = caught.call(|| cb.host().invalidate_end(r));
            shard.count_immediate_invalidation();
        }
        // The counts are applied: a host panic may go on now.
        caught.resume();
    }

    /// A fast-path punch that needs the general machinery: a completion to
    /// run, the shrinker, a budget, or no statistics shard. Nothing of it
    /// is counted yet; it goes on as `punch_part` does after its exit.
    #[cold]
    #[inline(never)]
    fn punch_one_rest(
        &self,
        cb: &Callbacks,
        offset: u64,
        page: Page<'_>,
        newly: u32,
        after: Snapshot,
        wanted: bool,
    ) {
        let part = PagePart {
            huge_page: self.geo.huge_page_of(offset),
            first: (offset >> SUBPAGE_SHIFT) as u32 & (page.full() - 1),
            count: 1,
        };
        let mut d = Delta::default();
        d.add(C::PunchCalls, 1);
        self.after_exit(cb, part, page, newly, after, wanted, &mut d);
        self.finish(cb, &mut d, true);
    }

    /// What a partial punch of `part` does after its exit, which set
    /// `newly` bits and left the state word `after` (`COMPLETING` if it
    /// claimed the completion), clearing `WANTED` if `wanted`: count, the
    /// shared-state check and the immediate invalidation, the completion.
    /// (The body of `punch_part` after its exit, for a partial part.)
    #[allow(clippy::too_many_arguments)]
    fn after_exit(
        &self,
        cb: &Callbacks,
        part: PagePart,
        page: Page<'_>,
        newly: u32,
        after: Snapshot,
        wanted: bool,
        d: &mut Delta,
    ) {
        let h = part.huge_page;
        let r = self.part_range(part);
        d.shrink_wanted |= wanted;
        d.pending += newly as i64;
        d.add(C::PunchedSubpages, newly as u64);
        // BROKEN on purpose under `hugepunch_broken="conversion"`: as in
        // `punch_part`.
        #[cfg(not(hugepunch_broken = "conversion"))]
        let converting = after.converting() > 0;
        #[cfg(hugepunch_broken = "conversion")]
        let converting = false;
        if (converting || !self.is_shared(cb, r, d)) && self.invalidate(cb, r, h, d) {
            d.add(C::InvalidationsImmediate, 1);
        }
        if after.is(COMPLETING) {
            self.complete(cb, h, page, d);
        }
    }

    /// A partial part of a `HUGE` huge page whose chunk exists, punched
    /// with the fast entry and exit and no `Delta` (the general path's
    /// lean half): the protocol of `punch_part`.
    #[inline]
    fn punch_part_lean<'a>(
        &'a self,
        cb: &Callbacks,
        part: PagePart,
        caught: &mut Caught,
    ) -> Lean<'a> {
        let Some(page) = self.index.existing(part.huge_page) else {
            return Lean::NotStarted;
        };
        if part.count == page.full() || !page.try_enter_punch() {
            return Lean::NotStarted;
        }
        let newly = page.set_bits(part.first, part.count);
        let (after, wanted) = page.exit_punch(newly);
        if after.is(COMPLETING) || wanted {
            return Lean::Exited {
                page,
                newly,
                after,
                wanted,
            };
        }
        #[cfg(not(hugepunch_broken = "conversion"))]
        let converting = after.converting() > 0;
        #[cfg(hugepunch_broken = "conversion")]
        let converting = false;
        let r = self.part_range(part);
        let mut inval = 0;
        if converting || !caught.call(|| cb.host().is_shared(r)).unwrap_or(false) {
            let hint = self.hint(part.huge_page);
            if caught
                .call(|| cb.host().invalidate_begin(r, hint))
                .is_some()
            {
                // A panicking end: the invalidation happened all the same.
                let _ = caught.call(|| cb.host().invalidate_end(r));
                inval = 1;
            }
        }
        Lean::Done { newly, inval }
    }

    /// Every other punch: validation, the split per huge page, `punch_part`.
    #[inline(never)]
    ///
    /// Its parts go the lean way (`punch_part_lean`: partial parts of
    /// `HUGE` huge pages, counted together at the end with one look-up of
    /// this thread's shard) until one cannot; from there on, the
    /// operation goes on through a `Delta` and `punch_part`, with what the
    /// lean parts did counted in it.
    fn punch_general(&self, offset: u64, len: u64) -> Result<(), Error> {
        let r = self.check(offset, len)?;
        let cb = self.callbacks.load();
        let (mut newly, mut inval) = (0u64, 0u64);
        let mut caught = Caught::default();
        let mut parts = self.geo.parts(r);
        while let Some(part) = parts.next() {
            let rest = match self.punch_part_lean(cb, part, &mut caught) {
                Lean::Done { newly: n, inval: i } => {
                    newly += n as u64;
                    inval += i;
                    continue;
                }
                rest => rest,
            };
            let mut d = Delta::default();
            d.caught = caught;
            d.add(C::PunchCalls, 1);
            d.add(C::PunchedSubpages, newly);
            d.pending += newly as i64;
            d.add(C::Invalidations, inval);
            d.add(C::InvalidationsImmediate, inval);
            match rest {
                Lean::Exited {
                    page,
                    newly,
                    after,
                    wanted,
                } => self.after_exit(cb, part, page, newly, after, wanted, &mut d),
                _ => self.punch_part(cb, part, &mut d),
            }
            for part in parts {
                self.punch_part(cb, part, &mut d);
            }
            self.finish(cb, &mut d, true);
            return Ok(());
        }
        if caught.any() || self.counters.punch_lean(newly, inval).is_none() {
            let mut d = Delta::default();
            d.caught = caught;
            d.add(C::PunchCalls, 1);
            d.add(C::PunchedSubpages, newly);
            d.pending += newly as i64;
            d.add(C::Invalidations, inval);
            d.add(C::InvalidationsImmediate, inval);
            self.finish(cb, &mut d, true);
        }
        Ok(())
    }

    pub(super) fn punch_part(&self, cb: &Callbacks, part: PagePart, d: &mut Delta) {
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
                    d.shrink_wanted |= exit.shrink_wanted;
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
    pub(super) fn punch_split(
        &self,
        cb: &Callbacks,
        part: PagePart,
        page: Page<'_>,
        d: &mut Delta,
    ) -> bool {
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
    pub(super) fn complete(&self, cb: &Callbacks, h: u64, page: Page<'_>, d: &mut Delta) {
        let freed = self.free_whole(cb, h, d);
        page.end_completion(freed);
        if freed {
            d.add(C::HugeFrees, 1);
            d.pending -= page.full() as i64;
        }
    }
}

/// How a part went on the lean path.
enum Lean<'a> {
    /// Punched and checked: `newly` bits set, `inval` immediate
    /// invalidations (0 or 1) issued; nothing else to do.
    Done { newly: u32, inval: u64 },
    /// Not started (nothing changed): `punch_part` handles it.
    NotStarted,
    /// Exited with a completion claimed or `WANTED` cleared: `after_exit`
    /// goes on.
    Exited {
        page: Page<'a>,
        newly: u32,
        after: Snapshot,
        wanted: bool,
    },
}
