//! The reference model: a plain sequential reading of `docs/CONTRACT.md`
//! §3 and §6, written from the text of the contract, independent of the
//! engine's code.
//!
//! The model keeps, per huge page, its backing (`Absent`, `Huge`, `Split`)
//! and one bit per subpage (punched for a `Huge` huge page, present for a
//! `Split` one), the attribute of every subpage, the 19 statistics of §6
//! (in the engine's [`Stats`]: the model's independence is in how it
//! counts them, not in the type that holds them), a "fail the next N
//! frees" knob, and the host events it would cause (`IsShared` and
//! `InvalidateEnd` left out).
//!
//! Where the contract (`docs/CONTRACT.md`) is terse the model reads it so
//! (each a choice to revisit if the contract says otherwise; §8 there
//! lists them):
//! - "If every subpage of h is now punched, h is completed" (§3.3) holds
//!   also when they already were: a punch of a huge page whose completion's free
//!   failed retries that completion.
//! - A failed 4 KiB free (a punch of a `Split` huge page, a forced split)
//!   leaves the subpages present and zeroes them: they were punched.
//! - A second teardown frees only what an earlier one failed to free, so it
//!   is a no-op unless a teardown free failed.

use super::Event;
use crate::{
    Attribute, Backing, ByteRange, Error, Hint, Policy, Stats, SubpageState, TeardownReport,
    SUBPAGE_SIZE,
};
use std::collections::BTreeSet;

mod queries;
mod setup;

pub use setup::Setup;

const SUB: u64 = SUBPAGE_SIZE;

/// The backing of a huge page of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MBacking {
    /// No memory: never populated, completed, or torn down.
    Absent,
    /// One huge allocation; the bits are the punched (pending) subpages.
    Huge,
    /// Split into 4 KiB pages; the bits are the present subpages.
    Split,
}

/// One huge page of the model.
#[derive(Debug, Clone)]
pub struct MPage {
    /// The huge page's backing.
    pub backing: MBacking,
    /// `Huge`: punched (pending) subpages. `Split`: present subpages.
    /// `Absent`: all false.
    pub bits: Vec<bool>,
    /// Number of true bits.
    pub ones: u64,
}

impl MPage {
    fn new(per: u64, populated: bool) -> Self {
        MPage {
            backing: if populated {
                MBacking::Huge
            } else {
                MBacking::Absent
            },
            bits: vec![false; per as usize],
            ones: 0,
        }
    }

    fn set(&mut self, i: u64, v: bool) {
        let b = &mut self.bits[i as usize];
        if *b != v {
            *b = v;
            if v {
                self.ones += 1;
            } else {
                self.ones -= 1;
            }
        }
    }

    fn fill(&mut self, v: bool) {
        self.bits.iter_mut().for_each(|b| *b = v);
        self.ones = if v { self.bits.len() as u64 } else { 0 };
    }

    /// Runs `(first, count)` of subpages in `first .. first + count` whose
    /// bit is `v`.
    fn runs(&self, first: u64, count: u64, v: bool) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in first..first + count {
            if self.bits[i as usize] == v {
                match out.last_mut() {
                    Some((f, c)) if *f + *c == i => *c += 1,
                    _ => out.push((i, 1)),
                }
            }
        }
        out
    }
}

/// A plain sequential reading of CONTRACT.md §3 and §6.
pub struct Model {
    /// File size in bytes.
    pub size: u64,
    /// Huge page order: a huge page is `SUBPAGE_SIZE << order` bytes.
    pub order: u8,
    /// Subpages per huge page (`1 << order`).
    pub per: u64,
    /// Pending-bytes budget (CONTRACT.md §3), if any.
    pub budget: Option<u64>,
    /// Conversion policy (CONTRACT.md §3); tests may change it between operations.
    pub policy: Policy,
    /// Every huge page of the file.
    pub pages: Vec<MPage>,
    /// The attribute of every subpage.
    pub attrs: Vec<Attribute>,
    /// Whether the file has been torn down.
    pub torn: bool,
    /// Fail this many of the next host frees (as [`RecordingHost::fail_next_frees`](super::RecordingHost::fail_next_frees)).
    pub fail_next_frees: u64,
    /// The statistics the model expects.
    pub stats: Stats,
    /// Host events the model caused, `IsShared` and `InvalidateEnd` left out.
    pub events: Vec<Event>,
}

