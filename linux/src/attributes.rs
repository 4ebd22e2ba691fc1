//! The shared-state record a VMM keeps for the engine's `is_shared` check:
//! one bit per 4 KiB subpage, set = shared, changed only by
//! `set_attributes` (both hosts of this crate answer from it).

use crate::sync::{AtomicU64, Ordering};
use hugepunch::{Attribute, ByteRange};

/// One bit per subpage of a file, set = shared. Every subpage starts
/// private.
pub(crate) struct SharedBits(Box<[AtomicU64]>);

impl SharedBits {
    /// A record of `subpages` subpages, all private.
    pub(crate) fn new(subpages: u64) -> Self {
        SharedBits(
            (0..subpages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    /// Is every subpage of `range` shared?
    pub(crate) fn all_shared(&self, range: ByteRange) -> bool {
        masks(range).all(|(w, mask)| {
            // ORDERING: Acquire pairs with the Release of `set`: a
            // conversion that finished before this check is seen. (The
            // engine's own converting marks order conversions still in
            // flight; answering from an older value is only ever "private",
            // the safe answer, for a range turning shared.)
            self.0[w].load(Ordering::Acquire) & mask == mask
        })
    }

    /// Mark `range` shared or private.
    pub(crate) fn set(&self, range: ByteRange, to: Attribute) {
        for (w, mask) in masks(range) {
            // ORDERING: Release pairs with the Acquire of `all_shared`.
            match to {
                Attribute::Shared => self.0[w].fetch_or(mask, Ordering::Release),
                Attribute::Private => self.0[w].fetch_and(!mask, Ordering::Release),
            };
        }
    }

    /// Mark every subpage shared or private.
    pub(crate) fn set_all(&self, to: Attribute) {
        let v = if to == Attribute::Shared { u64::MAX } else { 0 };
        for w in self.0.iter() {
            // ORDERING: Release, as in `set`.
            w.store(v, Ordering::Release);
        }
    }
}

/// Word masks of the subpages of `r`: (word index, mask).
fn masks(r: ByteRange) -> impl Iterator<Item = (usize, u64)> {
    let first = r.first_subpage();
    let end = first + r.subpages();
    let mut at = first;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let w = at / 64;
        let hi = ((w + 1) * 64).min(end);
        let n = hi - at;
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << (at % 64)
        };
        at = hi;
        Some((w as usize, mask))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_exactly_the_range() {
        let m: Vec<_> = masks(ByteRange::new(62 * 4096, 4 * 4096)).collect();
        assert_eq!(m, vec![(0, 0b11 << 62), (1, 0b11)]);
        let m: Vec<_> = masks(ByteRange::new(64 * 4096, 64 * 4096)).collect();
        assert_eq!(m, vec![(1, u64::MAX)]);
    }

    #[test]
    fn shared_bits_follow_the_conversions() {
        let b = SharedBits::new(130);
        let r = ByteRange::new(60 * 4096, 10 * 4096);
        assert!(!b.all_shared(r));
        b.set(r, Attribute::Shared);
        assert!(b.all_shared(r));
        assert!(!b.all_shared(ByteRange::new(59 * 4096, 2 * 4096)));
        b.set(ByteRange::new(65 * 4096, 4096), Attribute::Private);
        assert!(!b.all_shared(r));
        b.set_all(Attribute::Shared);
        assert!(b.all_shared(ByteRange::new(0, 130 * 4096)));
    }
}
