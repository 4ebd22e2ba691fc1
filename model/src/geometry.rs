//! File geometry: validation of ranges and their split into per-huge-page
//! parts, with the same rules as the engine (CONTRACT.md §3.1).

use hugepunch::{ByteRange, SUBPAGE_SHIFT, SUBPAGE_SIZE};

/// Size of one direct-map entry the model tracks: 2 MiB.
pub const DIRECT_MAP_ENTRY: u64 = 2 << 20;

/// Size and huge page order of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// File size in bytes (a positive multiple of the huge page size).
    pub size: u64,
    /// Huge page order (9 = 2 MiB).
    pub order: u8,
}

/// The part of a range inside one huge page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Huge page index.
    pub huge_page: u64,
    /// First subpage of the part, relative to the huge page.
    pub first: u32,
    /// Number of subpages (> 0).
    pub count: u32,
}

impl Geometry {
    /// Subpages per huge page.
    pub fn full(&self) -> u32 {
        1 << self.order
    }

    /// Huge page size in bytes.
    pub fn huge_page_size(&self) -> u64 {
        SUBPAGE_SIZE << self.order
    }

    /// Number of huge pages.
    pub fn huge_pages(&self) -> u64 {
        self.size >> (SUBPAGE_SHIFT + self.order as u32)
    }

    /// Subpages in the file.
    pub fn subpages(&self) -> u64 {
        self.size >> SUBPAGE_SHIFT
    }

    /// Byte range of huge page `h`.
    pub fn huge_page_range(&self, h: u64) -> ByteRange {
        ByteRange::new(h * self.huge_page_size(), self.huge_page_size())
    }

    /// Byte range of a part.
    pub fn part_range(&self, p: Part) -> ByteRange {
        ByteRange::new(
            h_offset(self, p.huge_page) + ((p.first as u64) << SUBPAGE_SHIFT),
            (p.count as u64) << SUBPAGE_SHIFT,
        )
    }

    /// Does the part cover its whole huge page?
    pub fn is_whole(&self, p: Part) -> bool {
        p.count == self.full()
    }

    /// The range, if `offset .. offset + len` is valid for this file:
    /// 4 KiB aligned, non-empty, no overflow, inside the file.
    pub fn validate(&self, offset: u64, len: u64) -> Option<ByteRange> {
        let aligned = offset.is_multiple_of(SUBPAGE_SIZE) && len.is_multiple_of(SUBPAGE_SIZE);
        let end = offset.checked_add(len)?;
        (aligned && len > 0 && end <= self.size).then_some(ByteRange::new(offset, len))
    }

    /// The parts of a valid range, one per huge page, ascending.
    pub fn parts(&self, r: ByteRange) -> impl Iterator<Item = Part> {
        let order = self.order as u32;
        let per = 1u64 << order;
        let mut at = r.first_subpage();
        let end = at + r.subpages();
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let h = at >> order;
            let stop = ((h + 1) * per).min(end);
            let part = Part {
                huge_page: h,
                first: (at - h * per) as u32,
                count: (stop - at) as u32,
            };
            at = stop;
            Some(part)
        })
    }

    /// Size of one direct-map entry of the model: 2 MiB, or the huge page
    /// when huge pages are smaller (so tests with tiny huge pages still
    /// exercise splits and restores).
    pub fn region_size(&self) -> u64 {
        DIRECT_MAP_ENTRY.min(self.huge_page_size())
    }

    /// Number of direct-map entries covering the file.
    pub fn regions(&self) -> u64 {
        self.size / self.region_size()
    }

    /// Subpages per direct-map entry.
    pub fn region_subpages(&self) -> u64 {
        self.region_size() >> SUBPAGE_SHIFT
    }
}

fn h_offset(g: &Geometry, h: u64) -> u64 {
    h * g.huge_page_size()
}

/// Subpage index range `[start, end)` of a byte range.
pub fn subpage_span(r: ByteRange) -> (u64, u64) {
    (r.first_subpage(), r.first_subpage() + r.subpages())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_split_per_huge_page() {
        let g = Geometry {
            size: 8 << 20,
            order: 9,
        };
        let r = g.validate(0x1000, 0x401000).unwrap();
        let parts: Vec<_> = g.parts(r).map(|p| g.part_range(p)).collect();
        assert_eq!(
            parts,
            vec![
                ByteRange::new(0x1000, 0x1ff000),
                ByteRange::new(0x200000, 0x200000),
                ByteRange::new(0x400000, 0x2000)
            ]
        );
        assert!(g.validate(0, 0).is_none());
        assert!(g.validate(u64::MAX - 4095, 8192).is_none());
        assert!(g.validate(8 << 20, 4096).is_none());
    }

    #[test]
    fn direct_map_entries() {
        assert_eq!(
            Geometry {
                size: 1 << 30,
                order: 9
            }
            .regions(),
            512
        );
        assert_eq!(
            Geometry {
                size: 1 << 30,
                order: 18
            }
            .regions(),
            512
        );
        assert_eq!(
            Geometry {
                size: 1 << 20,
                order: 3
            }
            .region_size(),
            32 << 10
        );
    }
}
