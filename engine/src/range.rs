//! Byte ranges, their validation, and the split of a range into the parts
//! that lie inside each huge page.

use serde::{Deserialize, Serialize};

/// The smallest unit of guest memory the engine tracks: 4 KiB.
pub const SUBPAGE_SIZE: u64 = 4096;
/// log2 of [`SUBPAGE_SIZE`].
pub const SUBPAGE_SHIFT: u32 = 12;

/// A byte range of the file: `offset .. offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

impl ByteRange {
    /// `offset .. offset + len`.
    pub const fn new(offset: u64, len: u64) -> Self {
        ByteRange { offset, len }
    }

    /// One past the last byte. Only meaningful for a validated range.
    pub const fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Subpage index of the first subpage.
    pub const fn first_subpage(&self) -> u64 {
        self.offset >> SUBPAGE_SHIFT
    }

    /// Number of subpages.
    pub const fn subpages(&self) -> u64 {
        self.len >> SUBPAGE_SHIFT
    }
}

/// Hint passed with an invalidation: the huge page whose folio backs the
/// range, and its order (the seed's `(page, order)` pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hint {
    /// Index of the huge page in the file (offset / huge page size).
    pub huge_page: u64,
    /// Order of the backing folio, in 4 KiB units (9 = 2 MiB).
    pub order: u8,
}

/// Geometry of one file: its size and huge page order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub size: u64,
    pub order: u8,
}

/// The part of a range that lies inside one huge page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PagePart {
    /// Huge page index.
    pub huge_page: u64,
    /// First subpage of the part, relative to the huge page.
    pub first: u32,
    /// Number of subpages in the part (> 0).
    pub count: u32,
}

impl Geometry {
    pub fn subpages_per_huge_page(&self) -> u32 {
        1u32 << self.order
    }

    pub fn huge_page_size(&self) -> u64 {
        SUBPAGE_SIZE << self.order
    }

    pub fn huge_pages(&self) -> u64 {
        self.size >> (SUBPAGE_SHIFT + self.order as u32)
    }

    /// The byte range of huge page `h`.
    pub fn huge_page_range(&self, h: u64) -> ByteRange {
        ByteRange::new(h * self.huge_page_size(), self.huge_page_size())
    }

    /// The byte range of `count` subpages from subpage `first` of huge page `h`.
    pub fn part_range(&self, h: u64, first: u32, count: u32) -> ByteRange {
        ByteRange::new(
            h * self.huge_page_size() + ((first as u64) << SUBPAGE_SHIFT),
            (count as u64) << SUBPAGE_SHIFT,
        )
    }

    /// Is `offset .. offset + len` a valid range of this file (SPEC.md §3)?
    pub fn validate(&self, offset: u64, len: u64) -> Option<ByteRange> {
        let aligned = offset % SUBPAGE_SIZE == 0 && len % SUBPAGE_SIZE == 0;
        let end = offset.checked_add(len)?;
        (aligned && len > 0 && end <= self.size).then_some(ByteRange::new(offset, len))
    }

    /// The parts of a validated range, one per huge page it touches, in
    /// ascending order.
    pub fn parts(&self, r: ByteRange) -> impl Iterator<Item = PagePart> {
        let order = self.order as u32;
        let per = 1u64 << order;
        let first = r.first_subpage();
        let end = first + r.subpages();
        let mut at = first;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let h = at >> order;
            let page_end = ((h + 1) * per).min(end);
            let part = PagePart {
                huge_page: h,
                first: (at - h * per) as u32,
                count: (page_end - at) as u32,
            };
            at = page_end;
            Some(part)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_example_splits_into_three_parts() {
        let g = Geometry {
            size: 8 << 20,
            order: 9,
        };
        let r = g.validate(0x1000, 0x401000).unwrap();
        let parts: Vec<_> = g
            .parts(r)
            .map(|p| g.part_range(p.huge_page, p.first, p.count))
            .collect();
        assert_eq!(
            parts,
            vec![
                ByteRange::new(0x1000, 0x1ff000),
                ByteRange::new(0x200000, 0x200000),
                ByteRange::new(0x400000, 0x2000),
            ]
        );
    }

    #[test]
    fn validation_rejects_bad_ranges() {
        let g = Geometry {
            size: 4 << 20,
            order: 9,
        };
        assert!(g.validate(0, 4096).is_some());
        assert!(g.validate(0, 0).is_none());
        assert!(g.validate(1, 4096).is_none());
        assert!(g.validate(4096, 4095).is_none());
        assert!(g.validate(4 << 20, 4096).is_none());
        assert!(g.validate(u64::MAX - 4095, 8192).is_none());
        assert!(g.validate(0, 4 << 20).is_some());
    }
}
