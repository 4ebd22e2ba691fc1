//! The simulated kernel: the host every strategy acts on.
//!
//! It keeps, sparsely (one entry per huge page that was touched, none for
//! the rest, which are in the file's initial state):
//!
//! * **memory**: each huge page is `Absent`, backed by one huge folio, or
//!   split into 4 KiB pages; every allocation gets an id that is never
//!   reused, and every subpage has content (a token; zero unless written),
//!   so a freed-then-written page or a lost write is visible;
//! * **attributes**: private or shared per subpage, as runs;
//! * **the MMU** ([`crate::mmu`]): the guest's mappings and KVM's
//!   fault-retry protocol;
//! * **the direct map**: per 2 MiB entry, intact or split. An entry splits
//!   when memory inside it changes ownership at 4 KiB granularity: a
//!   conversion covering part of the entry that changes a subpage's
//!   attribute (SEV-SNP's RMP and TDX's PAMT then need 4 KiB entries), or
//!   a 4 KiB free of a private subpage. It is restored only by the free of
//!   the whole aligned huge page (an order-`order` free).
//!
//! Every host callback checks what a correct kernel must never see, and
//! records a [`Violation`] instead of panicking: a free or a zero of memory
//! the guest still maps (an invalidation was missing), a double allocation,
//! a free of absent memory, an invalidation whose hint names another huge
//! page, an unbalanced `invalidate_end`. The guest paths record an access
//! through a mapping to memory that was freed since.
//!
//! Locks (callbacks may block, so plain mutexes serve): the MMU lock, then
//! one huge page's entry, then the attribute map, the direct map and the
//! counters; no path takes them in another order, and none is held while
//! calling a strategy.
//!
//! # Where things are
//!
//! This file holds the host, its counters, the attribute and MMU queries
//! the guest makes, and the [`Host`] callbacks, which check the MMU and
//! hand each huge page's part to the submodules: `memory.rs` (the backing
//! and content of each huge page, the callbacks' work on one part, the
//! memory queries and figures), `direct_map.rs` (splits and restores of
//! the direct map) and `violations.rs` (what a correct kernel must never
//! see, and their record).

mod direct_map;
mod memory;
mod violations;

pub use memory::{HugePageBacking, MemoryFigures};
pub use violations::Violation;

use crate::geometry::subpage_span;
use crate::mmu::Mmu;
use crate::rangemap::RangeMap;
use dashmap::DashMap;
use hugepunch::{Attribute, ByteRange, Geometry, Hint, Host, HostError, SUBPAGE_SIZE};
use memory::Slot;
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use violations::Violations;

/// Lock, ignoring poisoning (a test that panicked in a callback must not
/// hide the state it left).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the host saw, counted by the host itself (independently of the
/// strategy's own statistics).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostCounters {
    /// `allocate` calls.
    pub allocate_calls: u64,
    /// `free` calls (failed ones included).
    pub free_calls: u64,
    /// `free` calls made to fail.
    pub free_failures: u64,
    /// `zero` calls.
    pub zero_calls: u64,
    /// `invalidate_begin` calls.
    pub invalidations: u64,
    /// `set_attributes` calls.
    pub conversions: u64,
    /// Invalidations the host made on its own conversion-to-shared path.
    pub conversion_zaps: u64,
    /// Bytes allocated by `allocate`.
    pub bytes_allocated: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Frees of whole huge pages.
    pub huge_frees: u64,
    /// Subpages freed one by one.
    pub small_freed_subpages: u64,
    /// Huge folios split into 4 KiB pages.
    pub folio_splits: u64,
    /// Direct-map entries split.
    pub direct_map_splits: u64,
    /// Direct-map entries restored by a whole huge page free.
    pub direct_map_restores: u64,
    /// Guest faults.
    pub faults: u64,
    /// Faults that retried (the sequence moved or an invalidation covered them).
    pub fault_retries: u64,
}

