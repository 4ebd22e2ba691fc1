//! The direct map: per 2 MiB entry, intact or split. An entry splits when
//! memory inside it changes ownership at 4 KiB granularity: a conversion
//! covering part of the entry that changes a subpage's attribute (SEV-SNP's
//! RMP and TDX's PAMT then need 4 KiB entries), or a 4 KiB free of a
//! private subpage. It is restored only by the free of the whole aligned
//! huge page (an order-`order` free).

use super::{lock, KernelHost};
use crate::geometry::ModelGeometry;
use crate::rangemap::RangeMap;
use hugepunch::Attribute;

impl KernelHost {
    /// Is direct-map entry `r` intact?
    pub fn direct_map_intact(&self, r: u64) -> bool {
        !lock(&self.direct_map_split).contains(&r)
    }

    /// The entries a conversion of subpages `[s0, s1)` to `to` splits:
    /// the one or two it covers only in part, if the conversion changes an
    /// attribute inside them. `attrs` is the attribute map before the
    /// conversion (the caller holds its lock across the conversion).
    pub(super) fn entries_split_by_conversion(
        &self,
        attrs: &RangeMap<Attribute>,
        s0: u64,
        s1: u64,
        to: Attribute,
    ) -> Vec<u64> {
        let rs = self.geo.region_subpages();
        let (r0, r1) = (s0 / rs, (s1 - 1) / rs);
        let mut partial: Vec<u64> = Vec::new();
        for r in [r0, r1] {
            let (a, b) = (r * rs, (r + 1) * rs);
            let covered = s0 <= a && s1 >= b;
            if !covered && !partial.contains(&r) && !attrs.all(s0.max(a), s1.min(b), to) {
                partial.push(r);
            }
        }
        partial
    }

    /// Split the entries of the private subpages among `freed` (subpages
    /// of huge page `h` just freed one by one).
    pub(super) fn split_direct_map_by_small_free(&self, h: u64, freed: &[u32]) {
        let base = h << self.geo.order();
        let rs = self.geo.region_subpages();
        let private: Vec<u64> = {
            let attrs = lock(&self.attrs);
            freed
                .iter()
                .map(|&sub| base + sub as u64)
                .filter(|&s| attrs.get(s) == Attribute::Private)
                .map(|s| s / rs)
                .collect()
        };
        self.split_direct_map(private);
    }

    /// The huge page at byte `offset` was freed whole: restore its
    /// entries. Returns how many were split.
    pub(super) fn restore_direct_map(&self, offset: u64) -> u64 {
        let rs = self.geo.region_size();
        let (r0, r1) = (offset / rs, (offset + self.geo.huge_page_size()) / rs);
        let mut dm = lock(&self.direct_map_split);
        let restored: Vec<u64> = dm.range(r0..r1).copied().collect();
        for r in &restored {
            dm.remove(r);
        }
        restored.len() as u64
    }

    /// Split `regions` (counting those not split already).
    pub(super) fn split_direct_map(&self, regions: impl IntoIterator<Item = u64>) {
        let mut dm = lock(&self.direct_map_split);
        let mut n = 0;
        for r in regions {
            n += dm.insert(r) as u64;
        }
        drop(dm);
        if n > 0 {
            self.count(|c| c.direct_map_splits += n);
        }
    }
}
