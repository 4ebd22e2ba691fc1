//! Byte ranges, their validation, and the split of a range into the parts
//! that lie inside each huge page.

use crate::error::Error;
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

/// The largest huge page order accepted (1 GiB huge pages).
pub const MAX_ORDER: u8 = 18;

/// The largest file size accepted: 4 PiB (the index's limit).
pub const MAX_SIZE: u64 = 1 << 52;

/// Geometry of one file: its size and huge page order, validated once.
/// It splits ranges into their parts per huge page, and validates them,
/// for the engine and for every crate that simulates or drives one (the
/// kernel model, the tool), so that none of them re-implements the rules.
///
/// ```
/// use hugepunch::{ByteRange, Geometry};
/// let geo = Geometry::new(8 << 20, 9)?;
/// assert_eq!((geo.huge_pages(), geo.huge_page_size()), (4, 2 << 20));
/// let r = geo.validate(0x1000, 0x401000).unwrap();
/// let parts: Vec<ByteRange> = geo.parts(r).map(|p| geo.range_of(p)).collect();
/// assert_eq!(parts[1], ByteRange::new(0x200000, 0x200000));
/// # Ok::<(), hugepunch::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Geometry {
    size: u64,
    order: u8,
}

/// The part of a range that lies inside one huge page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PagePart {
    /// Huge page index.
    pub huge_page: u64,
    /// First subpage of the part, relative to the huge page.
    pub first: u32,
    /// Number of subpages in the part (> 0).
    pub count: u32,
}

impl Geometry {
    /// A file of `size` bytes with huge pages of order `order` (4 KiB <<
    /// order). Fails with [`Error::InvalidGeometry`], naming the size, the
    /// order and the huge page size, unless the order is 1 to 18 and the
    /// size a positive multiple of the huge page size of at most 4 PiB.
    pub fn new(size: u64, order: u8) -> Result<Self, Error> {
        let invalid = |why| Error::InvalidGeometry { size, order, why };
        if !(1..=MAX_ORDER).contains(&order) {
            return Err(invalid("the order must be between 1 and 18"));
        }
        if size > MAX_SIZE {
            return Err(invalid("the size must be at most 4 PiB"));
        }
        if size == 0 || size % (SUBPAGE_SIZE << order) != 0 {
            return Err(invalid(
                "the size must be a positive multiple of the huge page size",
            ));
        }
        Ok(Geometry { size, order })
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Huge page order (4 KiB units: 9 = 2 MiB).
    pub fn order(&self) -> u8 {
        self.order
    }

    /// Subpages per huge page.
    pub fn subpages_per_huge_page(&self) -> u32 {
        1u32 << self.order
    }

    /// Huge page size in bytes.
    pub fn huge_page_size(&self) -> u64 {
        SUBPAGE_SIZE << self.order
    }

    /// Number of huge pages.
    pub fn huge_pages(&self) -> u64 {
        self.size >> (SUBPAGE_SHIFT + self.order as u32)
    }

    /// Number of subpages in the file.
    pub fn subpages(&self) -> u64 {
        self.size >> SUBPAGE_SHIFT
    }

    /// The huge page holding byte `offset`.
    pub fn huge_page_of(&self, offset: u64) -> u64 {
        offset >> (SUBPAGE_SHIFT + self.order as u32)
    }

    /// The byte range of one part.
    pub fn range_of(&self, p: PagePart) -> ByteRange {
        self.part_range(p.huge_page, p.first, p.count)
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

    /// Is `offset .. offset + len` a valid range of this file
    /// (`docs/CONTRACT.md` §3.1)?
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
        let g = Geometry::new(8 << 20, 9).unwrap();
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
        let g = Geometry::new(4 << 20, 9).unwrap();
        assert!(g.validate(0, 4096).is_some());
        assert!(g.validate(0, 0).is_none());
        assert!(g.validate(1, 4096).is_none());
        assert!(g.validate(4096, 4095).is_none());
        assert!(g.validate(4 << 20, 4096).is_none());
        assert!(g.validate(u64::MAX - 4095, 8192).is_none());
        assert!(g.validate(0, 4 << 20).is_some());
    }

    #[test]
    fn size_errors_name_the_size_the_order_and_the_huge_page_size() {
        let e = Geometry::new(3 << 20, 9).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid geometry: size 3145728 bytes (3 MiB), huge page order 9 (2 MiB huge pages): \
             the size must be a positive multiple of the huge page size"
        );
        assert_eq!(e.errno(), crate::EINVAL);
        assert!(Geometry::new(0, 9).is_err());
        assert!(Geometry::new(4 << 20, 0).is_err());
        assert!(Geometry::new(4 << 20, 19).is_err());
        assert!(Geometry::new(MAX_SIZE * 2, 9).is_err());
        assert!(Geometry::new(MAX_SIZE, 18).is_ok());
    }
}
