//! [`LinuxHost`]: the engine's [`Host`] over a real file descriptor — a
//! memfd (shmem, or hugetlbfs / THP shmem where the host already offers
//! them), a KVM guest_memfd, a file in a directory the user names (a tmpfs
//! mounted `huge=`, hugetlbfs, or any other filesystem, as QEMU's
//! `memory-backend-file,mem-path=` makes one), or a file on a private
//! `huge=always` tmpfs made for the run ([`Backend::Thp`]).
//!
//! # What each callback does
//!
//! | callback | here | blocks? |
//! |---|---|---|
//! | `free(range, order)` | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` on exactly `range`; `EINTR` retried; any other errno returned as [`HostError`] | yes (a syscall) |
//! | `allocate(range, order)` | `fallocate(KEEP_SIZE)` on `range`; for guest_memfd then one read per 4 KiB through the mapping (below) | yes |
//! | `zero(range)` | writes zeros through the backend's own shared mapping: the memory is resident (a pending punch still holds it), so nothing is allocated and a huge folio stays whole | no (page faults at most) |
//! | `is_shared(range)` | the backend's own attribute bitmap, one bit a subpage, changed only by `set_attributes` | no |
//! | `set_attributes(range, to)` | updates that bitmap | no |
//! | `invalidate_begin/end` | counted, nothing else: see below | no |
//!
//! No callback re-enters the engine; none panics except on a range outside
//! the file (an engine bug the engine's validation rules out).
//!
//! # Invalidation
//!
//! The kernel invalidates inside `fallocate(PUNCH_HOLE)` itself, exactly at
//! the moment memory is freed: for guest_memfd, `kvm_gmem_punch_hole` runs
//! `kvm_gmem_invalidate_begin/end` (zapping KVM's MMU for every memslot
//! bound to the range) under the file's invalidate lock; for both
//! backends, truncating the page cache unmaps the range from every user
//! mapping first. So the engine's invalidation around a free (a
//! completion, a 4 KiB free, teardown) is done by the free itself, and
//! doing it again here would be a second zap of the same range.
//!
//! The other invalidation — the *immediate* one of a deferred partial punch
//! of possibly-private memory, which frees nothing — has no kernel
//! counterpart that a VMM can call without freeing: the kernel zaps private
//! mappings on its own conversion path (`KVM_SET_MEMORY_ATTRIBUTES`), and
//! on the kernels this was built on a type-0 VM has no private memory at all
//! (`KVM_CAP_MEMORY_ATTRIBUTES` is 0), so no private mapping of the range
//! can exist. The backend therefore counts the begin/end pairs (and checks
//! they pair up, see [`LinuxHost::counts`]); a VMM with private memory wires
//! its own zap in a wrapping host.
//!
//! # guest_memfd allocations are faulted in
//!
//! guest_memfd's `fallocate` allocates folios without clearing them: they
//! are cleared and marked up to date at their first fault. `mincore`, the
//! only residency measure guest_memfd has (its `st_blocks` is always 0, it
//! has no pread or SEEK_HOLE), reports only up-to-date folios, so memory
//! that is allocated and never touched would be invisible. The backend's
//! `allocate` therefore reads one byte of each 4 KiB page through its
//! mapping right after the `fallocate` — the fault the guest would take
//! next anyway — so that what the file holds is what `mincore` sees
//! ([`Counts::faulted_pages`]).
//!
//! Punched subpages are not unmapped from the backend's own mapping: the
//! VMM reads through [`HugePunch::is_punched`](hugepunch::HugePunch::is_punched)
//! (CONTRACT.md "Queries for the VMM's own accesses").

mod counters;
mod open;
mod probe;

pub use counters::Counts;
pub use open::MemfdOptions;
pub use probe::{guest_memfd_unavailable, memfd_huge_backing, Backend, HugeBacking};

