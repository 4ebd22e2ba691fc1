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

use crate::geometry::{subpage_span, Geometry};
use crate::mmu::{Mmu, Phys};
use crate::rangemap::RangeMap;
use dashmap::DashMap;
use hugepunch::{Attribute, ByteRange, Hint, Host, HostError, SUBPAGE_SIZE};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

/// Allocation ids of the folios a populated file starts with: this bit
/// plus the huge page index (fresh ids count up from 1).
const INITIAL: u64 = 1 << 63;

/// Lock, ignoring poisoning (a test that panicked in a callback must not
/// hide the state it left).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
struct Slot {
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

/// Something a correct kernel must never see, with the invariant of
/// CONTRACT.md §4 it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// Memory was freed while the guest still mapped it (invariant 4).
    FreedWhileMapped {
        /// First such subpage.
        offset: u64,
    },
    /// Memory was zeroed while the guest still mapped it (invariant 4).
    ZeroedWhileMapped {
        /// First such subpage.
        offset: u64,
    },
    /// The guest accessed, through a mapping, memory freed since the
    /// mapping was made (invariant 4: an invalidation was skipped, or a
    /// fault did not retry).
    AccessAfterFree {
        /// The subpage.
        offset: u64,
    },
    /// A guest or VMM read found other content than the last write after
    /// the last punch (invariant 4).
    LostWrite {
        /// The subpage.
        offset: u64,
        /// What was written.
        expected: u64,
        /// What was read.
        found: u64,
    },
    /// A punched subpage read back nonzero content (invariant 5).
    StaleRead {
        /// The subpage.
        offset: u64,
        /// What was read.
        found: u64,
    },
    /// A private subpage of a punched range was still mapped when the
    /// punch returned (invariant 2).
    PrivateMappingSurvivedPunch {
        /// The subpage.
        offset: u64,
    },
    /// An allocation of memory that is already allocated.
    DoubleAllocation {
        /// First such subpage.
        offset: u64,
    },
    /// A free or zero of memory that is not allocated (a double free).
    FreeOfAbsent {
        /// First such subpage.
        offset: u64,
    },
    /// A huge allocation or free that is not of one whole huge page, or an
    /// order that is neither 0 nor the file's.
    BadOrder {
        /// Start of the range.
        offset: u64,
        /// The order passed.
        order: u8,
    },
    /// An invalidation whose hint is not the huge page it covers.
    BadHint {
        /// Start of the range.
        offset: u64,
    },
    /// An `invalidate_end` without its `invalidate_begin`.
    UnbalancedInvalidation {
        /// Start of the range.
        offset: u64,
    },
    /// After teardown, memory is still allocated (invariant 6).
    Leak {
        /// Bytes still allocated.
        bytes: u64,
    },
}

impl Violation {
    /// A short name of the kind of violation.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::FreedWhileMapped { .. } => "freed_while_mapped",
            Violation::ZeroedWhileMapped { .. } => "zeroed_while_mapped",
            Violation::AccessAfterFree { .. } => "access_after_free",
            Violation::LostWrite { .. } => "lost_write",
            Violation::StaleRead { .. } => "stale_read",
            Violation::PrivateMappingSurvivedPunch { .. } => "private_mapping_survived_punch",
            Violation::DoubleAllocation { .. } => "double_allocation",
            Violation::FreeOfAbsent { .. } => "free_of_absent",
            Violation::BadOrder { .. } => "bad_order",
            Violation::BadHint { .. } => "bad_hint",
            Violation::UnbalancedInvalidation { .. } => "unbalanced_invalidation",
            Violation::Leak { .. } => "leak",
        }
    }

    /// The invariant of CONTRACT.md §4 it breaks (0: a host-protocol error).
    pub fn invariant(&self) -> u8 {
        match self {
            Violation::PrivateMappingSurvivedPunch { .. } => 2,
            Violation::FreedWhileMapped { .. }
            | Violation::ZeroedWhileMapped { .. }
            | Violation::AccessAfterFree { .. }
            | Violation::LostWrite { .. } => 4,
            Violation::StaleRead { .. } => 5,
            Violation::Leak { .. } => 6,
            _ => 0,
        }
    }
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

const KEPT_VIOLATIONS: usize = 256;