/// The simulated kernel host.
pub struct KernelHost {
    geo: Geometry,
    populated: bool,
    memory: DashMap<u64, Slot>,
    /// Huge pages of the initial population that were freed and have no
    /// entry in `memory`.
    freed_initial: Mutex<RangeMap<bool>>,
    /// Per subpage.
    attrs: Mutex<RangeMap<Attribute>>,
    /// Content of shared memory, which lives outside the file (seed's model).
    shared: DashMap<u64, u64>,
    mmu: Mutex<Mmu>,
    /// Split direct-map entries.
    direct_map_split: Mutex<BTreeSet<u64>>,
    /// Huge pages whose folio was ever split.
    ever_split: Mutex<RangeMap<bool>>,
    counters: Mutex<HostCounters>,
    resident: Mutex<u64>,
    violations: Mutex<Violations>,
    next_id: Mutex<u64>,
    fail_frees: Mutex<u64>,
}

impl KernelHost {
    /// A host for a file of geometry `geo`, every huge page populated with
    /// a huge folio or absent, every subpage of attribute `start`.
    pub fn new(geo: Geometry, populated: bool, start: Attribute) -> Self {
        KernelHost {
            geo,
            populated,
            memory: DashMap::new(),
            freed_initial: Mutex::new(RangeMap::new(false)),
            attrs: Mutex::new(RangeMap::new(start)),
            shared: DashMap::new(),
            mmu: Mutex::new(Mmu::default()),
            direct_map_split: Mutex::new(BTreeSet::new()),
            ever_split: Mutex::new(RangeMap::new(false)),
            counters: Mutex::new(HostCounters::default()),
            resident: Mutex::new(if populated { geo.size() } else { 0 }),
            violations: Mutex::new(Violations::default()),
            next_id: Mutex::new(1),
            fail_frees: Mutex::new(0),
        }
    }

    /// The file's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Make the next `n` frees fail (as a host under memory pressure might).
    pub fn fail_next_frees(&self, n: u64) {
        *lock(&self.fail_frees) = n;
    }

    /// What the host counted.
    pub fn counters(&self) -> HostCounters {
        lock(&self.counters).clone()
    }

    fn count(&self, f: impl FnOnce(&mut HostCounters)) {
        f(&mut lock(&self.counters));
    }

    /// The attribute of subpage `s`.
    pub fn attribute(&self, s: u64) -> Attribute {
        lock(&self.attrs).get(s)
    }

    /// Is every subpage of `[s0, s1)` of attribute `a`?
    pub fn all_of(&self, s0: u64, s1: u64, a: Attribute) -> bool {
        lock(&self.attrs).all(s0, s1, a)
    }

    /// The MMU's sequence number, as a fault snapshots it.
    pub fn mmu_seq(&self) -> u64 {
        lock(&self.mmu).seq()
    }

    /// A guest access through the MMU: `None` if subpage `s` is not mapped
    /// (the guest faults); otherwise the value read or written, or `Err`
    /// if the mapping led to freed memory (recorded as a violation).
    pub fn access_mapped(&self, s: u64, write: Option<u64>) -> Option<Result<u64, Violation>> {
        let mmu = lock(&self.mmu);
        let phys = mmu.translate(&self.geo, s)?;
        if self.phys_of(s) != Some(phys) {
            let v = Violation::AccessAfterFree {
                offset: s * SUBPAGE_SIZE,
            };
            self.record(v);
            return Some(Err(v));
        }
        Some(Ok(match write {
            Some(v) => self.write(s, v),
            None => self.content(s),
        }))
    }

    /// The second half of a fault: having snapshotted `seq` and populated
    /// subpage `s`, look it up and map it, huge when `max_order` allows it,
    /// the folio is whole and every subpage of the huge page is private.
    /// Returns `false` when the fault must retry.
    pub fn fault_install(&self, seq: u64, s: u64, max_order: u8) -> bool {
        self.count(|c| c.faults += 1);
        let (h, _) = self.split_sub(s);
        let Some(phys) = self.phys_of(s) else {
            self.count(|c| c.fault_retries += 1);
            return false;
        };
        let full = self.geo.subpages_per_huge_page() as u64;
        let folio = self.huge_folio(h);
        let huge = max_order == self.geo.order()
            && folio == Some(phys.alloc)
            && self.all_of(h * full, (h + 1) * full, Attribute::Private);
        let mut mmu = lock(&self.mmu);
        let (m0, m1) = if huge {
            (h * full, (h + 1) * full)
        } else {
            (s, s + 1)
        };
        if mmu.must_retry(seq, m0, m1) {
            drop(mmu);
            self.count(|c| c.fault_retries += 1);
            return false;
        }
        if huge {
            mmu.install_huge(h, phys.alloc);
        } else {
            mmu.install_small(&self.geo, s, phys);
        }
        true
    }

