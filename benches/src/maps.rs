//! The map baselines: a map from huge page to its bitmap behind a mutex,
//! a reader-writer lock or dashmap's shards, and the single-partial
//! tracker; the range helpers they share with the atomic peers.

use crate::{Tracker, SUB};
use bitvec::prelude::*;
use dashmap::DashMap;
use hugepunch::{Attribute, ByteRange, Error, Geometry};
use hugepunch_workload::Target;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// The parts of a range per 2 MiB huge page: (huge page, first, count),
/// split by the engine's [`Geometry::parts`]. The baselines know no file
/// size, so the split is that of the largest file the engine accepts (the
/// patterns' ranges are valid ones).
pub(crate) fn parts(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let geo = Geometry::new(hugepunch::MAX_SIZE, 9).expect("4 PiB of 2 MiB huge pages");
    geo.parts(ByteRange::new(offset, len))
        .map(|p| (p.huge_page, p.first as usize, p.count as usize))
}

fn punch_bits(bits: &mut BitVec, first: usize, count: usize) -> bool {
    bits[first..first + count].fill(true);
    bits.all()
}

/// A conversion to private of `offset .. offset + len` is refused over the
/// first pending subpage: `first_pending(h, first, count)` says which of
/// the part's subpages is pending first, if any.
pub(crate) fn refuse_pending(
    offset: u64,
    len: u64,
    first_pending: impl Fn(u64, usize, usize) -> Option<usize>,
) -> Result<(), Error> {
    for (h, first, count) in parts(offset, len) {
        if let Some(i) = first_pending(h, first, count) {
            return Err(Error::PendingPunch {
                offset: (h * 512 + (first + i) as u64) * SUB,
            });
        }
    }
    Ok(())
}

/// The obvious implementation: one mutex around a map of bit vectors.
#[derive(Default)]
pub struct MutexMap {
    map: Mutex<HashMap<u64, BitVec>>,
    completions: AtomicU64,
}

