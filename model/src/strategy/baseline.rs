//! The baselines: today's kernels (eager split, zero only) and the
//! single-partial balloon, each as a strategy.

use super::{Strategy, StrategyKind};
use crate::geometry::ModelGeometry;
use crate::host::{lock, HugePageBacking, KernelHost};
use hugepunch::{Attribute, ByteRange, Error, Geometry, Hint, Host, PagePart, Stats, SUBPAGE_SIZE};
use std::sync::{Arc, Mutex};

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

pub(super) struct Baseline {
    kind: StrategyKind,
    geo: Geometry,
    host: Arc<KernelHost>,
    /// One lock per file: the baselines model kernels that serialise a
    /// file's truncations (they are not the subject of the comparison's
    /// scalability).
    state: Mutex<BaseState>,
}

impl Baseline {
    /// Strategy `kind` (a baseline) for a file of geometry `geo` on `host`.
    pub(super) fn new(kind: StrategyKind, geo: Geometry, host: Arc<KernelHost>) -> Self {
        Baseline {
            kind,
            geo,
            host,
            state: Mutex::new(BaseState::default()),
        }
    }

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
