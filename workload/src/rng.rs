//! The one random number generator of every workload: PCG-64
//! ([`rand_pcg::Pcg64`]) seeded with [`SeedableRng::seed_from_u64`], drawn
//! through `rand`'s uniform ranges and Fisher–Yates shuffle.
//!
//! A seed gives the same sequence on every machine. Across versions, the
//! PCG stream itself never changes; `rand`'s ranges and shuffle keep their
//! values within a minor version (`0.10.x`, the one `Cargo.lock` holds), so
//! a trace generated today is generated again as long as that version is.

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_pcg::Pcg64;

/// A seeded generator.
#[derive(Debug, Clone)]
pub struct Rng(Pcg64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(Pcg64::seed_from_u64(seed))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.random()
    }

    /// Uniform in `0..n`. Panics if `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n)
    }

    /// Shuffle in place, every order equally likely.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        v.shuffle(&mut self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_sequence() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..8).map(|_| a.below(1000)).collect();
        assert_eq!(xs, (0..8).map(|_| b.below(1000)).collect::<Vec<_>>());
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
        let mut v: Vec<u32> = (0..100).collect();
        Rng::new(3).shuffle(&mut v);
        let mut w: Vec<u32> = (0..100).collect();
        Rng::new(3).shuffle(&mut w);
        assert_eq!(v, w);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        w.sort_unstable();
        assert_eq!(w, (0..100).collect::<Vec<_>>(), "a permutation");
    }

    #[test]
    fn below_stays_below() {
        let mut r = Rng::new(1);
        assert!((0..1000).all(|_| r.below(3) < 3));
        assert_eq!(r.below(1), 0);
    }
}