#[derive(Default)]
struct Violations {
    first: Vec<Violation>,
    by_kind: BTreeMap<&'static str, u64>,
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
            resident: Mutex::new(if populated { geo.size } else { 0 }),
            violations: Mutex::new(Violations::default()),
            next_id: Mutex::new(1),
            fail_frees: Mutex::new(0),
        }
    }

    /// The file's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Record a violation.
    pub fn record(&self, v: Violation) {
        let mut vs = lock(&self.violations);
        *vs.by_kind.entry(v.kind()).or_default() += 1;
        if vs.first.len() < KEPT_VIOLATIONS {
            vs.first.push(v);
        }
    }

    /// The first violations recorded (at most 256).
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.violations).first.clone()
    }

    /// Violations recorded, by kind.
    pub fn violation_counts(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.violations).by_kind.clone()
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

    fn split_sub(&self, s: u64) -> (u64, u32) {
        let h = s >> self.geo.order;
        (h, (s - (h << self.geo.order)) as u32)
    }

    // ---- queries used by the guest, the strategies and the reports -------

    /// How huge page `h` is backed.
    pub fn backing(&self, h: u64) -> HugePageBacking {
        let full = self.geo.full();
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

    /// The attribute of subpage `s`.
    pub fn attribute(&self, s: u64) -> Attribute {
        lock(&self.attrs).get(s)
    }

    /// Is every subpage of `[s0, s1)` of attribute `a`?
    pub fn all_of(&self, s0: u64, s1: u64, a: Attribute) -> bool {
        lock(&self.attrs).all(s0, s1, a)
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
        let (h, sub) = self.split_sub(s);
        Some(Ok(match write {
            Some(v) => self.with_slot(h, |slot| {
                slot.content.insert(sub, v);
                v
            }),
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
        let full = self.geo.full() as u64;
        let folio = self.peek(h, |slot| match slot.map(|s| &s.backing) {
            Some(Backing::Huge { folio }) => Some(*folio),
            _ => None,
        });
        let huge = max_order == self.geo.order
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

    /// Is direct-map entry `r` intact?
    pub fn direct_map_intact(&self, r: u64) -> bool {
        !lock(&self.direct_map_split).contains(&r)
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

    fn split_direct_map(&self, regions: impl IntoIterator<Item = u64>) {
        let mut dm = lock(&self.direct_map_split);
        let mut n = 0;
        for r in regions {
            n += dm.insert(r) as u64;
        }
        drop(dm);
        if n > 0 {
            self.count(|c| c.direct_map_splits += n);
        }
    }
}

impl Host for KernelHost {
    fn is_shared(&self, range: ByteRange) -> bool {
        let (s0, s1) = subpage_span(range);
        self.all_of(s0, s1, Attribute::Shared)
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        let (s0, s1) = subpage_span(range);
        let rs = self.geo.region_subpages();
        let (r0, r1) = (s0 / rs, (s1 - 1) / rs);
        let split: Vec<u64> = {
            let mut attrs = lock(&self.attrs);
            let mut partial: Vec<u64> = Vec::new();
            for r in [r0, r1] {
                let (a, b) = (r * rs, (r + 1) * rs);
                let covered = s0 <= a && s1 >= b;
                if !covered && !partial.contains(&r) && !attrs.all(s0.max(a), s1.min(b), to) {
                    partial.push(r);
                }
            }
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
        if hint.order != self.geo.order
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
            let h = part.huge_page;
            let offset = self.geo.part_range(part).offset;
            if order == self.geo.order {
                if !self.geo.is_whole(part) {
                    self.record(Violation::BadOrder { offset, order });
                    continue;
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
                let words = (self.geo.full() as usize).div_ceil(64);
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
        let full = self.geo.full();
        let words = (full as usize).div_ceil(64);
        let mut freed_bytes = 0;
        for part in self.geo.parts(range) {
            let h = part.huge_page;
            let offset = self.geo.part_range(part).offset;
            if order == self.geo.order {
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
                    continue;
                }
                freed_bytes += self.geo.huge_page_size();
                // The whole aligned huge page is free: its direct-map
                // entries can be restored.
                let rs = self.geo.region_size();
                let (r0, r1) = (offset / rs, (offset + self.geo.huge_page_size()) / rs);
                let mut dm = lock(&self.direct_map_split);
                let restored: Vec<u64> = dm.range(r0..r1).copied().collect();
                for r in &restored {
                    dm.remove(r);
                }
                drop(dm);
                self.count(|c| {
                    c.huge_frees += 1;
                    c.direct_map_restores += restored.len() as u64;
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
                let base = h << self.geo.order;
                let rs = self.geo.region_subpages();
                let private: Vec<u64> = {
                    let attrs = lock(&self.attrs);
                    freed
                        .iter()
                        .map(|&sub| base + sub as u64)
                        .filter(|&s| attrs.get(s) == Attribute::Private)
                        .map(|s| s / rs)
                        .collect()
                };
                self.split_direct_map(private);
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
                    self.geo.part_range(part).offset + ((sub - part.first) as u64) * SUBPAGE_SIZE;
                self.record(Violation::FreeOfAbsent { offset });
            }
        }
        drop(mmu);
    }
}