use crate::attributes::SharedBits;
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, Mapping, SizedFile};
use counters::{add, get, Counters};
use hugepunch::{Attribute, ByteRange, Hint, Host, HostError, SUBPAGE_SIZE};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// The 2 MiB huge page the backend reasons about (order 9).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Why a host could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// Not `memfd`, `guest-memfd`, `thp` or `file:DIR`.
    #[error("unknown backend {0:?} (memfd, guest-memfd, thp, or file with a directory)")]
    UnknownBackend(String),
    /// `file` without a directory.
    #[error("the file backend needs a directory: file:DIR (the tool: --backend file --path DIR)")]
    FileNeedsPath,
    /// The size is not a positive multiple of the huge page size.
    #[error(
        "size {size:#x} must be a positive multiple of the huge page size ({huge_page_size:#x})"
    )]
    BadSize {
        /// The size asked for.
        size: u64,
        /// The file's huge page size.
        huge_page_size: u64,
    },
    /// The directory of a file backend could not take the file.
    #[error("{dir}: {step} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    File {
        /// The directory.
        dir: std::path::PathBuf,
        /// What was being done.
        step: &'static str,
        /// The errno.
        errno: i32,
    },
    /// The THP backend could not mount its tmpfs; the message says why and
    /// what to run instead.
    #[error("cannot mount a private huge=always tmpfs: {step} failed: {}; {advice}", std::io::Error::from_raw_os_error(*errno))]
    CannotMount {
        /// The step that failed.
        step: &'static str,
        /// The errno.
        errno: i32,
        /// What to run instead.
        advice: &'static str,
    },
    /// A syscall failed.
    #[error("{step} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Syscall {
        /// What was being done.
        step: &'static str,
        /// The errno.
        errno: i32,
    },
    /// guest_memfd is not usable here; the reason says why.
    #[error("guest_memfd unavailable: {0}")]
    GuestMemfdUnavailable(String),
}

/// How the file was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileInfo {
    /// Backend kind.
    pub backend: Backend,
    /// Size in bytes.
    pub size: u64,
    /// Huge page backing.
    pub huge_backing: HugeBacking,
    /// guest_memfd flags used (0 for memfd).
    pub guest_memfd_flags: u64,
    /// Whether a KVM memslot is bound to the guest_memfd.
    pub memslot: bool,
    /// The huge page size the file's memory comes in (and the engine's
    /// geometry): 2 MiB, or what hugetlbfs reports.
    pub huge_page_size: u64,
}

/// The engine's host over a real file: see the module documentation.
pub struct LinuxHost {
    // Field order is drop order: the VM goes first, deleting its memslot
    // (which holds its own `Arc` of the mapping, so no drop order could
    // unmap the memory under it), then the mapping, then the file.
    kvm: Option<sys::Kvm>,
    map: Arc<Mapping>,
    file: SizedFile,
    info: FileInfo,
    /// One bit per subpage, set = shared.
    shared: SharedBits,
    /// One bit per 2 MiB huge page: broken by a partial free.
    split: Box<[AtomicU64]>,
    counters: Counters,
}

