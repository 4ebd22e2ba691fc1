//! `punch_many`: a batch of punches as one operation.
//!
//! A batch validates every range first (one invalid range refuses the whole
//! batch, naming its index, before anything changes), loads the callbacks
//! once, and applies its statistics and runs the shrinker once, at its end.
//! Consecutive ranges that each lie inside one huge page, without covering
//! all of it, form a *group*: their subpages are gathered in a mask, and
//! the group follows the punch protocol once — one entry, one `fetch_or`
//! per bitmap word the group touches, one exit, one shared-state check and
//! at most one immediate invalidation (of the span from the group's first
//! to its last subpage, which covers every subpage it punched). Every other
//! range (a whole huge page, or one crossing huge pages) runs as `punch`
//! runs it, and so does a group whose huge page is `SPLIT` (range by range:
//! its 4 KiB frees, and their count, are those of the ranges in order).
//!
//! Why a group is the same as its ranges one after the other: on a `HUGE`
//! huge page they set the same bits (the union), so `punched_subpages` and
//! the pending count move by the same amount, and the huge page completes
//! exactly when the union fills it (a range after the one that completed it
//! finds the huge page `ABSENT` and does nothing, as the group's extra bits
//! were already set). What differs, as CONTRACT.md §3 allows for batches:
//! fewer invalidations (one per group, and none repeated for re-punched
//! private subpages), the budget checked once, `pending_bytes_peak`
//! observed once (at the end of the batch, which is one operation), and a
//! completion whose free fails is retried once per group, not once per
//! range that re-punches it.

use super::*;

/// Bitmap words a group gathers: huge pages of order 9 (2 MiB) or less;
/// larger orders take each range on its own.
const GROUP_WORDS: usize = 8;

/// Consecutive ranges `start .. end` of the batch, all inside huge page `h`,
/// and the subpages they punch.
#[derive(Clone, Copy)]
struct Group {
    h: u64,
    start: usize,
    end: usize,
    mask: [u64; GROUP_WORDS],
}

impl Group {
    fn new(h: u64, start: usize) -> Self {
        Group {
            h,
            start,
            end: start,
            mask: [0; GROUP_WORDS],
        }
    }

    #[inline(always)]
    fn add(&mut self, first: u32, count: u32) {
        for (w, m) in page::word_masks(first, count) {
            self.mask[w % GROUP_WORDS] |= m;
        }
    }

    /// First subpage of the group and one past its last (the mask is not
    /// empty).
    fn span(&self) -> (u32, u32) {
        let lo = self.mask.iter().position(|&m| m != 0).unwrap_or(0);
        let hi = self.mask.iter().rposition(|&m| m != 0).unwrap_or(0);
        (
            lo as u32 * 64 + self.mask[lo].trailing_zeros(),
            hi as u32 * 64 + 64 - self.mask[hi].leading_zeros(),
        )
    }
}

