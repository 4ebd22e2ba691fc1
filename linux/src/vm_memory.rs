//! A ready [`Host`] for guest memory described by rust-vmm's `vm-memory`
//! (feature `vm-memory`): a Rust VMM (Cloud Hypervisor, crosvm,
//! Firecracker) passes a file-backed region of its `GuestMemoryMmap` and
//! gets the host the engine needs, with guest physical addresses turned
//! into the engine's file offsets.
//!
//! Two layouts are served:
//!
//! * **One file** ([`GuestMemoryHost::new`]): the region is a mapping of
//!   the file whose memory is punched — a memfd, or a guest_memfd created
//!   with `GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED` (Linux
//!   6.18) and mapped by vm-memory. Un-punched subpages are zeroed through
//!   the region with vm-memory's volatile writes.
//! * **Shared memory plus a guest_memfd** ([`GuestMemoryHost::with_private_file`]),
//!   the layout of Cloud Hypervisor's confidential guests: the region maps
//!   the shared memory (a memfd) and the memslot's `guest_memfd` holds the
//!   private memory, at `private.start() + (gpa - region start)`. Punches
//!   go to the guest_memfd, as Cloud Hypervisor's `punch_holes_in_guest_memfd`
//!   does on each to-shared `KVM_HC_MAP_GPA_RANGE`. A guest_memfd that
//!   cannot be mapped cannot be written from user space, so an un-punched
//!   run is zeroed by punching it and allocating it again (both
//!   `fallocate`, `KEEP_SIZE`): the kernel hands back zeroed pages.
//!
//! The shared-state check answers from the host's own record of the
//! attributes, which [`Host::set_attributes`] keeps (the engine's
//! `convert` calls it; a VMM mirrors there what it tells KVM with
//! `KVM_SET_MEMORY_ATTRIBUTES`). Every subpage starts private, unless
//! [`GuestMemoryHost::set_all`] says otherwise. KVM invalidates its own
//! mappings of a guest_memfd when it is punched; a VMM that maps guest
//! memory elsewhere (a vhost-user backend, an IOMMU) hooks the engine's
//! invalidations with [`GuestMemoryHost::on_invalidate`].
//!
//! No `unsafe` here: the two system calls (`fallocate`) are rustix's safe
//! wrappers on the region's `File`, and guest memory is written only
//! through vm-memory's `VolatileSlice`.
//!
//! ```no_run
//! use hugepunch::{Attribute, HugePunch};
//! use hugepunch_linux::vm_memory::GuestMemoryHost;
//! use std::sync::Arc;
//! use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
//!
//! let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC)?;
//! rustix::fs::ftruncate(&fd, 64 << 20)?;
//! let file = std::fs::File::from(fd);
//! let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
//!     GuestAddress(0x1_0000_0000),
//!     64 << 20,
//!     Some(FileOffset::new(file, 0)),
//! )])?;
//! let host = Arc::new(GuestMemoryHost::for_address(&mem, GuestAddress(0x1_0000_0000))?);
//! let file = HugePunch::new(host.config(), host.clone())?;
//! // A to-shared conversion of one 4 KiB page at a guest physical address.
//! let r = host.range_of(GuestAddress(0x1_0000_3000), 4096).expect("in the region");
//! file.convert(r.offset, r.len, Attribute::Shared)?;
//! file.punch(r.offset, r.len)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg(feature = "vm-memory")]

use crate::attributes::SharedBits;
use crate::host::HUGE_PAGE_SIZE;
use crate::sync::{AtomicU64, Ordering};
use crate::sys;
use hugepunch::{Attribute, ByteRange, Config, Hint, Host, HostError, SUBPAGE_SHIFT, SUBPAGE_SIZE};
use std::fs::File;
use std::sync::Arc;
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, VolatileMemory,
};

/// Why a region cannot back a [`GuestMemoryHost`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmMemoryError {
    /// No region of the guest memory contains the address.
    #[error("no guest memory region contains {0:#x}")]
    NoRegion(u64),
    /// The region is anonymous memory: nothing to punch holes in.
    #[error("the region at {0:#x} is not backed by a file (memfd or guest_memfd)")]
    NotFileBacked(u64),
    /// The region's length is not a positive multiple of 2 MiB.
    #[error("the region's length {0:#x} is not a positive multiple of 2 MiB")]
    BadLength(u64),
    /// The file offset of the region is not 2 MiB aligned, so the engine's
    /// huge pages would not be the file's.
    #[error("the region starts at file offset {0:#x}, which is not 2 MiB aligned")]
    Misaligned(u64),
}