impl LinuxHost {
    fn build(file: SizedFile, kvm: Option<sys::Kvm>, info: FileInfo) -> Result<Self, SetupError> {
        let map = Mapping::of(&file).map_err(|errno| SetupError::Syscall {
            step: "mmap",
            errno,
        })?;
        let map = Arc::new(map);
        let subpages = info.size / SUBPAGE_SIZE;
        let mut host = LinuxHost {
            kvm,
            map,
            file,
            shared: SharedBits::new(subpages),
            split: (0..(info.size / info.huge_page_size).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            counters: Counters::default(),
            info,
        };
        if let Some(kvm) = &mut host.kvm {
            host.info.memslot = kvm.bind_memslot(&host.file, &host.map).is_ok();
        }
        Ok(host)
    }

    /// The VM a guest_memfd belongs to (`None` for the other backends): a
    /// VMM adds its vCPUs and other memslots to it.
    pub fn kvm(&self) -> Option<&sys::Kvm> {
        self.kvm.as_ref()
    }

    /// The backend's own shared mapping of the whole file (2 MiB aligned):
    /// what a VMM hands KVM as an ordinary memslot's `userspace_addr`.
    pub fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    /// How the file was made.
    pub fn info(&self) -> &FileInfo {
        &self.info
    }

    /// File size.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The huge page size of the file's memory (the engine's geometry).
    pub fn huge_page_size(&self) -> u64 {
        self.info.huge_page_size
    }

    /// The engine configuration for this file: its size and its huge page
    /// order.
    pub fn config(&self) -> hugepunch::Config {
        hugepunch::Config::new(self.info.size)
            .order((self.info.huge_page_size / SUBPAGE_SIZE).trailing_zeros() as u8)
    }

    /// `st_blocks * 512` of the file (`fstat`), whatever the backend (always
    /// 0 for guest_memfd).
    pub fn allocated_bytes(&self) -> Result<u64, i32> {
        sys::allocated_bytes(&self.file)
    }

    /// Allocate the whole file (the engine's default "populated" start),
    /// not counted in [`counts`](Self::counts), then read one byte of each
    /// 4 KiB page through the backend's mapping: the whole file ends up
    /// mapped, as a VMM maps guest memory, and guest_memfd's folios up to
    /// date (see the module documentation). With THP in `advise` mode each
    /// huge page is first touched through the `MADV_HUGEPAGE` mapping,
    /// since a fallocate allocation takes no advice.
    pub fn populate_all(&self) -> Result<(), HostError> {
        if matches!(&self.info.huge_backing, HugeBacking::Thp(d) if d.contains("advise")) {
            let hp = self.info.huge_page_size;
            for h in 0..self.info.size / hp {
                self.map.zero(ByteRange::new(h * hp, SUBPAGE_SIZE));
            }
        }
        sys::allocate(&self.file, 0, self.info.size).map_err(|errno| HostError { errno })?;
        self.map.touch(ByteRange::new(0, self.info.size));
        Ok(())
    }

    /// Allocate the whole file with one `fallocate`, not counted in
    /// [`counts`](Self::counts), without touching it through the backend's
    /// mapping: for a guest that faults its memory in itself (a guest_memfd
    /// page a vCPU writes is cleared and marked up to date by KVM). Memory
    /// the VMM never maps costs nothing to unmap when it is freed.
    pub fn allocate_all(&self) -> Result<(), HostError> {
        sys::allocate(&self.file, 0, self.info.size).map_err(|errno| HostError { errno })
    }

    /// guest_memfd: fault in what `fallocate` just allocated (see the module
    /// documentation).
    fn fault_in(&self, range: ByteRange) {
        if self.info.backend == Backend::GuestMemfd {
            let t = Instant::now();
            self.map.touch(range);
            add(&self.counters.fault_nanos, t.elapsed().as_nanos() as u64);
            add(&self.counters.faulted_pages, range.subpages());
        }
    }

    /// Mark every subpage shared (or private) in the backend's tracking.
    pub fn set_all(&self, to: Attribute) {
        self.shared.set_all(to);
    }

    /// What the backend did so far.
    pub fn counts(&self) -> Counts {
        let split = self
            .split
            .iter()
            // ORDERING: Relaxed: a statistic, read at quiescent points.
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum();
        self.counters.snapshot(split)
    }

    /// Invalidations begun and not yet ended (0 at quiescent points): the
    /// two counters' difference, so that a pair costs the punch that makes
    /// it two atomic adds, not four.
    pub fn invalidations_open(&self) -> i64 {
        get(&self.counters.invalidations_begun) as i64
            - get(&self.counters.invalidations_ended) as i64
    }

    /// Bytes the file really holds: `st_blocks * 512` for memfd, resident
    /// pages by `mincore` over the mapping for guest_memfd (whose
    /// `st_blocks` is always 0).
    pub fn resident_bytes(&self) -> Result<u64, i32> {
        match self.info.backend {
            Backend::GuestMemfd => self.resident_bytes_in(ByteRange::new(0, self.info.size)),
            _ => sys::allocated_bytes(&self.file),
        }
    }

    /// Resident bytes of `range` by `mincore` (either backend).
    pub fn resident_bytes_in(&self, range: ByteRange) -> Result<u64, i32> {
        Ok(self.map.resident_pages(range)? * SUBPAGE_SIZE)
    }

    /// Read `buf.len()` bytes at `offset` without allocating anything: pread
    /// for memfd; for guest_memfd (no pread) through the mapping, and only
    /// where resident (a hole reads as zeros and is not touched).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        match self.info.backend {
            Backend::Memfd | Backend::Thp | Backend::File(_) => {
                sys::pread_exact(&self.file, buf, offset)
            }
            Backend::GuestMemfd => {
                for (i, chunk) in buf.chunks_mut(SUBPAGE_SIZE as usize).enumerate() {
                    let at = offset + i as u64 * SUBPAGE_SIZE;
                    if self.map.resident_pages(ByteRange::new(at, SUBPAGE_SIZE))? == 1 {
                        self.map.read(at, chunk);
                    } else {
                        chunk.fill(0);
                    }
                }
                Ok(())
            }
        }
    }

    /// Fill `range` with `byte` through the mapping (allocates holes).
    pub fn fill(&self, range: ByteRange, byte: u8) {
        self.map.fill(range, byte);
    }

    /// A raw `fallocate(PUNCH_HOLE | KEEP_SIZE)` with no validation, counted
    /// like any other punch: the kernel's own answer, for comparing
    /// with hugepunch's (the invalid-punch matrix).
    pub fn raw_punch(&self, offset: u64, len: u64) -> Result<(), i32> {
        self.timed_fallocate(true, offset, len, || {
            sys::punch_hole(&self.file, offset, len)
        })
    }

    fn timed_fallocate(
        &self,
        punch: bool,
        offset: u64,
        len: u64,
        f: impl FnOnce() -> Result<(), i32>,
    ) -> Result<(), i32> {
        let c = &self.counters;
        add(
            if punch {
                &c.punch_calls
            } else {
                &c.allocate_calls
            },
            1,
        );
        let t = Instant::now();
        let res = f();
        add(&c.fallocate_nanos, t.elapsed().as_nanos() as u64);
        match res {
            Ok(()) if punch => {
                add(&c.punched_bytes, len);
                self.note_split(offset, len, true);
            }
            Ok(()) => self.note_split(offset, len, false),
            Err(_) => add(&c.fallocate_errors, 1),
        }
        res
    }

    /// Track huge pages broken by partial frees: a partial punch of a huge
    /// page splits it; a whole free or allocation of it makes it whole.
    fn note_split(&self, offset: u64, len: u64, punch: bool) {
        let end = offset.saturating_add(len).min(self.info.size);
        let mut at = offset;
        while at < end {
            let hp = self.info.huge_page_size;
            let h = at / hp;
            let page_end = (h + 1) * hp;
            let whole = at == h * hp && end >= page_end;
            let bit = 1u64 << (h % 64);
            let w = &self.split[(h / 64) as usize];
            // ORDERING: Relaxed: a statistic (see `counts`).
            if whole {
                w.fetch_and(!bit, Ordering::Relaxed);
            } else if punch {
                w.fetch_or(bit, Ordering::Relaxed);
            }
            at = page_end;
        }
    }

    fn check(&self, r: ByteRange) {
        assert!(
            r.len > 0
                && r.offset.is_multiple_of(SUBPAGE_SIZE)
                && r.len.is_multiple_of(SUBPAGE_SIZE)
                && r.end() <= self.info.size,
            "the engine passed a range outside the file: {r:?}"
        );
    }
}

