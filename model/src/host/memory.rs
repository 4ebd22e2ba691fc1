//! The memory of the file: per huge page that was touched, how it is
//! backed (absent, one huge folio, or 4 KiB pages) and what its subpages
//! hold; the host's allocations, frees and zeroes of it, one huge page's
//! part at a time; and the queries the guest, the strategies and the
//! reports make of it.
//!
//! Every allocation gets an id that is never reused, and every subpage has
//! content (a token; zero unless written), so a freed-then-written page or
//! a lost write is visible.

use super::{lock, KernelHost, Violation};
use crate::geometry::ModelGeometry;
use crate::mmu::Phys;
use hugepunch::{PagePart, SUBPAGE_SIZE};
use serde::Serialize;
use std::collections::HashMap;

/// Allocation ids of the folios a populated file starts with: this bit
/// plus the huge page index (fresh ids count up from 1).
const INITIAL: u64 = 1 << 63;

#[derive(Debug, Clone)]
enum Backing {
    Absent,
    Huge {
        folio: u64,
    },
    Split {
        /// The folio the huge page was split from (its subpages keep their
        /// identity), 0 if it was never huge.
        folio: u64,
        /// Bit set = subpage present.
        present: Vec<u64>,
        /// Subpages allocated again as 4 KiB pages: their allocation id.
        realloc: HashMap<u32, u64>,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Slot {
    backing: Backing,
    /// Nonzero content of present subpages.
    content: HashMap<u32, u64>,
}

fn bit(words: &[u64], i: u32) -> bool {
    words[(i / 64) as usize] >> (i % 64) & 1 == 1
}

fn set_bit(words: &mut [u64], i: u32, v: bool) {
    let w = &mut words[(i / 64) as usize];
    if v {
        *w |= 1 << (i % 64);
    } else {
        *w &= !(1 << (i % 64));
    }
}

impl Slot {
    fn phys(&self, sub: u32) -> Option<Phys> {
        match &self.backing {
            Backing::Absent => None,
            Backing::Huge { folio } => Some(Phys { alloc: *folio, sub }),
            Backing::Split {
                folio,
                present,
                realloc,
            } => bit(present, sub).then(|| Phys {
                alloc: realloc.get(&sub).copied().unwrap_or(*folio),
                sub,
            }),
        }
    }

    fn present_count(&self, full: u32) -> u32 {
        match &self.backing {
            Backing::Absent => 0,
            Backing::Huge { .. } => full,
            Backing::Split { present, .. } => present.iter().map(|w| w.count_ones()).sum(),
        }
    }
}

/// How a huge page is backed, as the model sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HugePageBacking {
    /// Nothing allocated (freed, or never populated).
    Absent,
    /// One huge folio.
    Huge,
    /// Split into 4 KiB pages, `present` of which are allocated.
    Split {
        /// Allocated subpages.
        present: u32,
    },
}

/// The state of the memory, summed over the file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryFigures {
    /// Huge pages in the file.
    pub huge_pages: u64,
    /// Backed by a huge folio.
    pub huge_pages_huge: u64,
    /// Split into 4 KiB pages.
    pub huge_pages_split: u64,
    /// Nothing allocated.
    pub huge_pages_absent: u64,
    /// Huge pages whose folio was split at some point of the run.
    pub huge_pages_ever_split: u64,
    /// Huge pages never split during the run (huge now, or freed whole,
    /// or never allocated): `huge_pages - huge_pages_ever_split`.
    pub huge_pages_intact: u64,
    /// 2 MiB direct-map entries covering the file.
    pub direct_map_entries: u64,
    /// Of those, not split.
    pub direct_map_intact: u64,
    /// Bytes allocated now.
    pub resident_bytes: u64,
}

impl KernelHost {
    fn fresh_id(&self) -> u64 {
        let mut id = lock(&self.next_id);
        *id += 1;
        *id
    }

    fn initial_slot(&self, h: u64) -> Slot {
        let mut freed = lock(&self.freed_initial);
        let backing = if self.populated && !freed.get(h) {
            Backing::Huge { folio: INITIAL | h }
        } else {
            Backing::Absent
        };
        freed.set(h, h + 1, false);
        Slot {
            backing,
            content: HashMap::new(),
        }
    }