/// What the host did, for reports and tests (each counter exact once the
/// engine's operations have returned).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmMemoryCounts {
    /// `fallocate(PUNCH_HOLE)` calls of the engine's frees.
    pub punch_calls: u64,
    /// Bytes they released.
    pub punched_bytes: u64,
    /// `fallocate` allocations.
    pub allocate_calls: u64,
    /// `fallocate` calls that failed.
    pub fallocate_errors: u64,
    /// Bytes zeroed for un-punches.
    pub zeroed_bytes: u64,
    /// Invalidations begun.
    pub invalidations: u64,
}

#[derive(Default)]
struct Counters {
    punch_calls: AtomicU64,
    punched_bytes: AtomicU64,
    allocate_calls: AtomicU64,
    fallocate_errors: AtomicU64,
    zeroed_bytes: AtomicU64,
    invalidations: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    // ORDERING: Relaxed: statistics, read once the operations returned.
    c.fetch_add(n, Ordering::Relaxed);
}

type InvalidateHook = Box<dyn Fn(ByteRange, Option<Hint>) + Send + Sync>;

/// The engine's [`Host`] over one file-backed region of a vm-memory
/// `GuestMemoryMmap`: see the module documentation.
pub struct GuestMemoryHost<B: Bitmap + 'static = ()> {
    /// The region's mapping, kept alive for zeroing through it.
    mapping: Arc<MmapRegion<B>>,
    guest_base: GuestAddress,
    len: u64,
    /// The file that is punched and the offset of the region in it.
    private: FileOffset,
    /// Is `private` the file `mapping` maps (zero through the mapping)?
    mapped: bool,
    /// One bit per subpage, set = shared.
    shared: SharedBits,
    invalidate: Option<InvalidateHook>,
    counters: Counters,
}

