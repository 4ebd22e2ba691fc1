//! The conversion stream a confidential guest sends its VMM while it boots
//! and runs: private↔shared conversions and give-backs, generated from a
//! small documented model ([`StreamModel`]).
//!
//! # The model
//!
//! Guest memory is the private file (a guest_memfd): it starts populated
//! and private — every page accepted at boot (eager acceptance; lazy
//! acceptance would add 2 MiB populates of pages still absent, which move
//! none of the figures compared here). Then, in order:
//!
//! 1. **SWIOTLB** — the bounce-buffer pool, `swiotlb` bytes (Linux sizes it
//!    at 6% of memory, at most 1 GiB, for SEV), 2 MiB aligned at a seeded
//!    place, converted to shared in `swiotlb_chunk` pieces at boot: each
//!    piece `convert shared`, then `punch` (the VMM discards the private
//!    copy, as QEMU's `kvm_convert_memory` calls
//!    `ram_block_discard_guest_memfd_range`).
//! 2. **virtio rings** — `devices` devices, `ring_pages` 4 KiB pages each,
//!    allocated from the guest's page allocator (scattered 4 KiB pages) and
//!    made shared one page at a time (`dma_alloc_coherent` →
//!    `set_memory_decrypted`).
//! 3. **Coherent DMA churn** — `dma_churn` further 4 KiB coherent
//!    allocations at scattered pages, each made shared (and discarded) and,
//!    `dma_window` allocations later, freed: made private again, which the
//!    VMM does by populating the private page and converting it (a
//!    conversion to private over a discarded page needs the page back:
//!    docs/CONTRACT.md §3.5, the Reject policy).
//! 4. **Balloon** — `balloon` bytes given back 4 KiB at a time at scattered
//!    private pages (virtio-balloon inflates pages the buddy allocator
//!    hands it), each a `punch`.
//! 5. **Free page reporting** — `reporting` bytes reported in 2 MiB blocks
//!    (`page_reporting_order` 9), each a 2 MiB `punch` of a huge page no
//!    earlier step touched.
//!
//! "Scattered" pages are drawn uniformly from the pages no earlier step
//! used, with [`Rng`] seeded by `seed`: the same model and seed give the
//! same stream everywhere.

use crate::rng::Rng;
use crate::trace::{Op, Trace};
use hugepunch::{Attribute, Geometry, SUBPAGE_SIZE};
use serde::Serialize;

/// The parameters of the stream (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StreamModel {
    /// Guest memory, bytes: a positive multiple of 2 MiB.
    pub size: u64,
    /// SWIOTLB pool, bytes (a multiple of 2 MiB, at most half the memory).
    pub swiotlb: u64,
    /// The pieces the pool is converted in, bytes (4 KiB to 2 MiB, a power
    /// of two).
    pub swiotlb_chunk: u64,
    /// virtio devices.
    pub devices: u64,
    /// Ring pages per device (4 KiB each).
    pub ring_pages: u64,
    /// Coherent DMA allocations made shared, then private again.
    pub dma_churn: u64,
    /// How many allocations later each is freed (made private again).
    pub dma_window: u64,
    /// Bytes the balloon takes, 4 KiB at a time.
    pub balloon: u64,
    /// Bytes free page reporting gives back, 2 MiB at a time.
    pub reporting: u64,
    /// Seed of the scattered pages.
    pub seed: u64,
}

/// Why a model cannot make a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conversion stream: {0}")]
pub struct BadModel(pub String);

const HUGE: u64 = 2 << 20;

impl StreamModel {
    /// The defaults for `size` bytes of guest memory: SWIOTLB 6% of it
    /// rounded to 2 MiB (at least 2 MiB, at most 1 GiB) in 2 MiB pieces, 4
    /// devices with 16 ring pages each, 4096 coherent allocations freed 64
    /// later, a balloon of an eighth and free page reporting of an eighth
    /// of memory (rounded down to 2 MiB).
    pub fn for_size(size: u64) -> Self {
        let swiotlb = (size * 6 / 100 / HUGE * HUGE).clamp(HUGE, 1 << 30);
        StreamModel {
            size,
            swiotlb,
            swiotlb_chunk: HUGE,
            devices: 4,
            ring_pages: 16,
            dma_churn: 4096,
            dma_window: 64,
            balloon: size / 8 / SUBPAGE_SIZE * SUBPAGE_SIZE,
            reporting: size / 8 / HUGE * HUGE,
            seed: crate::pattern::DEFAULT_SEED,
        }
    }