    /// Run `f` on huge page `h`'s entry (made from the initial state if
    /// needed); drop the entry again once it is absent.
    fn with_slot<R>(&self, h: u64, f: impl FnOnce(&mut Slot) -> R) -> R {
        let mut entry = self.memory.entry(h).or_insert_with(|| self.initial_slot(h));
        let r = f(&mut entry);
        let absent = matches!(entry.backing, Backing::Absent);
        if absent {
            entry.content.clear();
            if self.populated {
                lock(&self.freed_initial).set(h, h + 1, true);
            }
        }
        drop(entry);
        if absent {
            self.memory
                .remove_if(&h, |_, s| matches!(s.backing, Backing::Absent));
        }
        r
    }

    /// Read huge page `h`'s entry without making one.
    fn peek<R>(&self, h: u64, f: impl FnOnce(Option<&Slot>) -> R) -> R {
        match self.memory.get(&h) {
            Some(slot) => f(Some(&slot)),
            None => {
                if self.populated && !lock(&self.freed_initial).get(h) {
                    f(Some(&Slot {
                        backing: Backing::Huge { folio: INITIAL | h },
                        content: HashMap::new(),
                    }))
                } else {
                    f(None)
                }
            }
        }
    }

    pub(super) fn split_sub(&self, s: u64) -> (u64, u32) {
        let h = s >> self.geo.order();
        (h, (s - (h << self.geo.order())) as u32)
    }

    // ---- queries used by the guest, the strategies and the reports -------

    /// How huge page `h` is backed.
    pub fn backing(&self, h: u64) -> HugePageBacking {
        let full = self.geo.subpages_per_huge_page();
        self.peek(h, |s| match s.map(|s| &s.backing) {
            None | Some(Backing::Absent) => HugePageBacking::Absent,
            Some(Backing::Huge { .. }) => HugePageBacking::Huge,
            Some(b @ Backing::Split { .. }) => HugePageBacking::Split {
                present: Slot {
                    backing: b.clone(),
                    content: HashMap::new(),
                }
                .present_count(full),
            },
        })
    }

    /// Present subpages of huge page `h` within `[first, first + count)`,
    /// as runs `(first, count)` (for a split huge page; a huge one is one
    /// run, an absent one none).
    pub fn present_runs(&self, h: u64, first: u32, count: u32) -> Vec<(u32, u32)> {
        self.peek(h, |s| {
            let mut runs: Vec<(u32, u32)> = Vec::new();
            let Some(s) = s else { return runs };
            for sub in first..first + count {
                if s.phys(sub).is_some() {
                    match runs.last_mut() {
                        Some((f, c)) if *f + *c == sub => *c += 1,
                        _ => runs.push((sub, 1)),
                    }
                }
            }
            runs
        })
    }

    /// Huge pages that have an entry (touched since the start), ascending.
    pub fn touched_huge_pages(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.memory.iter().map(|e| *e.key()).collect();
        v.sort_unstable();
        v
    }

    /// Huge pages with memory allocated now, ascending (for teardown).
    pub fn allocated_huge_pages(&self) -> Vec<u64> {
        if !self.populated {
            return self.touched_huge_pages();
        }
        let freed = lock(&self.freed_initial).clone();
        (0..self.geo.huge_pages())
            .filter(|&h| self.memory.contains_key(&h) || !freed.get(h))
            .collect()
    }

    /// The physical page backing subpage `s` now, if any.
    pub fn phys_of(&self, s: u64) -> Option<Phys> {
        let (h, sub) = self.split_sub(s);
        self.peek(h, |slot| slot.and_then(|slot| slot.phys(sub)))
    }

    /// The content of the file's memory at subpage `s` (zero if absent):
    /// what the VMM reads when it reads the file itself.
    pub fn content(&self, s: u64) -> u64 {
        let (h, sub) = self.split_sub(s);
        self.peek(h, |slot| {
            slot.and_then(|slot| slot.content.get(&sub).copied())
                .unwrap_or(0)
        })
    }

    /// Read or write shared memory (which lives outside the file).
    pub fn shared_access(&self, s: u64, write: Option<u64>) -> u64 {
        match write {
            Some(v) => {
                self.shared.insert(s, v);
                v
            }
            None => self.shared.get(&s).map_or(0, |v| *v),
        }
    }