impl<B: Bitmap + 'static> GuestMemoryHost<B> {
    /// The host of `region`, whose own file (a memfd, or a mappable
    /// guest_memfd) holds the memory that is punched. Every subpage starts
    /// private.
    pub fn new(region: &GuestRegionMmap<B>) -> Result<Self, VmMemoryError> {
        let base = region.start_addr().0;
        let private = region
            .file_offset()
            .cloned()
            .ok_or(VmMemoryError::NotFileBacked(base))?;
        Self::build(region, private, true)
    }

    /// The host of `region` whose private memory lives in another file,
    /// `private` (the memslot's guest_memfd and its `guest_memfd_offset`):
    /// Cloud Hypervisor's layout. Every subpage starts private.
    pub fn with_private_file(
        region: &GuestRegionMmap<B>,
        private: FileOffset,
    ) -> Result<Self, VmMemoryError> {
        Self::build(region, private, false)
    }

    /// The host of the region of `mem` that contains `addr` ([`new`](Self::new)).
    pub fn for_address(
        mem: &GuestMemoryMmap<B>,
        addr: GuestAddress,
    ) -> Result<Self, VmMemoryError> {
        let region = mem
            .find_region(addr)
            .ok_or(VmMemoryError::NoRegion(addr.0))?;
        Self::new(region)
    }

    fn build(
        region: &GuestRegionMmap<B>,
        private: FileOffset,
        mapped: bool,
    ) -> Result<Self, VmMemoryError> {
        let len = region.len();
        if len == 0 || !len.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(VmMemoryError::BadLength(len));
        }
        if !private.start().is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(VmMemoryError::Misaligned(private.start()));
        }
        let subpages = len >> SUBPAGE_SHIFT;
        Ok(GuestMemoryHost {
            mapping: region.get_mmap(),
            guest_base: region.start_addr(),
            len,
            private,
            mapped,
            shared: SharedBits::new(subpages),
            invalidate: None,
            counters: Counters::default(),
        })
    }

    /// Call `hook` on every invalidation the engine begins (the range, and
    /// the huge page backing it), to zap mappings of guest memory the VMM
    /// keeps outside KVM. Without a hook an invalidation is only counted.
    pub fn on_invalidate(
        mut self,
        hook: impl Fn(ByteRange, Option<Hint>) + Send + Sync + 'static,
    ) -> Self {
        self.invalidate = Some(Box::new(hook));
        self
    }

    /// The engine's configuration for this region: its length, 2 MiB huge
    /// pages, populated (the VMM allocated the memory), no budget.
    pub fn config(&self) -> Config {
        Config::new(self.len)
    }

    /// The region's length in bytes (the engine's file size).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always `false`: a region is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first guest physical address of the region.
    pub fn guest_base(&self) -> GuestAddress {
        self.guest_base
    }

    /// The file that is punched (the region's own, or the private file).
    pub fn private_file(&self) -> &Arc<File> {
        self.private.arc()
    }

    /// The engine's offset of guest physical address `gpa`, if the region
    /// contains it.
    pub fn offset_of(&self, gpa: GuestAddress) -> Option<u64> {
        let off = gpa.0.checked_sub(self.guest_base.0)?;
        (off < self.len).then_some(off)
    }

    /// The engine's range of `gpa .. gpa + len`, if the region contains all
    /// of it (a range straddling two regions is split by the VMM, one host
    /// per region).
    pub fn range_of(&self, gpa: GuestAddress, len: u64) -> Option<ByteRange> {
        let off = self.offset_of(gpa)?;
        let end = off.checked_add(len)?;
        (end <= self.len).then_some(ByteRange::new(off, len))
    }

    /// Record every subpage as `to` (the VMM's initial attributes).
    pub fn set_all(&self, to: Attribute) {
        self.shared.set_all(to);
    }

    /// What the host did so far.
    pub fn counts(&self) -> VmMemoryCounts {
        // ORDERING: Relaxed: statistics (see `add`).
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        VmMemoryCounts {
            punch_calls: get(&c.punch_calls),
            punched_bytes: get(&c.punched_bytes),
            allocate_calls: get(&c.allocate_calls),
            fallocate_errors: get(&c.fallocate_errors),
            zeroed_bytes: get(&c.zeroed_bytes),
            invalidations: get(&c.invalidations),
        }
    }

    fn check(&self, range: ByteRange) {
        assert!(
            range.offset.is_multiple_of(SUBPAGE_SIZE)
                && range.len.is_multiple_of(SUBPAGE_SIZE)
                && range
                    .offset
                    .checked_add(range.len)
                    .is_some_and(|e| e <= self.len),
            "the engine passed {range:?} outside the region of {:#x} bytes",
            self.len
        );
    }

    /// `fallocate(flags | KEEP_SIZE)` on the private file at the region's
    /// offset, retrying `EINTR` (guest_memfd needs `KEEP_SIZE` always).
    fn fallocate(&self, punch: bool, range: ByteRange) -> Result<(), HostError> {
        let at = self.private.start() + range.offset;
        let done = if punch {
            sys::punch_hole(self.private.file(), at, range.len)
        } else {
            sys::allocate(self.private.file(), at, range.len)
        };
        done.map_err(|errno| {
            add(&self.counters.fallocate_errors, 1);
            HostError { errno }
        })
    }
}

/// Zeros written at a time through the region.
static ZEROS: [u8; 4096] = [0; 4096];

