//! The file's geometry is the engine's [`hugepunch::Geometry`]: the model
//! validates sizes, validates ranges and splits them into parts per huge
//! page with it, so the rules live in one place. This module adds what only
//! the model asks of a geometry ([`ModelGeometry`]: whole parts and the
//! direct map's entries, and [`subpage_span`]).
//!
//! It also keeps [`Geometry`], a compatibility shim for the callers that
//! still build a geometry field by field (the tool's cost estimate and its
//! picture, through [`crate::Kernel::geometry`]); it validates nothing
//! itself and goes once they use [`hugepunch::Geometry`].

use hugepunch::{ByteRange, PagePart, SUBPAGE_SHIFT, SUBPAGE_SIZE};

/// Size of one direct-map entry the model tracks: 2 MiB.
pub const DIRECT_MAP_ENTRY: u64 = 2 << 20;

/// What only the model asks of a file's geometry.
pub trait ModelGeometry {
    /// Does the part cover its whole huge page?
    fn is_whole(&self, p: PagePart) -> bool;

    /// Size of one direct-map entry of the model: 2 MiB, or the huge page
    /// when huge pages are smaller (so tests with tiny huge pages still
    /// exercise splits and restores).
    fn region_size(&self) -> u64;

    /// Number of direct-map entries covering the file.
    fn regions(&self) -> u64;

    /// Subpages per direct-map entry.
    fn region_subpages(&self) -> u64;
}

impl ModelGeometry for hugepunch::Geometry {
    fn is_whole(&self, p: PagePart) -> bool {
        p.count == self.subpages_per_huge_page()
    }

    fn region_size(&self) -> u64 {
        DIRECT_MAP_ENTRY.min(self.huge_page_size())
    }

    fn regions(&self) -> u64 {
        self.size() / self.region_size()
    }

    fn region_subpages(&self) -> u64 {
        self.region_size() >> SUBPAGE_SHIFT
    }
}

/// Subpage index range `[start, end)` of a byte range.
pub fn subpage_span(r: ByteRange) -> (u64, u64) {
    (r.first_subpage(), r.first_subpage() + r.subpages())
}

/// Compatibility shim: the size and huge page order of a file as plain
/// fields, for callers that build one field by field. Nothing here is
/// validated; [`Geometry::validate`] answers with the engine's rules.
/// New code uses [`hugepunch::Geometry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// File size in bytes (a positive multiple of the huge page size).
    pub size: u64,
    /// Huge page order (9 = 2 MiB).
    pub order: u8,
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

    /// The range, if `offset .. offset + len` is a valid range of a valid
    /// file of this size and order ([`hugepunch::Geometry::validate`]).
    pub fn validate(&self, offset: u64, len: u64) -> Option<ByteRange> {
        hugepunch::Geometry::new(self.size, self.order)
            .ok()?
            .validate(offset, len)
    }
}

impl From<hugepunch::Geometry> for Geometry {
    fn from(g: hugepunch::Geometry) -> Self {
        Geometry {
            size: g.size(),
            order: g.order(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(size: u64, order: u8) -> hugepunch::Geometry {
        hugepunch::Geometry::new(size, order).unwrap()
    }

    #[test]
    fn direct_map_entries() {
        assert_eq!(geo(1 << 30, 9).regions(), 512);
        assert_eq!(geo(1 << 30, 18).regions(), 512);
        assert_eq!(geo(1 << 20, 3).region_size(), 32 << 10);
    }

    /// The model refuses a bad size with the engine's error, for every
    /// strategy: it names the size, the order and the huge page size.
    #[test]
    fn size_errors_are_the_engines() {
        use crate::{Kernel, ModelConfig, StrategyKind};
        let cfg = ModelConfig::new(3 << 20);
        for kind in StrategyKind::ALL {
            let e = Kernel::new(cfg, kind).err().expect("3 MiB at order 9");
            assert_eq!(e, geo_err(3 << 20, 9), "{kind}");
            assert!(e.to_string().contains("3145728 bytes"), "{e}");
            assert!(e.to_string().contains("order 9 (2 MiB huge pages)"), "{e}");
        }
        let cfg = ModelConfig {
            order: 19,
            ..ModelConfig::new(4 << 20)
        };
        assert_eq!(
            Kernel::new(cfg, StrategyKind::Eager).err(),
            Some(geo_err(4 << 20, 19))
        );
    }

    fn geo_err(size: u64, order: u8) -> hugepunch::Error {
        hugepunch::Geometry::new(size, order).unwrap_err()
    }

    #[test]
    fn the_shim_answers_as_the_engine() {
        let g = geo(8 << 20, 9);
        let shim = Geometry::from(g);
        assert_eq!(shim.full(), g.subpages_per_huge_page());
        assert_eq!(shim.huge_page_size(), g.huge_page_size());
        assert_eq!(shim.huge_pages(), g.huge_pages());
        assert_eq!(shim.subpages(), g.subpages());
        for (o, l) in [(0x1000, 0x401000), (0, 0), (u64::MAX - 4095, 8192)] {
            assert_eq!(shim.validate(o, l), g.validate(o, l));
        }
        let bad = Geometry {
            size: 3 << 20,
            order: 9,
        };
        assert_eq!(bad.validate(0, 4096), None, "no range of an invalid file");
    }
}