    /// The memory summed over the file (cost: the touched huge pages).
    pub fn memory_figures(&self) -> MemoryFigures {
        let n = self.geo.huge_pages();
        let (mut huge, mut split, mut absent) = (0, 0, 0);
        let mut touched = 0;
        for e in self.memory.iter() {
            touched += 1;
            match e.backing {
                Backing::Absent => absent += 1,
                Backing::Huge { .. } => huge += 1,
                Backing::Split { .. } => split += 1,
            }
        }
        let untouched = n - touched;
        if self.populated {
            let freed = lock(&self.freed_initial).count(0, n, true);
            absent += freed;
            huge += untouched - freed;
        } else {
            absent += untouched;
        }
        let regions = self.geo.regions();
        let ever_split = lock(&self.ever_split).count(0, n, true);
        let dm_split = lock(&self.direct_map_split).len() as u64;
        let resident = *lock(&self.resident);
        MemoryFigures {
            huge_pages: n,
            huge_pages_huge: huge,
            huge_pages_split: split,
            huge_pages_absent: absent,
            huge_pages_ever_split: ever_split,
            huge_pages_intact: n - ever_split,
            direct_map_entries: regions,
            direct_map_intact: regions - dm_split,
            resident_bytes: resident,
        }
    }

    /// A rough measure of the memory the model itself holds, in bytes.
    pub fn model_bytes(&self) -> usize {
        let per_slot = std::mem::size_of::<Slot>() + 64;
        let slots: usize = self
            .memory
            .iter()
            .map(|e| {
                per_slot
                    + e.content.len() * 24
                    + match &e.backing {
                        Backing::Split {
                            present, realloc, ..
                        } => present.len() * 8 + realloc.len() * 24,
                        _ => 0,
                    }
            })
            .sum();
        slots
            + lock(&self.attrs).runs() * 48
            + lock(&self.freed_initial).runs() * 48
            + self.shared.len() * 24
            + lock(&self.direct_map_split).len() * 16
            + lock(&self.mmu).mapped_huge_pages() * 64
    }

    /// The folio backing huge page `h`, if it is one whole huge folio.
    pub(super) fn huge_folio(&self, h: u64) -> Option<u64> {
        self.peek(h, |slot| match slot.map(|s| &s.backing) {
            Some(Backing::Huge { folio }) => Some(*folio),
            _ => None,
        })
    }

    /// The guest writes `v` to subpage `s` (which it maps).
    pub(super) fn write(&self, s: u64, v: u64) -> u64 {
        let (h, sub) = self.split_sub(s);
        self.with_slot(h, |slot| {
            slot.content.insert(sub, v);
            v
        })
    }

    // ---- the host callbacks' work on one huge page's part -------------------

    /// Allocate `part` at `order` (one huge folio, or 4 KiB pages); the
    /// bytes allocated.
    pub(super) fn allocate_part(&self, part: PagePart, order: u8) -> u64 {
        let mut bytes = 0;
        let h = part.huge_page;
        let offset = self.geo.range_of(part).offset;
        if order == self.geo.order() {
            if !self.geo.is_whole(part) {
                self.record(Violation::BadOrder { offset, order });
                return 0;
            }
            let id = self.fresh_id();
            let ok = self.with_slot(h, |slot| match slot.backing {
                Backing::Absent => {
                    slot.backing = Backing::Huge { folio: id };
                    slot.content.clear();
                    true
                }
                _ => false,
            });
            if ok {
                bytes += self.geo.huge_page_size();
            } else {
                self.record(Violation::DoubleAllocation { offset });
            }
        } else if order == 0 {
            let words = (self.geo.subpages_per_huge_page() as usize).div_ceil(64);
            let mut double = None;
            let mut n = 0;
            for sub in part.first..part.first + part.count {
                let id = self.fresh_id();
                self.with_slot(h, |slot| {
                    if matches!(slot.backing, Backing::Absent) {
                        slot.backing = Backing::Split {
                            folio: 0,
                            present: vec![0; words],
                            realloc: HashMap::new(),
                        };
                    }
                    match &mut slot.backing {
                        Backing::Split {
                            present, realloc, ..
                        } if !bit(present, sub) => {
                            set_bit(present, sub, true);
                            realloc.insert(sub, id);
                            slot.content.remove(&sub);
                            n += 1;
                        }
                        _ => {
                            double.get_or_insert(sub);
                        }
                    }
                });
            }
            bytes += n * SUBPAGE_SIZE;
            if let Some(sub) = double {
                self.record(Violation::DoubleAllocation {
                    offset: offset + ((sub - part.first) as u64) * SUBPAGE_SIZE,
                });
            }
        } else {
            self.record(Violation::BadOrder { offset, order });
        }
        bytes
    }