    /// Pages the scattered steps need, beyond the pool and the reported
    /// blocks.
    fn scattered_pages(&self) -> u64 {
        self.devices * self.ring_pages + self.dma_churn + self.balloon / SUBPAGE_SIZE
    }

    /// Check the parameters.
    pub fn check(&self) -> Result<(), BadModel> {
        let bad = |m: String| Err(BadModel(m));
        if self.size == 0 || !self.size.is_multiple_of(HUGE) {
            return bad(format!(
                "memory size {:#x} must be a positive multiple of 2 MiB",
                self.size
            ));
        }
        if !self.swiotlb.is_multiple_of(HUGE) || self.swiotlb > self.size / 2 {
            return bad(format!(
                "SWIOTLB {:#x} must be a multiple of 2 MiB, at most half of memory",
                self.swiotlb
            ));
        }
        if !self.swiotlb_chunk.is_power_of_two()
            || !(SUBPAGE_SIZE..=HUGE).contains(&self.swiotlb_chunk)
        {
            return bad(format!(
                "SWIOTLB chunk {:#x} must be a power of two from 4 KiB to 2 MiB",
                self.swiotlb_chunk
            ));
        }
        if !self.balloon.is_multiple_of(SUBPAGE_SIZE) || !self.reporting.is_multiple_of(HUGE) {
            return bad(
                "the balloon must be a multiple of 4 KiB and free page reporting of 2 MiB".into(),
            );
        }
        if self.dma_window == 0 {
            return bad("the DMA window must be at least 1".into());
        }
        // Room: the pool and the reported blocks take whole huge pages; the
        // scattered pages must fit in what is left, with a margin so that
        // drawing them stays quick.
        let free_huge = (self.size - self.swiotlb) / HUGE;
        if self.reporting / HUGE > free_huge / 2 {
            return bad(
                "free page reporting may take at most half of the memory outside SWIOTLB".into(),
            );
        }
        let left = (free_huge - self.reporting / HUGE) * (HUGE / SUBPAGE_SIZE);
        if self.scattered_pages() > left / 2 {
            return bad(format!(
                "rings, DMA churn and balloon need {} pages; at most {} fit (half of what SWIOTLB and reporting leave)",
                self.scattered_pages(),
                left / 2
            ));
        }
        Ok(())
    }

    /// The stream's operations.
    pub fn ops(&self) -> Result<Vec<Op>, BadModel> {
        self.check()?;
        let mut rng = Rng::new(self.seed);
        let huge_pages = self.size / HUGE;
        let subs = HUGE / SUBPAGE_SIZE;
        let mut used_huge = vec![false; huge_pages as usize];
        let mut used = vec![false; (self.size / SUBPAGE_SIZE) as usize];
        let mut ops = Vec::new();
        let shared = |offset, len| Op::Convert {
            offset,
            len,
            to: Attribute::Shared,
        };

        // 1. SWIOTLB: a 2 MiB-aligned pool at a seeded place.
        let pool_pages = self.swiotlb / HUGE;
        if pool_pages > 0 {
            let first = rng.below(huge_pages - pool_pages + 1);
            for h in first..first + pool_pages {
                used_huge[h as usize] = true;
                used[(h * subs) as usize..((h + 1) * subs) as usize].fill(true);
            }
            let base = first * HUGE;
            for at in (base..base + self.swiotlb).step_by(self.swiotlb_chunk as usize) {
                ops.push(shared(at, self.swiotlb_chunk));
                ops.push(Op::Punch {
                    offset: at,
                    len: self.swiotlb_chunk,
                });
            }
        }
        // Free page reporting's blocks are chosen now (from huge pages the
        // pool does not hold) and kept out of the scattered draws.
        let mut reported = Vec::new();
        for _ in 0..self.reporting / HUGE {
            let h = loop {
                let h = rng.below(huge_pages);
                if !used_huge[h as usize] {
                    break h;
                }
            };
            used_huge[h as usize] = true;
            used[(h * subs) as usize..((h + 1) * subs) as usize].fill(true);
            reported.push(h);
        }
        let mut draw = |rng: &mut Rng| loop {
            let p = rng.below(self.size / SUBPAGE_SIZE);
            if !used[p as usize] {
                used[p as usize] = true;
                break p * SUBPAGE_SIZE;
            }
        };
        // 2. virtio rings.
        for _ in 0..self.devices * self.ring_pages {
            let at = draw(&mut rng);
            ops.push(shared(at, SUBPAGE_SIZE));
            ops.push(Op::Punch {
                offset: at,
                len: SUBPAGE_SIZE,
            });
        }
        // 3. Coherent DMA churn.
        let mut live = std::collections::VecDeque::new();
        for _ in 0..self.dma_churn {
            let at = draw(&mut rng);
            ops.push(shared(at, SUBPAGE_SIZE));
            ops.push(Op::Punch {
                offset: at,
                len: SUBPAGE_SIZE,
            });
            live.push_back(at);
            if live.len() as u64 > self.dma_window {
                let back = live.pop_front().expect("longer than the window");
                ops.push(Op::Populate {
                    offset: back,
                    len: SUBPAGE_SIZE,
                });
                ops.push(Op::Convert {
                    offset: back,
                    len: SUBPAGE_SIZE,
                    to: Attribute::Private,
                });
            }
        }
        // 4. Balloon.
        for _ in 0..self.balloon / SUBPAGE_SIZE {
            let at = draw(&mut rng);
            ops.push(Op::Punch {
                offset: at,
                len: SUBPAGE_SIZE,
            });
        }
        // 5. Free page reporting.
        for h in reported {
            ops.push(Op::Punch {
                offset: h * HUGE,
                len: HUGE,
            });
        }
        Ok(ops)
    }