impl<B: Bitmap + Send + Sync + 'static> Host for GuestMemoryHost<B> {
    fn is_shared(&self, range: ByteRange) -> bool {
        self.check(range);
        self.shared.all_shared(range)
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        self.check(range);
        self.shared.set(range, to);
    }

    fn invalidate_begin(&self, range: ByteRange, hint: Hint) {
        self.check(range);
        add(&self.counters.invalidations, 1);
        if let Some(hook) = &self.invalidate {
            hook(range, Some(hint));
        }
    }

    fn invalidate_end(&self, range: ByteRange) {
        self.check(range);
    }

    fn allocate(&self, range: ByteRange, _order: u8) -> Result<(), HostError> {
        self.check(range);
        add(&self.counters.allocate_calls, 1);
        self.fallocate(false, range)
    }

    fn free(&self, range: ByteRange, _order: u8) -> Result<(), HostError> {
        self.check(range);
        self.fallocate(true, range)?;
        add(&self.counters.punch_calls, 1);
        add(&self.counters.punched_bytes, range.len);
        Ok(())
    }

    fn zero(&self, range: ByteRange) {
        self.check(range);
        if self.mapped {
            // Through the region: vm-memory's volatile writes, never a
            // slice the compiler may assume unchanged (STYLE.md rule 13).
            let slice = self
                .mapping
                .get_slice(range.offset as usize, range.len as usize)
                .expect("a checked range lies inside the region");
            let mut at = 0;
            while at < slice.len() {
                let n = ZEROS.len().min(slice.len() - at);
                slice
                    .write_slice(&ZEROS[..n], at)
                    .expect("inside the slice");
                at += n;
            }
        } else {
            // A guest_memfd the VMM does not map: punch the run and
            // allocate it again; the kernel hands back zeroed pages. A
            // failure panics: the engine counts the zero as not done and
            // leaves the subpages punched (the `Host` contract).
            self.fallocate(true, range)
                .and_then(|()| self.fallocate(false, range))
                .unwrap_or_else(|e| panic!("zeroing {range:?} by fallocate failed: {e}"));
        }
        add(&self.counters.zeroed_bytes, range.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hugepunch::HugePunch;
    use vm_memory::Address;

    fn memfd(size: u64) -> File {
        File::from(sys::memfd("vm-memory-host", size, false).expect("memfd_create"))
    }

    fn allocated(f: &File) -> u64 {
        sys::allocated_bytes(f).expect("fstat")
    }

    #[test]
    fn addresses_and_bad_regions() {
        let base = GuestAddress(0x1_0000_0000);
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([
            (GuestAddress(0), 1 << 20, None),
            (base, 4 << 20, Some(FileOffset::new(memfd(4 << 20), 0))),
        ])
        .unwrap();
        let host = GuestMemoryHost::for_address(&mem, GuestAddress(0x1_0000_1000)).unwrap();
        assert_eq!(host.offset_of(GuestAddress(0x1_0020_0000)), Some(2 << 20));
        assert_eq!(host.offset_of(GuestAddress(0x1_0040_0000)), None);
        assert_eq!(
            host.range_of(GuestAddress(0x1_003f_f000), 4096),
            Some(ByteRange::new(0x3f_f000, 4096))
        );
        assert_eq!(host.range_of(GuestAddress(0x1_003f_f000), 8192), None);
        assert_eq!(
            GuestMemoryHost::for_address(&mem, GuestAddress(0)).err(),
            Some(VmMemoryError::NotFileBacked(0))
        );
        assert_eq!(
            GuestMemoryHost::for_address(&mem, GuestAddress(0x2_0000_0000)).err(),
            Some(VmMemoryError::NoRegion(0x2_0000_0000))
        );
        let odd: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
            base,
            3 << 20,
            Some(FileOffset::new(memfd(3 << 20), 0)),
        )])
        .unwrap();
        assert_eq!(
            GuestMemoryHost::for_address(&odd, base).err(),
            Some(VmMemoryError::BadLength(3 << 20))
        );
    }

    #[test]
    fn punches_coalesce_into_one_fallocate_and_unpunched_memory_reads_zero() {
        let size = 4 << 20;
        let f = memfd(size);
        let base = GuestAddress(0x8000_0000);
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
            base,
            size as usize,
            Some(FileOffset::new(f.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        mem.write_slice(&vec![0xa5; size as usize], base).unwrap();
        assert_eq!(allocated(&f), size);
        let host = Arc::new(GuestMemoryHost::for_address(&mem, base).unwrap());
        host.set_all(Attribute::Shared);
        let file = HugePunch::new(host.config(), host.clone()).unwrap();
        for sub in 0..511 {
            file.punch(sub * 4096, 4096).unwrap();
        }
        assert_eq!(host.counts().punch_calls, 0);
        assert_eq!(allocated(&f), size, "every punch deferred");
        file.punch(511 * 4096, 4096).unwrap();
        assert_eq!(host.counts().punch_calls, 1);
        assert_eq!(allocated(&f), size - (2 << 20), "one 2 MiB fallocate");
        // Un-punch a subpage of the second huge page: zeroed through the
        // region, then it reads zero.
        file.punch(0x20_0000, 4096).unwrap();
        file.populate(0x20_0000, 4096).unwrap();
        let mut buf = [1u8; 4096];
        mem.read_slice(&mut buf, base.unchecked_add(0x20_0000))
            .unwrap();
        assert_eq!(buf, [0u8; 4096]);
        mem.read_slice(&mut buf, base.unchecked_add(0x20_1000))
            .unwrap();
        assert_eq!(buf, [0xa5u8; 4096], "its neighbour kept its data");
        assert_eq!(host.counts().zeroed_bytes, 4096);
        file.teardown();
        assert_eq!(allocated(&f), 0);
    }
}