impl HugePunch {
    /// Punch every range of `ranges`, as one operation: the same bits,
    /// completions, frees and statistics as [`punch`](Self::punch) called
    /// for each range in order, except that a batch may issue fewer
    /// invalidations (one per huge page it touches, per run of consecutive
    /// ranges on that huge page, covering the span of what they punched),
    /// checks the budget once at its end, and records `pending_bytes_peak`
    /// once, at its end. `punch_calls` counts every range.
    ///
    /// A batch with an invalid range fails whole, before anything changes,
    /// with [`Error::InvalidRangeInBatch`] naming the first invalid range's
    /// index (`errors_invalid_range` moves by one); a torn-down file fails
    /// with [`Error::TornDown`]. An empty batch does nothing.
    ///
    /// virtio-balloon hands over up to 256 page frames per request; free
    /// page reporting and conversions arrive as lists of ranges: a batch
    /// touches each huge page's words once per run of ranges on it.
    ///
    /// ```
    /// # use hugepunch::{ByteRange, Config, HugePunch, Error};
    /// # use std::sync::Arc;
    /// # let file = HugePunch::new(Config::new(4 << 20), Arc::new(hugepunch::testing::NullHost)).unwrap();
    /// let batch = [ByteRange::new(0, 4096), ByteRange::new(0x3000, 8192)];
    /// file.punch_many(&batch)?;
    /// assert_eq!(file.stats().pending_subpages, 3);
    /// let bad = [ByteRange::new(0, 4096), ByteRange::new(0x10, 4096)];
    /// assert!(matches!(file.punch_many(&bad), Err(Error::InvalidRangeInBatch { index: 1, .. })));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn punch_many(&self, ranges: &[ByteRange]) -> Result<(), Error> {
        if let Err(e) = self.live() {
            self.count_error(C::ErrorsTornDown);
            return Err(e);
        }
        let order = self.geo.order() as u32;
        if order as usize > GROUP_WORDS.ilog2() as usize + 6 {
            self.validate_batch(ranges, 0)?;
            return self.punch_each(ranges);
        }
        let n = ranges.len();
        let shift = SUBPAGE_SHIFT + order;
        let full = 1u64 << order;
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        let mut g = Group::new(u64::MAX, 0);
        // The open group's first byte, and its subpages (0: no group open).
        let (mut base, mut subs) = (0u64, 0u64);
        // Every range is validated before the first change: the first
        // group's ranges as they are gathered, the rest in one pass when
        // that group is punched (`all_valid`).
        let mut all_valid = false;
        let mut i = 0;
        while i < n {
            // The common case, as a tight loop: a valid 4 KiB range in the
            // open group's huge page (inside the file, since the huge page
            // is) is one bit of the group's mask.
            let mut mask = g.mask;
            let rest = &ranges[i..];
            let mut taken = 0;
            while taken < rest.len() {
                let r = &rest[taken];
                // One compare for "inside the open huge page and 4 KiB
                // aligned": rotating the offset into the huge page by 12
                // bits moves any unaligned low bits to the top, far above
                // `subs` (0 when no group is open).
                let sub = r.offset.wrapping_sub(base).rotate_right(SUBPAGE_SHIFT);
                if r.len != SUBPAGE_SIZE || sub >= subs {
                    break;
                }
                mask[(sub / 64) as usize % GROUP_WORDS] |= 1 << (sub % 64);
                taken += 1;
            }
            g.mask = mask;
            i += taken;
            if i == n {
                break;
            }
            let r = ranges[i];
            if !all_valid && self.geo.validate(r.offset, r.len).is_none() {
                // Nothing has changed yet.
                return Err(self.invalid_in_batch(i, r));
            }
            let h = r.offset >> shift;
            let first = (r.offset >> SUBPAGE_SHIFT) & (full - 1);
            let count = r.len >> SUBPAGE_SHIFT;
            let grouped = first + count <= full && count < full;
            if grouped && h == g.h {
                g.add(first as u32, count as u32);
                i += 1;
                continue;
            }
            let open = subs != 0;
            if (open || !grouped) && !all_valid {
                // Something changes now: validate the rest of the batch
                // first.
                self.validate_batch(&ranges[i + 1..], i + 1)?;
                all_valid = true;
                d.add(C::PunchCalls, n as u64);
            }
            if open {
                g.end = i;
                self.punch_group(cb, &g, ranges, &mut d);
            }
            if grouped {
                g = Group::new(h, i);
                (base, subs) = (h << shift, full);
                g.add(first as u32, count as u32);
            } else {
                g = Group::new(u64::MAX, i + 1);
                (base, subs) = (0, 0);
                for part in self.geo.parts(r) {
                    self.punch_part(cb, part, &mut d);
                }
            }
            i += 1;
        }
        if n == 0 {
            return Ok(());
        }
        if !all_valid {
            d.add(C::PunchCalls, n as u64);
        }
        if subs != 0 {
            g.end = n;
            self.punch_group(cb, &g, ranges, &mut d);
        }
        self.finish(cb, &mut d, true);
        Ok(())
    }

    /// The error for range `index` of a batch, counted.
    #[cold]
    fn invalid_in_batch(&self, index: usize, r: ByteRange) -> Error {
        self.count_error(C::ErrorsInvalidRange);
        Error::InvalidRangeInBatch {
            index,
            offset: r.offset,
            len: r.len,
        }
    }

    /// Validate `ranges`, the batch's from index `from` on; the first
    /// invalid one is the error (counted).
    fn validate_batch(&self, ranges: &[ByteRange], from: usize) -> Result<(), Error> {
        let size = self.geo.size();
        // Valid: aligned, and 1 <= len <= size - offset (which also keeps
        // offset + len from overflowing). One pass without branches; the
        // slow one names the range only when there is one.
        let mut bad = 0u64;
        for r in ranges {
            bad |= (r.offset | r.len) % SUBPAGE_SIZE;
            bad |= (r.len.wrapping_sub(1) >= size.saturating_sub(r.offset)) as u64;
        }
        if bad == 0 {
            return Ok(());
        }
        let (at, r) = ranges
            .iter()
            .enumerate()
            .find(|(_, r)| self.geo.validate(r.offset, r.len).is_none())
            .expect("an invalid range");
        Err(self.invalid_in_batch(from + at, *r))
    }

    /// A validated batch of huge pages above order 9: range by range, with
    /// one callback load and one statistics flush.
    fn punch_each(&self, ranges: &[ByteRange]) -> Result<(), Error> {
        if ranges.is_empty() {
            return Ok(());
        }
        let cb = self.callbacks.load();
        let mut d = Delta::default();
        d.add(C::PunchCalls, ranges.len() as u64);
        for r in ranges {
            for part in self.geo.parts(*r) {
                self.punch_part(cb, part, &mut d);
            }
        }
        self.finish(cb, &mut d, true);
        Ok(())
    }

    /// One group: the protocol of `punch_part` once for all its subpages.
    fn punch_group(&self, cb: &Callbacks, g: &Group, ranges: &[ByteRange], d: &mut Delta) {
        if g.start == g.end {
            return;
        }
        let h = g.h;
        let page = match self.index.existing(h) {
            Some(page) => page,
            None if self.index.initial().mode() == ABSENT => return,
            None => self.index.page(h),
        };
        let (lo, hi) = g.span();
        let r = self.geo.part_range(h, lo, hi - lo);
        match page.enter(PUNCH_ONE) {
            Entry::Registered => {
                let words = page.full().div_ceil(64) as usize;
                let mut newly = 0;
                // The bitmap before the group's bits, where it touched it;
                // a word it did not touch counts as full (a completion it
                // claims had every subpage punched there already).
                let mut before = [u64::MAX; GROUP_WORDS];
                for (w, &m) in g.mask[..words].iter().enumerate() {
                    if m != 0 {
                        let (n, prev) = page.or_word(w, m);
                        newly += n;
                        before[w] = prev;
                    }
                }
                let exit = page.exit(PUNCH_ONE, newly as i64);
                d.shrink_wanted |= exit.shrink_wanted;
                d.pending += newly as i64;
                d.add(C::PunchedSubpages, newly as u64);
                // The shared-state check after the exit, as in `punch_part`.
                #[cfg(not(hugepunch_broken = "conversion"))]
                let converting = exit.after.converting() > 0;
                // BROKEN on purpose, test-only: as in `punch_part`.
                #[cfg(hugepunch_broken = "conversion")]
                let converting = false;
                // One shared-state check over the span when it is all
                // shared (the common case). Otherwise only the ranges up to
                // the one that completed the huge page (those after it
                // would have found it `ABSENT`) are asked about, run by run.
                let private = converting
                    || (!self.is_shared(cb, r, d) && {
                        let asked = if exit.claimed_completion {
                            self.up_to_completion(g, &before, ranges)
                        } else {
                            *g
                        };
                        self.runs_private(cb, &asked, words, d)
                    });
                if private && self.invalidate(cb, r, h, d) {
                    d.add(C::InvalidationsImmediate, 1);
                }
                if exit.claimed_completion {
                    self.complete(cb, h, page, d);
                }
            }
            Entry::Completing => {
                // As in `punch_part`: no waiting for the completion; the
                // span is invalidated now if it may be private.
                let words = page.full().div_ceil(64) as usize;
                let private = !self.is_shared(cb, r, d) && self.runs_private(cb, g, words, d);
                if (private || page.load_rmw().converting() > 0) && self.invalidate(cb, r, h, d) {
                    d.add(C::InvalidationsImmediate, 1);
                }
            }
            Entry::NotHuge(s) if s.is(TORN) || s.mode() == ABSENT => {}
            Entry::NotHuge(_) => {
                // `SPLIT`: range by range, as `punch` frees them.
                for r in &ranges[g.start..g.end] {
                    for part in self.geo.parts(*r) {
                        self.punch_part(cb, part, d);
                    }
                }
            }
        }
    }

    /// Does the shared-state check say that some run of subpages the group
    /// punched may be private? (Asked after the span as a whole was not
    /// found shared: one call per run until a run answers no, so that a
    /// private subpage the group did not punch, in a gap of the span,
    /// causes no invalidation the ranges one by one would not have caused.)
    fn runs_private(&self, cb: &Callbacks, g: &Group, words: usize, d: &mut Delta) -> bool {
        runs(g.mask[..words].iter().copied().enumerate())
            .into_iter()
            .any(|(first, count)| !self.is_shared(cb, self.geo.part_range(g.h, first, count), d))
    }

    /// The part of group `g` up to the range that completed its huge page,
    /// given the bitmap words `before` the group set its bits (the rare
    /// path: a completion of possibly-private memory).
    fn up_to_completion(
        &self,
        g: &Group,
        before: &[u64; GROUP_WORDS],
        ranges: &[ByteRange],
    ) -> Group {
        let full = self.geo.subpages_per_huge_page();
        // Only the huge page's own bits (a word of a small huge page holds
        // fewer than 64).
        let mut acc = [0u64; GROUP_WORDS];
        for (w, m) in page::word_masks(0, full) {
            acc[w] = before[w] & m;
        }
        let mut missing = full - acc.iter().map(|w| w.count_ones()).sum::<u32>();
        let mut upto = Group::new(g.h, g.start);
        for r in &ranges[g.start..g.end] {
            let first = (r.first_subpage() & (full as u64 - 1)) as u32;
            let count = r.subpages() as u32;
            upto.add(first, count);
            for (w, m) in page::word_masks(first, count) {
                missing -= (m & !acc[w]).count_ones();
                acc[w] |= m;
            }
            if missing == 0 {
                break;
            }
        }
        upto.end = g.end;
        upto
    }
}
