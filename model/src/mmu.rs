//! A KVM-like MMU: which subpages of the file the guest has mapped, at
//! 4 KiB or huge size, and KVM's fault-retry protocol.
//!
//! # The protocol (as in `virt/kvm/kvm_main.c`)
//!
//! * `invalidate_begin(range)`: under the MMU lock, the in-progress count
//!   goes up, the range joins the in-progress range, and every mapping
//!   overlapping the range is zapped (a huge mapping goes whole).
//! * `invalidate_end(range)`: under the MMU lock, the sequence number is
//!   bumped, then the in-progress count goes down.
//! * A fault snapshots the sequence number *before* it looks the page up
//!   (and before it populates it), then takes the MMU lock and retries if
//!   the sequence moved or an invalidation in progress covers what it
//!   would map. Only then does it install the mapping.
//!
//! So a fault that looked up a page that an invalidation then freed can
//! never install a mapping of it: either the invalidation was in progress
//! when the fault took the lock, or it had ended and bumped the sequence.

use hugepunch::Geometry;
use std::collections::{BTreeMap, HashMap};

/// Identity of one physical 4 KiB page: the allocation it belongs to (a
/// huge folio or a run of 4 KiB pages) and its subpage index in its huge
/// page. A freed page's identity is never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Phys {
    /// Allocation id.
    pub alloc: u64,
    /// Subpage index within the huge page.
    pub sub: u32,
}

#[derive(Debug, Default)]
struct Mappings {
    /// A huge mapping of the whole huge page, to the folio with this id.
    huge: Option<u64>,
    /// 4 KiB mappings, by subpage index.
    small: HashMap<u32, Phys>,
}

/// The MMU state; the host keeps it behind one lock (KVM's `mmu_lock`).
#[derive(Debug, Default)]
pub struct Mmu {
    /// Invalidations in progress, as subpage ranges (a multiset).
    in_progress: Vec<(u64, u64)>,
    /// Bumped at every `invalidate_end`.
    seq: u64,
    maps: BTreeMap<u64, Mappings>,
    /// Huge and 4 KiB mappings installed so far.
    pub installed_huge: u64,
    /// 4 KiB mappings installed so far.
    pub installed_small: u64,
    /// Mappings zapped so far.
    pub zapped: u64,
}

impl Mmu {
    /// The sequence number, as a fault snapshots it.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Start an invalidation of subpages `[s0, s1)`: zap what overlaps.
    pub fn begin(&mut self, geo: &Geometry, s0: u64, s1: u64) {
        self.in_progress.push((s0, s1));
        self.zap(geo, s0, s1);
    }