    /// Free `part` at `order` (the caller holds the MMU lock); the bytes
    /// freed.
    pub(super) fn free_part(&self, part: PagePart, order: u8) -> u64 {
        let full = self.geo.subpages_per_huge_page();
        let words = (full as usize).div_ceil(64);
        let mut freed_bytes = 0;
        let h = part.huge_page;
        let offset = self.geo.range_of(part).offset;
        if order == self.geo.order() {
            let ok = self.geo.is_whole(part)
                && self.with_slot(h, |slot| match slot.backing {
                    Backing::Huge { .. } => {
                        slot.backing = Backing::Absent;
                        true
                    }
                    _ => false,
                });
            if !ok {
                self.record(if self.geo.is_whole(part) {
                    Violation::FreeOfAbsent { offset }
                } else {
                    Violation::BadOrder { offset, order }
                });
                return 0;
            }
            freed_bytes += self.geo.huge_page_size();
            // The whole aligned huge page is free: its direct-map
            // entries can be restored.
            let restored = self.restore_direct_map(offset);
            self.count(|c| {
                c.huge_frees += 1;
                c.direct_map_restores += restored;
            });
        } else if order == 0 {
            let mut freed: Vec<u32> = Vec::new();
            let mut absent = None;
            let mut split_folio = false;
            self.with_slot(h, |slot| {
                if let Backing::Huge { folio } = slot.backing {
                    slot.backing = Backing::Split {
                        folio,
                        present: vec![u64::MAX; words],
                        realloc: HashMap::new(),
                    };
                    if !full.is_multiple_of(64) {
                        if let Backing::Split { present, .. } = &mut slot.backing {
                            present[0] = (1u64 << full) - 1;
                        }
                    }
                    split_folio = true;
                }
                match &mut slot.backing {
                    Backing::Split {
                        present, realloc, ..
                    } => {
                        for sub in part.first..part.first + part.count {
                            if bit(present, sub) {
                                set_bit(present, sub, false);
                                realloc.remove(&sub);
                                slot.content.remove(&sub);
                                freed.push(sub);
                            } else {
                                absent.get_or_insert(sub);
                            }
                        }
                        if present.iter().all(|&w| w == 0) {
                            slot.backing = Backing::Absent;
                        }
                    }
                    _ => {
                        absent.get_or_insert(part.first);
                    }
                }
            });
            if let Some(sub) = absent {
                self.record(Violation::FreeOfAbsent {
                    offset: offset + ((sub - part.first) as u64) * SUBPAGE_SIZE,
                });
            }
            freed_bytes += freed.len() as u64 * SUBPAGE_SIZE;
            // A 4 KiB free of private memory hands it back to the host
            // at 4 KiB granularity: its direct-map entry splits.
            self.split_direct_map_by_small_free(h, &freed);
            if split_folio {
                lock(&self.ever_split).set(h, h + 1, true);
            }
            let n = freed.len() as u64;
            self.count(|c| {
                c.small_freed_subpages += n;
                c.folio_splits += split_folio as u64;
            });
        } else {
            self.record(Violation::BadOrder { offset, order });
        }
        freed_bytes
    }

    /// Zero `part` (the caller holds the MMU lock).
    pub(super) fn zero_part(&self, part: PagePart) {
        let mut absent = None;
        self.with_slot(part.huge_page, |slot| {
            for sub in part.first..part.first + part.count {
                if slot.phys(sub).is_none() {
                    absent.get_or_insert(sub);
                }
                slot.content.remove(&sub);
            }
        });
        if let Some(sub) = absent {
            let offset =
                self.geo.range_of(part).offset + ((sub - part.first) as u64) * SUBPAGE_SIZE;
            self.record(Violation::FreeOfAbsent { offset });
        }
    }
}