impl Model {
    /// A model of the file of `setup`.
    pub fn new(setup: &Setup) -> Self {
        let per = 1u64 << setup.order;
        let size = setup.size();
        Model {
            size,
            order: setup.order,
            per,
            budget: setup.budget,
            policy: setup.policy,
            pages: (0..setup.huge_pages)
                .map(|_| MPage::new(per, setup.populated))
                .collect(),
            attrs: vec![setup.start; (size / SUB) as usize],
            torn: false,
            fail_next_frees: 0,
            stats: Stats::default(),
            events: Vec::new(),
        }
    }

    /// Bytes per huge page.
    pub fn huge_page_size(&self) -> u64 {
        SUB << self.order
    }

    fn hint(&self, h: u64) -> Hint {
        Hint {
            huge_page: h,
            order: self.order,
        }
    }

    fn part_range(&self, h: u64, first: u64, count: u64) -> ByteRange {
        ByteRange::new(h * self.huge_page_size() + first * SUB, count * SUB)
    }

    fn whole(&self, h: u64) -> ByteRange {
        self.part_range(h, 0, self.per)
    }

    /// §3: valid when aligned, non-empty, not overflowing and inside the
    /// file; `TornDown` takes precedence.
    fn validate(&mut self, offset: u64, len: u64) -> Result<ByteRange, Error> {
        if self.torn {
            self.stats.errors_torn_down += 1;
            return Err(Error::TornDown);
        }
        let ok = offset % SUB == 0
            && len % SUB == 0
            && len > 0
            && offset.checked_add(len).is_some_and(|e| e <= self.size);
        if !ok {
            self.stats.errors_invalid_range += 1;
            return Err(Error::InvalidRange { offset, len });
        }
        Ok(ByteRange::new(offset, len))
    }