    /// The first subpage of `[s0, s1)` the guest maps, if any.
    pub fn first_mapped(&self, s0: u64, s1: u64) -> Option<u64> {
        lock(&self.mmu).first_mapped(&self.geo, s0, s1)
    }

    /// Is huge page `h` mapped huge?
    pub fn mapped_huge(&self, h: u64) -> bool {
        lock(&self.mmu).is_mapped_huge(h)
    }

    /// Mappings installed so far: (huge, 4 KiB).
    pub fn mappings_installed(&self) -> (u64, u64) {
        let m = lock(&self.mmu);
        (m.installed_huge, m.installed_small)
    }
}

impl Host for KernelHost {
    fn is_shared(&self, range: ByteRange) -> bool {
        let (s0, s1) = subpage_span(range);
        self.all_of(s0, s1, Attribute::Shared)
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        let (s0, s1) = subpage_span(range);
        let split: Vec<u64> = {
            let mut attrs = lock(&self.attrs);
            let partial = self.entries_split_by_conversion(&attrs, s0, s1, to);
            attrs.set(s0, s1, to);
            partial
        };
        self.split_direct_map(split);
        if to == Attribute::Shared {
            // The host zaps private mappings on its own conversion path,
            // through the same protocol (a fault in flight retries).
            let mut mmu = lock(&self.mmu);
            mmu.begin(&self.geo, s0, s1);
            mmu.end(s0, s1);
            drop(mmu);
            self.count(|c| c.conversion_zaps += 1);
        }
        self.count(|c| c.conversions += 1);
    }

    fn invalidate_begin(&self, range: ByteRange, hint: Hint) {
        let h = range.offset / self.geo.huge_page_size();
        if hint.order != self.geo.order()
            || hint.huge_page != h
            || range.len == 0
            || range.end() > self.geo.huge_page_range(h).end()
        {
            self.record(Violation::BadHint {
                offset: range.offset,
            });
        }
        let (s0, s1) = subpage_span(range);
        lock(&self.mmu).begin(&self.geo, s0, s1);
        self.count(|c| c.invalidations += 1);
    }

    fn invalidate_end(&self, range: ByteRange) {
        let (s0, s1) = subpage_span(range);
        if !lock(&self.mmu).end(s0, s1) {
            self.record(Violation::UnbalancedInvalidation {
                offset: range.offset,
            });
        }
    }

    fn allocate(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        self.count(|c| c.allocate_calls += 1);
        let mut bytes = 0;
        for part in self.geo.parts(range) {
            bytes += self.allocate_part(part, order);
        }
        *lock(&self.resident) += bytes;
        self.count(|c| c.bytes_allocated += bytes);
        Ok(())
    }

    fn free(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        self.count(|c| c.free_calls += 1);
        {
            let mut fail = lock(&self.fail_frees);
            if *fail > 0 {
                *fail -= 1;
                drop(fail);
                self.count(|c| c.free_failures += 1);
                return Err(HostError { errno: 12 });
            }
        }
        let (s0, s1) = subpage_span(range);
        let mmu = lock(&self.mmu);
        if let Some(s) = mmu.first_mapped(&self.geo, s0, s1) {
            self.record(Violation::FreedWhileMapped {
                offset: s * SUBPAGE_SIZE,
            });
        }
        let mut freed_bytes = 0;
        for part in self.geo.parts(range) {
            freed_bytes += self.free_part(part, order);
        }
        drop(mmu);
        *lock(&self.resident) -= freed_bytes;
        self.count(|c| c.bytes_freed += freed_bytes);
        Ok(())
    }

    fn zero(&self, range: ByteRange) {
        self.count(|c| c.zero_calls += 1);
        let (s0, s1) = subpage_span(range);
        let mmu = lock(&self.mmu);
        if let Some(s) = mmu.first_mapped(&self.geo, s0, s1) {
            self.record(Violation::ZeroedWhileMapped {
                offset: s * SUBPAGE_SIZE,
            });
        }
        for part in self.geo.parts(range) {
            self.zero_part(part);
        }
        drop(mmu);
    }
}
