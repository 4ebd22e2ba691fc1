//! The file's geometry is the engine's [`hugepunch::Geometry`]: the model
//! validates sizes, validates ranges and splits them into parts per huge
//! page with it, so the rules live in one place. This module adds what only
//! the model asks of a geometry ([`ModelGeometry`]: whole parts and the
//! direct map's entries, and [`subpage_span`]).

use hugepunch::{ByteRange, PagePart, SUBPAGE_SHIFT};

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
}