impl Host for LinuxHost {
    fn is_shared(&self, range: ByteRange) -> bool {
        self.check(range);
        self.shared.all_shared(range)
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        self.check(range);
        self.shared.set(range, to);
    }

    fn invalidate_begin(&self, range: ByteRange, _hint: Hint) {
        self.check(range);
        add(&self.counters.invalidations_begun, 1);
    }

    fn invalidate_end(&self, range: ByteRange) {
        self.check(range);
        add(&self.counters.invalidations_ended, 1);
    }

    fn allocate(&self, range: ByteRange, _order: u8) -> Result<(), HostError> {
        self.check(range);
        self.timed_fallocate(false, range.offset, range.len, || {
            sys::allocate(&self.file, range.offset, range.len)
        })
        .map_err(|errno| HostError { errno })?;
        self.fault_in(range);
        Ok(())
    }

    fn free(&self, range: ByteRange, _order: u8) -> Result<(), HostError> {
        self.check(range);
        self.timed_fallocate(true, range.offset, range.len, || {
            sys::punch_hole(&self.file, range.offset, range.len)
        })
        .map_err(|errno| HostError { errno })
    }

    fn zero(&self, range: ByteRange) {
        self.check(range);
        add(&self.counters.zero_calls, 1);
        add(&self.counters.zeroed_bytes, range.len);
        let t = Instant::now();
        self.map.zero(range);
        add(&self.counters.zero_nanos, t.elapsed().as_nanos() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_on_a_plain_directory_has_no_huge_pages() {
        let dir = std::env::temp_dir();
        let host = LinuxHost::file(&dir, 2 << 20).expect("a file in the temp dir");
        assert_eq!(host.huge_page_size(), HUGE_PAGE_SIZE);
        host.populate_all().unwrap();
        assert_eq!(host.resident_bytes().unwrap(), 2 << 20);
        // No name is left in the directory.
        let left = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".hugepunch-"))
            .count();
        assert_eq!(left, 0);
    }
}