    /// End an invalidation of `[s0, s1)`. `false` if none such was in
    /// progress (an unbalanced end).
    pub fn end(&mut self, s0: u64, s1: u64) -> bool {
        self.seq += 1;
        match self.in_progress.iter().position(|&r| r == (s0, s1)) {
            Some(i) => {
                self.in_progress.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// KVM's `mmu_invalidate_retry_gfn`: must a fault that snapshotted
    /// `seq` and would map `[s0, s1)` retry? The in-progress range is
    /// merged (lowest start, highest end) as KVM merges it.
    pub fn must_retry(&self, seq: u64, s0: u64, s1: u64) -> bool {
        if !self.in_progress.is_empty() {
            let lo = self.in_progress.iter().map(|r| r.0).min().unwrap_or(0);
            let hi = self.in_progress.iter().map(|r| r.1).max().unwrap_or(0);
            if s0 < hi && lo < s1 {
                return true;
            }
        }
        self.seq != seq
    }

    /// Zap every mapping overlapping subpages `[s0, s1)`.
    pub fn zap(&mut self, geo: &Geometry, s0: u64, s1: u64) {
        if s0 >= s1 {
            return;
        }
        let order = geo.order() as u32;
        let (h0, h1) = (s0 >> order, (s1 - 1) >> order);
        let mut empty = Vec::new();
        for (&h, m) in self.maps.range_mut(h0..=h1) {
            let base = h << order;
            if m.huge.take().is_some() {
                self.zapped += 1;
            }
            let before = m.small.len();
            m.small.retain(|&sub, _| {
                let s = base + sub as u64;
                s < s0 || s >= s1
            });
            self.zapped += (before - m.small.len()) as u64;
            if m.huge.is_none() && m.small.is_empty() {
                empty.push(h);
            }
        }
        for h in empty {
            self.maps.remove(&h);
        }
    }

    /// What the guest's access to subpage `s` goes to, if mapped.
    pub fn translate(&self, geo: &Geometry, s: u64) -> Option<Phys> {
        let order = geo.order() as u32;
        let h = s >> order;
        let sub = (s - (h << order)) as u32;
        let m = self.maps.get(&h)?;
        if let Some(folio) = m.huge {
            return Some(Phys { alloc: folio, sub });
        }
        m.small.get(&sub).copied()
    }

    /// The first mapped subpage of `[s0, s1)`, if any.
    pub fn first_mapped(&self, geo: &Geometry, s0: u64, s1: u64) -> Option<u64> {
        if s0 >= s1 {
            return None;
        }
        let order = geo.order() as u32;
        let (h0, h1) = (s0 >> order, (s1 - 1) >> order);
        for (&h, m) in self.maps.range(h0..=h1) {
            let base = h << order;
            if m.huge.is_some() {
                return Some(s0.max(base));
            }
            if let Some(s) = m
                .small
                .keys()
                .map(|&sub| base + sub as u64)
                .filter(|&s| s >= s0 && s < s1)
                .min()
            {
                return Some(s);
            }
        }
        None
    }

    /// Is any mapping of huge page `h` a huge one?
    pub fn is_mapped_huge(&self, h: u64) -> bool {
        self.maps.get(&h).is_some_and(|m| m.huge.is_some())
    }

    /// Install a huge mapping of huge page `h` to folio `folio`.
    pub fn install_huge(&mut self, h: u64, folio: u64) {
        let m = self.maps.entry(h).or_default();
        m.small.clear();
        m.huge = Some(folio);
        self.installed_huge += 1;
    }

    /// Install a 4 KiB mapping of subpage `s`.
    pub fn install_small(&mut self, geo: &Geometry, s: u64, phys: Phys) {
        let h = s >> geo.order();
        let m = self.maps.entry(h).or_default();
        if m.huge.is_none() {
            m.small.insert(phys.sub, phys);
            self.installed_small += 1;
        }
    }

    /// Number of huge pages with at least one mapping.
    pub fn mapped_huge_pages(&self) -> usize {
        self.maps.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_protocol() {
        let g = Geometry::new(1 << 20, 3).unwrap();
        let mut m = Mmu::default();
        let seq = m.seq();
        m.install_small(&g, 3, Phys { alloc: 1, sub: 3 });
        assert!(m.translate(&g, 3).is_some());
        m.begin(&g, 0, 8);
        assert!(m.translate(&g, 3).is_none(), "begin zaps");
        assert!(m.must_retry(seq, 3, 4), "in progress over the fault");
        assert!(!m.must_retry(seq, 8, 9), "elsewhere, nothing moved yet");
        assert!(m.end(0, 8));
        assert!(m.must_retry(seq, 8, 9), "the sequence moved");
        assert!(!m.must_retry(m.seq(), 3, 4));
        assert!(!m.end(0, 8), "unbalanced end is reported");
    }

    #[test]
    fn huge_mapping_goes_whole() {
        let g = Geometry::new(1 << 20, 3).unwrap();
        let mut m = Mmu::default();
        m.install_huge(1, 7);
        assert_eq!(m.translate(&g, 12), Some(Phys { alloc: 7, sub: 4 }));
        assert_eq!(m.first_mapped(&g, 9, 10), Some(9));
        m.zap(&g, 9, 10);
        assert!(m.translate(&g, 12).is_none());
        assert_eq!(m.mapped_huge_pages(), 0);
    }
}