impl Target for MutexMap {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut map = self.map.lock().unwrap();
        for (h, first, count) in parts(o, l) {
            let bits = map.entry(h).or_insert_with(|| bitvec![0; 512]);
            if punch_bits(bits, first, count) {
                map.remove(&h);
                self.completions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut map = self.map.lock().unwrap();
        for (h, first, count) in parts(o, l) {
            if let Some(bits) = map.get_mut(&h) {
                bits[first..first + count].fill(false);
            }
        }
        Ok(())
    }
    fn convert(&self, o: u64, l: u64, to: Attribute) -> Result<(), Error> {
        if to == Attribute::Shared {
            return Ok(());
        }
        let map = self.map.lock().unwrap();
        refuse_pending(o, l, |h, f, c| map.get(&h)?[f..f + c].first_one())
    }
    /// Forgets the range's pending punches (freed in pieces: no completion).
    fn flush(&self, o: u64, l: u64) -> Result<(), Error> {
        self.populate(o, l)
    }
    fn teardown(&self) -> Result<(), Error> {
        self.map.lock().unwrap().clear();
        Ok(())
    }
}

impl Tracker for MutexMap {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

/// The same map behind an `RwLock`: conversion checks share the lock.
#[derive(Default)]
pub struct RwLockMap {
    map: RwLock<HashMap<u64, BitVec>>,
    completions: AtomicU64,
}

impl Target for RwLockMap {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut map = self.map.write().unwrap();
        for (h, first, count) in parts(o, l) {
            let bits = map.entry(h).or_insert_with(|| bitvec![0; 512]);
            if punch_bits(bits, first, count) {
                map.remove(&h);
                self.completions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut map = self.map.write().unwrap();
        for (h, first, count) in parts(o, l) {
            if let Some(bits) = map.get_mut(&h) {
                bits[first..first + count].fill(false);
            }
        }
        Ok(())
    }
    fn convert(&self, o: u64, l: u64, to: Attribute) -> Result<(), Error> {
        if to == Attribute::Shared {
            return Ok(());
        }
        let map = self.map.read().unwrap();
        refuse_pending(o, l, |h, f, c| map.get(&h)?[f..f + c].first_one())
    }
    /// Forgets the range's pending punches (freed in pieces: no completion).
    fn flush(&self, o: u64, l: u64) -> Result<(), Error> {
        self.populate(o, l)
    }
    fn teardown(&self) -> Result<(), Error> {
        self.map.write().unwrap().clear();
        Ok(())
    }
}

impl Tracker for RwLockMap {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

/// The sharded-map implementation: a `DashMap` of bit vectors.
#[derive(Default)]
pub struct DashMapTracker {
    map: DashMap<u64, BitVec>,
    completions: AtomicU64,
}

impl Target for DashMapTracker {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, first, count) in parts(o, l) {
            let full = punch_bits(
                &mut self.map.entry(h).or_insert_with(|| bitvec![0; 512]),
                first,
                count,
            );
            if full && self.map.remove_if(&h, |_, b| b.all()).is_some() {
                self.completions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        for (h, first, count) in parts(o, l) {
            if let Some(mut bits) = self.map.get_mut(&h) {
                bits[first..first + count].fill(false);
            }
        }
        Ok(())
    }
    fn convert(&self, o: u64, l: u64, to: Attribute) -> Result<(), Error> {
        if to == Attribute::Shared {
            return Ok(());
        }
        refuse_pending(o, l, |h, f, c| self.map.get(&h)?[f..f + c].first_one())
    }
    /// Forgets the range's pending punches (freed in pieces: no completion).
    fn flush(&self, o: u64, l: u64) -> Result<(), Error> {
        self.populate(o, l)
    }
    fn teardown(&self) -> Result<(), Error> {
        self.map.clear();
        Ok(())
    }
}

impl Tracker for DashMapTracker {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

/// QEMU's and Cloud Hypervisor's balloon: one partially punched huge page
/// is tracked; touching another drops it, and what it tracked is never
/// freed.
#[derive(Default)]
pub struct SinglePartial {
    tracked: Mutex<Option<(u64, BitVec)>>,
    completions: AtomicU64,
}

impl Target for SinglePartial {
    type Error = Error;
    fn punch(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut tracked = self.tracked.lock().unwrap();
        for (h, first, count) in parts(o, l) {
            if tracked.as_ref().is_none_or(|(t, _)| *t != h) {
                *tracked = Some((h, bitvec![0; 512]));
            }
            let (_, bits) = tracked.as_mut().expect("just set");
            if punch_bits(bits, first, count) {
                *tracked = None;
                self.completions.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
    fn populate(&self, o: u64, l: u64) -> Result<(), Error> {
        let mut tracked = self.tracked.lock().unwrap();
        // A re-used subpage of the tracked huge page is no longer
        // discarded.
        for (h, first, count) in parts(o, l) {
            if let Some((t, bits)) = tracked.as_mut() {
                if *t == h {
                    bits[first..first + count].fill(false);
                }
            }
        }
        Ok(())
    }
    /// The balloon does not look at conversions.
    fn convert(&self, _: u64, _: u64, _: Attribute) -> Result<(), Error> {
        Ok(())
    }
    fn flush(&self, _: u64, _: u64) -> Result<(), Error> {
        Ok(())
    }
    fn teardown(&self) -> Result<(), Error> {
        *self.tracked.lock().unwrap() = None;
        Ok(())
    }
}

impl Tracker for SinglePartial {
    fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_per_2mib_huge_page() {
        let split = |o, l| parts(o, l).collect::<Vec<_>>();
        assert_eq!(split(511 * SUB, 3 * SUB), vec![(0, 511, 1), (1, 0, 2)]);
        assert_eq!(split(8 << 20, 4 << 20), vec![(4, 0, 512), (5, 0, 512)]);
        assert_eq!(split(SUB, SUB), vec![(0, 1, 1)]);
    }
}
