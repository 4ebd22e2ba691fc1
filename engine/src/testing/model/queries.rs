//! The model's read-only queries (CONTRACT.md §3.10): they count nothing,
//! even when they fail.

use super::*;

impl Model {
    /// The state of subpage index `sub` (not a byte offset).
    pub fn state_of(&self, sub: u64) -> SubpageState {
        let p = &self.pages[(sub / self.per) as usize];
        let bit = p.bits[(sub % self.per) as usize];
        match (p.backing, bit) {
            (MBacking::Huge, true) => SubpageState::Punched,
            (MBacking::Huge, false) | (MBacking::Split, true) => SubpageState::Present,
            _ => SubpageState::Absent,
        }
    }

    /// Whether subpage index `sub` has memory allocated.
    pub fn resident(&self, sub: u64) -> bool {
        self.state_of(sub) != SubpageState::Absent
    }

    /// `subpage_state(offset)`: validated like a one-subpage range.
    pub fn subpage_state(&mut self, offset: u64) -> Result<SubpageState, Error> {
        let r = self.validate_query(offset, SUB)?;
        Ok(self.state_of(r.offset / SUB))
    }

    /// `is_punched(offset)`.
    pub fn is_punched(&mut self, offset: u64) -> Result<bool, Error> {
        Ok(self.subpage_state(offset)? == SubpageState::Punched)
    }

    /// `pending_ranges(offset, len)`.
    pub fn pending_ranges(&mut self, offset: u64, len: u64) -> Result<Vec<ByteRange>, Error> {
        let r = self.validate_query(offset, len)?;
        Ok(self.pending_runs(r))
    }

    /// The pending (punched, not yet freed) subpages of a valid range, as maximal byte ranges.
    pub fn pending_runs(&self, r: ByteRange) -> Vec<ByteRange> {
        let mut out: Vec<ByteRange> = Vec::new();
        for (h, first, count) in self.parts(r) {
            let p = &self.pages[h as usize];
            if p.backing != MBacking::Huge || p.ones == 0 {
                continue;
            }
            for (f, c) in p.runs(first, count, true) {
                let run = self.part_range(h, f, c);
                match out.last_mut() {
                    Some(last) if last.end() == run.offset => last.len += run.len,
                    _ => out.push(run),
                }
            }
        }
        out
    }

    /// Validation of the read-only queries: the same errors, no counter
    /// (CONTRACT.md §6: queries count nothing, even when they fail).
    fn validate_query(&mut self, offset: u64, len: u64) -> Result<ByteRange, Error> {
        let before = (self.stats.errors_torn_down, self.stats.errors_invalid_range);
        let res = self.validate(offset, len);
        (self.stats.errors_torn_down, self.stats.errors_invalid_range) = before;
        res
    }

    fn check_huge_page(&mut self, h: u64) -> Result<(), Error> {
        if self.torn {
            return Err(Error::TornDown);
        }
        if h >= self.pages.len() as u64 {
            // The engine names that huge page's bytes (CONTRACT.md §3.1);
            // the harness compares the variant only.
            return Err(Error::InvalidRange { offset: 0, len: 0 });
        }
        Ok(())
    }

    /// The backing of huge page `h` (which must exist).
    pub fn backing_of(&self, h: u64) -> Backing {
        match self.pages[h as usize].backing {
            MBacking::Absent => Backing::Absent,
            MBacking::Huge => Backing::Huge,
            MBacking::Split => Backing::Split,
        }
    }

    /// The largest order huge page `h` may be mapped at: the file's order when it is whole and nothing is punched, else 0.
    pub fn max_order_of(&self, h: u64) -> u8 {
        let p = &self.pages[h as usize];
        if p.backing == MBacking::Huge && p.ones == 0 {
            self.order
        } else {
            0
        }
    }

    /// `backing(h)`; the error's range is not modelled (always 0, 0).
    pub fn backing(&mut self, h: u64) -> Result<Backing, Error> {
        self.check_huge_page(h)?;
        Ok(self.backing_of(h))
    }

    /// `max_mapping_order(h)`; the error's range is not modelled (always 0, 0).
    pub fn max_mapping_order(&mut self, h: u64) -> Result<u8, Error> {
        self.check_huge_page(h)?;
        Ok(self.max_order_of(h))
    }
}
