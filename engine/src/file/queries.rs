//! Read-only queries for the VMM's own accesses: subpage states, pending
//! runs, the largest mapping order, the backing.

use super::*;

impl HugePunch {
    /// Stable state of subpage `sub` of huge page `h`.
    pub(super) fn subpage(&self, h: u64, sub: u32) -> SubpageState {
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
        let r = self.validate(offset, SUBPAGE_SIZE)?;
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
        let r = self.validate(offset, len)?;
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

    pub(super) fn huge_page_state(&self, h: u64) -> Result<Snapshot, Error> {
        self.live()?;
        if h >= self.geo.huge_pages() {
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
            self.geo.order()
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
}