    /// The parts of a valid range, `(huge page, first subpage, count)`.
    fn parts(&self, r: ByteRange) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let mut at = r.offset / SUB;
        let end = r.end() / SUB;
        while at < end {
            let h = at / self.per;
            let stop = ((h + 1) * self.per).min(end);
            out.push((h, at - h * self.per, stop - at));
            at = stop;
        }
        out
    }

    fn pending(&self) -> u64 {
        self.pages
            .iter()
            .filter(|p| p.backing == MBacking::Huge)
            .map(|p| p.ones)
            .sum()
    }

    fn sync_pending(&mut self) {
        self.stats.pending_subpages = self.pending();
    }

    /// End of a successful operation: the peak is observed.
    fn observe_peak(&mut self) {
        self.sync_pending();
        self.stats.pending_bytes_peak = self
            .stats
            .pending_bytes_peak
            .max(self.stats.pending_subpages * SUB);
    }

    fn over_budget(&self) -> bool {
        self.budget.is_some_and(|b| self.pending() * SUB > b)
    }

    fn all_shared(&self, r: ByteRange) -> bool {
        self.attrs[(r.offset / SUB) as usize..(r.end() / SUB) as usize]
            .iter()
            .all(|a| *a == Attribute::Shared)
    }

    /// One invalidation (begin/end pair) of `r` with the hint of `h`.
    fn invalidate(&mut self, r: ByteRange, h: u64) {
        self.events.push(Event::InvalidateBegin(r, self.hint(h)));
        self.stats.invalidations += 1;
    }

    /// One host free call; `false` when it failed.
    fn free(&mut self, r: ByteRange, order: u8) -> bool {
        self.stats.free_calls += 1;
        if self.fail_next_frees > 0 {
            self.fail_next_frees -= 1;
            self.stats.free_errors += 1;
            self.events.push(Event::FreeFailed(r, order));
            false
        } else {
            self.events.push(Event::Free(r, order));
            true
        }
    }

    /// Free a `Huge` huge page whole: one invalidation, one free of the
    /// file's order. Completions, and the retry of a failed one by `flush`
    /// or the shrinker.
    fn free_whole(&mut self, h: u64) -> bool {
        let whole = self.whole(h);
        self.invalidate(whole, h);
        if self.free(whole, self.order) {
            self.pages[h as usize].backing = MBacking::Absent;
            self.pages[h as usize].fill(false);
            true
        } else {
            // Lost nothing: stays `Huge` with every subpage punched.
            self.pages[h as usize].fill(true);
            false
        }
    }

    fn complete(&mut self, h: u64) {
        if self.free_whole(h) {
            self.stats.huge_frees += 1;
        }
    }

    /// Force out the punched subpages of a `Huge` huge page (the shrinker
    /// and `flush`). Returns whether it freed anything or split it.
    fn force_out(&mut self, h: u64) -> bool {
        let page = &self.pages[h as usize];
        if page.backing != MBacking::Huge || page.ones == 0 {
            return false;
        }
        if page.ones == self.per {
            // A completion whose free failed: freed whole instead.
            let ok = self.free_whole(h);
            if ok {
                self.stats.huge_frees += 1;
            }
            return ok;
        }
        let punched = page.runs(0, self.per, true);
        self.invalidate(self.whole(h), h);
        self.stats.forced_splits += 1;
        // Split: every subpage present, then the freed runs absent.
        let mut present = MPage {
            backing: MBacking::Split,
            bits: vec![true; self.per as usize],
            ones: self.per,
        };
        for (first, count) in punched {
            let run = self.part_range(h, first, count);
            if self.free(run, 0) {
                self.stats.small_freed_subpages += count;
                (first..first + count).for_each(|i| present.set(i, false));
            } else {
                // A failed 4 KiB free leaves them present; they were
                // punched, so they must read as zeros (invariant 5).
                self.events.push(Event::Zero(run));
            }
        }
        self.pages[h as usize] = present;
        true
    }

    /// §3 budget: most punched first, lowest address between equals.
    fn shrink(&mut self) {
        let mut failed = BTreeSet::new();
        while self.over_budget() {
            let victim = (0..self.pages.len() as u64)
                .filter(|h| !failed.contains(h))
                .filter(|&h| {
                    self.pages[h as usize].backing == MBacking::Huge
                        && self.pages[h as usize].ones > 0
                })
                .max_by_key(|&h| (self.pages[h as usize].ones, std::cmp::Reverse(h)));
            let Some(h) = victim else { break };
            if !self.force_out(h) {
                failed.insert(h);
            }
        }
    }

    /// `punch(offset, len)` (CONTRACT.md §3).
    pub fn punch(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        let r = self.validate(offset, len)?;
        self.stats.punch_calls += 1;
        for (h, first, count) in self.parts(r) {
            let part = self.part_range(h, first, count);
            match self.pages[h as usize].backing {
                MBacking::Absent => {}
                MBacking::Split => {
                    let present = self.pages[h as usize].runs(first, count, true);
                    if !present.is_empty() {
                        self.invalidate(part, h);
                    }
                    for (f, c) in present {
                        let run = self.part_range(h, f, c);
                        if self.free(run, 0) {
                            self.stats.small_freed_subpages += c;
                            (f..f + c).for_each(|i| self.pages[h as usize].set(i, false));
                        } else {
                            // A failed 4 KiB free leaves them present; they
                            // were punched, so they must read as zeros
                            // (invariant 5), as after a failed forced split.
                            self.events.push(Event::Zero(run));
                        }
                    }
                    if self.pages[h as usize].ones == 0 {
                        self.pages[h as usize].backing = MBacking::Absent;
                    }
                }
                MBacking::Huge if count == self.per => {
                    self.pages[h as usize].fill(true);
                    self.complete(h);
                }
                MBacking::Huge => {
                    if !self.all_shared(part) {
                        self.invalidate(part, h);
                        self.stats.invalidations_immediate += 1;
                    }
                    let before = self.pages[h as usize].ones;
                    (first..first + count).for_each(|i| self.pages[h as usize].set(i, true));
                    let newly = self.pages[h as usize].ones - before;
                    self.stats.punched_subpages += newly;
                    // "If all subpages of h are now punched: completion",
                    // read literally: also when they already were (a
                    // completion whose free failed is retried).
                    if self.pages[h as usize].ones == self.per {
                        self.complete(h);
                    }
                }
            }
        }
        if self.over_budget() {
            self.shrink();
        }
        self.observe_peak();
        Ok(())
    }

    /// Un-punch (and zero) the punched subpages of part of a `Huge` huge page.
    fn unpunch(&mut self, h: u64, first: u64, count: u64) {
        for (f, c) in self.pages[h as usize].runs(first, count, true) {
            self.events.push(Event::Zero(self.part_range(h, f, c)));
            (f..f + c).for_each(|i| self.pages[h as usize].set(i, false));
            self.stats.repopulated_subpages += c;
        }
    }

    /// `populate(offset, len)` (CONTRACT.md §3).
    pub fn populate(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        let r = self.validate(offset, len)?;
        self.stats.populate_calls += 1;
        for (h, first, count) in self.parts(r) {
            match self.pages[h as usize].backing {
                MBacking::Absent => {
                    self.events.push(Event::Allocate(self.whole(h), self.order));
                    self.pages[h as usize].backing = MBacking::Huge;
                    self.pages[h as usize].fill(false);
                }
                MBacking::Huge => self.unpunch(h, first, count),
                MBacking::Split => {
                    for (f, c) in self.pages[h as usize].runs(first, count, false) {
                        self.events
                            .push(Event::Allocate(self.part_range(h, f, c), 0));
                        (f..f + c).for_each(|i| self.pages[h as usize].set(i, true));
                    }
                }
            }
        }
        self.observe_peak();
        Ok(())
    }

    fn set_attributes(&mut self, r: ByteRange, to: Attribute) {
        self.events.push(Event::SetAttributes(r, to));
        self.attrs[(r.offset / SUB) as usize..(r.end() / SUB) as usize]
            .iter_mut()
            .for_each(|a| *a = to);
    }

    /// `convert(offset, len, to)` (CONTRACT.md §3), under [`Model::policy`].
    pub fn convert(&mut self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        let r = self.validate(offset, len)?;
        self.stats.convert_calls += 1;
        if to == Attribute::Private {
            match self.policy {
                Policy::Reject => {
                    let first_pending = self.parts(r).into_iter().find_map(|(h, first, count)| {
                        let p = &self.pages[h as usize];
                        (p.backing == MBacking::Huge)
                            .then(|| (first..first + count).find(|&i| p.bits[i as usize]))
                            .flatten()
                            .map(|i| self.part_range(h, i, 1).offset)
                    });
                    if let Some(offset) = first_pending {
                        self.stats.conversions_rejected += 1;
                        self.observe_peak();
                        return Err(Error::PendingPunch { offset });
                    }
                }
                Policy::CancelAndZero => {
                    for (h, first, count) in self.parts(r) {
                        if self.pages[h as usize].backing == MBacking::Huge {
                            self.unpunch(h, first, count);
                        }
                    }
                }
            }
        }
        self.set_attributes(r, to);
        self.stats.conversions_ok += 1;
        self.observe_peak();
        Ok(())
    }

    /// `flush(offset, len)`: force out the punched subpages of every huge page the range touches.
    pub fn flush(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        let r = self.validate(offset, len)?;
        let touched: BTreeSet<u64> = self.parts(r).into_iter().map(|(h, _, _)| h).collect();
        for h in touched {
            self.force_out(h);
        }
        self.observe_peak();
        Ok(())
    }

    /// Teardown: `Huge` huge pages freed whole, `Split` ones run by run.
    /// A second teardown frees only what an earlier one failed to free.
    pub fn teardown(&mut self) -> TeardownReport {
        self.torn = true;
        let mut report = TeardownReport::default();
        for h in 0..self.pages.len() as u64 {
            let whole = self.whole(h);
            match self.pages[h as usize].backing {
                MBacking::Absent => {}
                MBacking::Huge => {
                    self.invalidate(whole, h);
                    if self.free(whole, self.order) {
                        self.stats.teardown_frees += 1;
                        self.pages[h as usize].backing = MBacking::Absent;
                        self.pages[h as usize].fill(false);
                    } else {
                        report.still_allocated.push(whole);
                    }
                }
                MBacking::Split => {
                    let present = self.pages[h as usize].runs(0, self.per, true);
                    if !present.is_empty() {
                        self.invalidate(whole, h);
                    }
                    for (f, c) in present {
                        let run = self.part_range(h, f, c);
                        if self.free(run, 0) {
                            self.stats.small_freed_subpages += c;
                            (f..f + c).for_each(|i| self.pages[h as usize].set(i, false));
                        } else {
                            report.still_allocated.push(run);
                        }
                    }
                    if self.pages[h as usize].ones == 0 {
                        self.pages[h as usize].backing = MBacking::Absent;
                    }
                }
            }
        }
        self.observe_peak();
        report
    }
}