    /// The stream as a trace (`hugepunch replay` reads it): 2 MiB huge
    /// pages, starting populated and private.
    pub fn trace(&self) -> Result<Trace, BadModel> {
        let geo = Geometry::new(self.size, 9).map_err(|e| BadModel(e.to_string()))?;
        Ok(Trace {
            size: geo.size(),
            order: geo.order(),
            populated: true,
            start: Attribute::Private,
            ops: self
                .ops()?
                .into_iter()
                .enumerate()
                .map(|(i, op)| (i + 5, op))
                .collect(),
        })
    }

    /// Bytes shared at the end of the stream (the same whatever the VMM
    /// does with the private side): the pool, the rings, and the DMA
    /// allocations still live.
    pub fn shared_bytes_at_end(&self) -> u64 {
        self.swiotlb
            + self.devices * self.ring_pages * SUBPAGE_SIZE
            + self.dma_churn.min(self.dma_window) * SUBPAGE_SIZE
    }

    /// Bytes the guest gave back and never took back: the private copies of
    /// what it shared, the balloon and the reported blocks.
    pub fn given_back_bytes(&self) -> u64 {
        self.shared_bytes_at_end() + self.balloon + self.reporting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_make_a_valid_stream_of_the_documented_shape() {
        let m = StreamModel::for_size(1 << 30);
        assert_eq!(m.swiotlb, 60 << 20);
        let ops = m.ops().unwrap();
        let punched: u64 = ops
            .iter()
            .filter_map(|op| match *op {
                Op::Punch { len, .. } => Some(len),
                _ => None,
            })
            .sum();
        let populated: u64 = ops
            .iter()
            .filter_map(|op| match *op {
                Op::Populate { len, .. } => Some(len),
                _ => None,
            })
            .sum();
        assert_eq!(punched - populated, m.given_back_bytes());
        // Every range inside memory, 4 KiB aligned.
        for op in &ops {
            let r = op.range().unwrap();
            assert!(r.offset % SUBPAGE_SIZE == 0 && r.end() <= m.size, "{op:?}");
        }
        // Each DMA allocation past the window goes back to private after
        // being populated.
        let back = ops
            .windows(2)
            .filter(|w| {
                matches!(w[0], Op::Populate { .. })
                    && matches!(
                        w[1],
                        Op::Convert {
                            to: Attribute::Private,
                            ..
                        }
                    )
            })
            .count() as u64;
        assert_eq!(back, m.dma_churn - m.dma_window);
        assert_eq!(m.ops().unwrap(), ops, "deterministic");
        let other = StreamModel { seed: 2, ..m };
        assert_ne!(other.ops().unwrap(), ops);
        let trace = m.trace().unwrap();
        assert_eq!(Trace::parse(&trace.to_text()).unwrap(), trace);
    }

    #[test]
    fn bad_models_are_refused_with_a_reason() {
        let m = StreamModel::for_size(64 << 20);
        for bad in [
            StreamModel { size: 3 << 20, ..m },
            StreamModel {
                swiotlb: 40 << 20,
                ..m
            },
            StreamModel {
                swiotlb_chunk: 3 << 12,
                ..m
            },
            StreamModel { dma_window: 0, ..m },
            StreamModel {
                balloon: 30 << 20,
                ..m
            },
            StreamModel {
                reporting: 40 << 20,
                ..m
            },
        ] {
            let e = bad.ops().unwrap_err().to_string();
            assert!(e.starts_with("conversion stream: "), "{e}");
        }
        assert!(m.ops().is_ok());
    }
}
