//! Cloud Hypervisor's guest_memfd discard, routed through hugepunch.
//!
//! A confidential guest asks to convert memory with the
//! `KVM_HC_MAP_GPA_RANGE` hypercall (guest physical address, page count,
//! attributes). Cloud Hypervisor handles the exit by setting the KVM memory
//! attributes of the range and, on a conversion to shared, by calling
//! `punch_holes_in_guest_memfd`, which punches the range out of the
//! memslot's guest_memfd with `fallocate(PUNCH_HOLE | KEEP_SIZE)`: one
//! punch per hypercall, 4 KiB at a time when the guest converts 4 KiB at a
//! time, each splitting the 2 MiB huge page behind it.
//!
//! Here the same VMM layout — guest RAM as a vm-memory `GuestMemoryMmap`
//! region over a memfd (the shared memory), the private memory in a KVM
//! guest_memfd bound with it to memslot 0 (`KVM_SET_USER_MEMORY_REGION2`),
//! or a second memfd where /dev/kvm cannot make one — gets its `Host` from
//! `hugepunch_linux::vm_memory::GuestMemoryHost`, and the handler routes the
//! discard through the engine. The same hypercall stream is also handled
//! the way Cloud Hypervisor does today, on a second private file, and the
//! kernel says what each released.
//!
//! Run it with `cargo run -p hugepunch-linux --example cloud_hypervisor_discard`
//! (`-- memfd` to force the memfd fallback). `linux/tests/vm_memory.rs`
//! runs it and checks its report.

use hugepunch::{Attribute, ByteRange, Error, HugePunch};
use hugepunch_linux::sys;
use hugepunch_linux::vm_memory::GuestMemoryHost;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest RAM: 64 MiB at 4 GiB (32 huge pages of 2 MiB).
const RAM_BASE: u64 = 1 << 32;
const RAM_SIZE: u64 = 64 << 20;
const HUGE: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// Huge pages the guest converts to shared entirely, 4 KiB at a time.
const WHOLE: u64 = 16;
/// Random 4 KiB conversions to shared over the other huge pages.
const SCATTERED: u64 = 2000;

/// `KVM_MAP_GPA_RANGE_ENCRYPTED`: the attribute bit of the hypercall's
/// third argument (set: to private).
const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;

/// Why a run did not happen here.
#[derive(Debug)]
pub struct Skipped(pub String);

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// "guest_memfd" or "memfd".
    pub private_backend: &'static str,
    /// Whether the guest_memfd was bound to a memslot with the RAM region.
    pub memslot: bool,
    /// `KVM_HC_MAP_GPA_RANGE` exits handled.
    pub hypercalls: u64,
    /// Of which conversions to shared.
    pub to_shared: u64,
    /// Cloud Hypervisor today: fallocate punches, bytes the kernel released.
    pub direct_fallocates: u64,
    /// Bytes the kernel released for today's handler.
    pub direct_released: u64,
    /// Huge pages today's handler punches 4 KiB out of: each one split
    /// where the guest_memfd is backed by huge pages.
    pub direct_split: u64,
    /// Through hugepunch: fallocate punches (2 MiB each).
    pub engine_fallocates: u64,
    /// Bytes the kernel released for the engine's handler.
    pub engine_released: u64,
    /// The engine's statistics after the stream.
    pub stats: hugepunch::Stats,
    /// Bytes the kernel still held for the engine's file after teardown.
    pub after_teardown: u64,
}

/// One private file, and how to ask the kernel what it holds.
struct Private {
    fd: OwnedFd,
    /// A guest_memfd's st_blocks is always 0: mincore over a mapping.
    map: Option<sys::Mapping>,
}

impl Private {
    fn resident(&self) -> u64 {
        match &self.map {
            Some(m) => {
                m.resident_pages(ByteRange::new(0, RAM_SIZE))
                    .expect("mincore")
                    * PAGE
            }
            None => sys::allocated_bytes(&self.fd).expect("fstat"),
        }
    }

    /// The guest's next access to `r`: a guest_memfd folio counts as
    /// resident for mincore only once a fault has cleared it.
    fn touch(&self, r: ByteRange) {
        if let Some(m) = &self.map {
            m.touch(r);
        }
    }

    fn file_offset(&self) -> FileOffset {
        FileOffset::new(File::from(self.fd.try_clone().expect("dup")), 0)
    }
}

fn memfd_private(name: &str) -> Private {
    let fd = sys::memfd(name, RAM_SIZE, false).expect("memfd_create");
    sys::allocate(&fd, 0, RAM_SIZE).expect("fallocate");
    Private { fd, map: None }
}

fn guest_memfd_private(kvm: &sys::Kvm) -> Private {
    let flags = sys::GUEST_MEMFD_FLAG_MMAP | sys::GUEST_MEMFD_FLAG_INIT_SHARED;
    let fd = kvm
        .guest_memfd(RAM_SIZE, flags)
        .expect("KVM_CREATE_GUEST_MEMFD");
    sys::allocate(&fd, 0, RAM_SIZE).expect("fallocate");
    // SAFETY: a guest_memfd of RAM_SIZE bytes created MMAP | INIT_SHARED
    // (every page may be faulted in), and a guest_memfd cannot be resized.
    let map = unsafe { sys::Mapping::new(&fd, RAM_SIZE as usize) }.expect("mmap guest_memfd");
    let p = Private { fd, map: Some(map) };
    p.touch(ByteRange::new(0, RAM_SIZE));
    p
}

/// The guest's hypercall stream: `(gpa, npages, attributes)`.
fn hypercalls(seed: u64) -> Vec<(u64, u64, u64)> {
    let mut rng = seed | 1;
    let mut next = move || {
        // xorshift64*: a fixed stream for a given seed.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut pages: Vec<u64> = (0..WHOLE * 512).collect();
    for i in (1..pages.len()).rev() {
        pages.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    let mut calls: Vec<(u64, u64, u64)> = pages
        .into_iter()
        .map(|p| (RAM_BASE + p * PAGE, 1, 0))
        .collect();
    for _ in 0..SCATTERED {
        let mut p = WHOLE * 512 + next() % ((RAM_SIZE / HUGE - WHOLE) * 512);
        // The last 4 KiB of each huge page stays private: none completes.
        if p % 512 == 511 {
            p -= 1;
        }
        calls.push((RAM_BASE + p * PAGE, 1, 0));
    }
    // A bounce buffer given back: 16 pages converted to private again.
    let back = RAM_BASE + RAM_SIZE - HUGE;
    calls.push((back, 16, KVM_MAP_GPA_RANGE_ENCRYPTED));
    calls
}

/// The VMM's side of one guest RAM region.
struct Vmm {
    host: Arc<GuestMemoryHost>,
    file: HugePunch,
}

impl Vmm {
    /// `punch_holes_in_guest_memfd`, through the engine: the punch is
    /// recorded; a huge page is freed with one fallocate when whole.
    fn punch_holes_in_guest_memfd(&self, r: ByteRange) -> Result<(), Error> {
        self.file.punch(r.offset, r.len)
    }

    /// The `KVM_HC_MAP_GPA_RANGE` exit: the attribute change (Cloud
    /// Hypervisor's `KVM_SET_MEMORY_ATTRIBUTES`; the engine's `convert`
    /// records it in the host), then the discard of the private copy of
    /// what became shared. A conversion to private over a pending punch is
    /// refused with the offset (KVM's `error_offset`): populate, retry.
    fn handle_map_gpa_range(&self, gpa: u64, npages: u64, attributes: u64) -> Result<(), Error> {
        let r = self
            .host
            .range_of(GuestAddress(gpa), npages * PAGE)
            .expect("the guest converts its own RAM");
        let to = if attributes & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
            Attribute::Private
        } else {
            Attribute::Shared
        };
        match self.file.convert(r.offset, r.len, to) {
            Err(Error::PendingPunch { .. }) => {
                self.file.populate(r.offset, r.len)?;
                self.file.convert(r.offset, r.len, to)?;
            }
            other => other?,
        }
        if to == Attribute::Shared {
            self.punch_holes_in_guest_memfd(r)?;
        }
        Ok(())
    }
}

/// Run the stream on a guest_memfd (`want_guest_memfd`, where /dev/kvm
/// makes one) or a memfd.
pub fn run(want_guest_memfd: bool, seed: u64) -> Result<Report, Skipped> {
    // Guest RAM, shared memory: a memfd region of a GuestMemoryMmap.
    let shared = sys::memfd("guest-ram", RAM_SIZE, false).expect("memfd_create");
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(RAM_BASE),
        RAM_SIZE as usize,
        Some(FileOffset::new(File::from(shared), 0)),
    )])
    .expect("GuestMemoryMmap");
    let region = mem.find_region(GuestAddress(RAM_BASE)).expect("the region");

    // The private memory: a guest_memfd (and one more for today's handler)
    // or memfds.
    let mut kvm = None;
    let (private, direct) = if want_guest_memfd {
        if let Some(why) = hugepunch_linux::guest_memfd_unavailable() {
            return Err(Skipped(format!("guest_memfd: {why}")));
        }
        let k = sys::Kvm::open().map_err(|e| Skipped(e.to_string()))?;
        let pair = (guest_memfd_private(&k), guest_memfd_private(&k));
        kvm = Some(k);
        pair
    } else {
        (memfd_private("private"), memfd_private("direct"))
    };
    let private_backend = if kvm.is_some() {
        "guest_memfd"
    } else {
        "memfd"
    };

    // Memslot 0: the RAM region for shared accesses, the guest_memfd for
    // private ones, as Cloud Hypervisor creates it.
    let memslot = kvm.as_ref().is_some_and(|k| {
        use std::os::fd::AsRawFd;
        let region2 = kvm_bindings::kvm_userspace_memory_region2 {
            slot: 0,
            flags: sys::KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: RAM_BASE,
            memory_size: RAM_SIZE,
            userspace_addr: region.as_ptr() as u64,
            guest_memfd_offset: 0,
            guest_memfd: private.fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `userspace_addr .. + memory_size` is the live mapping of
        // the region, which `mem` keeps until the end of this function; the
        // memslot is deleted below before `mem` is dropped (and the VM is
        // closed before that if deleting failed). The kernel only reads
        // `region2`, on our stack for the call.
        unsafe { k.vm.set_user_memory_region2(region2) }.is_ok()
    });

    let host = GuestMemoryHost::with_private_file(region, private.file_offset())
        .expect("a 2 MiB multiple, aligned");
    let host = Arc::new(host);
    let vmm = Vmm {
        file: HugePunch::new(host.config(), host.clone()).expect("the engine"),
        host,
    };

    let calls = hypercalls(seed);
    let to_shared = calls.iter().filter(|c| c.2 == 0).count() as u64;
    let mut direct_fallocates = 0;
    let mut punched_huge_pages = std::collections::BTreeSet::new();
    for &(gpa, npages, attributes) in &calls {
        vmm.handle_map_gpa_range(gpa, npages, attributes)
            .expect("a valid conversion");
        // Cloud Hypervisor today: one fallocate per to-shared hypercall.
        if attributes & KVM_MAP_GPA_RANGE_ENCRYPTED == 0 {
            sys::punch_hole(&direct.fd, gpa - RAM_BASE, npages * PAGE).expect("punch");
            direct_fallocates += 1;
            punched_huge_pages.insert((gpa - RAM_BASE) / HUGE);
        } else {
            // Today's handler leaves the holes; the guest's next touch
            // allocates them again.
            sys::allocate(&direct.fd, gpa - RAM_BASE, npages * PAGE).expect("allocate");
        }
    }
    // The guest then uses the buffer it took back (private again, present
    // again in both files).
    let back = ByteRange::new(RAM_SIZE - HUGE, 16 * PAGE);
    private.touch(back);
    direct.touch(back);
    let stats = vmm.file.stats();
    let report_before = (
        vmm.host.counts().punch_calls,
        RAM_SIZE - private.resident(),
        RAM_SIZE - direct.resident(),
    );
    vmm.file.teardown();
    let after_teardown = private.resident();
    if memslot {
        let delete = kvm_bindings::kvm_userspace_memory_region2 {
            slot: 0,
            ..Default::default()
        };
        let k = kvm.as_ref().expect("a memslot needs a VM");
        // SAFETY: a region of size 0 deletes the slot; the kernel only
        // reads `delete`, on our stack.
        if unsafe { k.vm.set_user_memory_region2(delete) }.is_err() {
            // Keep the mapping alive forever rather than under a live slot.
            std::mem::forget(mem);
        }
    }
    Ok(Report {
        private_backend,
        memslot,
        hypercalls: calls.len() as u64,
        to_shared,
        direct_fallocates,
        direct_released: report_before.2,
        direct_split: punched_huge_pages.len() as u64,
        engine_fallocates: report_before.0,
        engine_released: report_before.1,
        stats,
        after_teardown,
    })
}

/// Print a report as the example does.
pub fn print(r: &Report) {
    println!(
        "Cloud Hypervisor layout: guest RAM of {} MiB ({} huge pages), private memory in a {}{}",
        RAM_SIZE >> 20,
        RAM_SIZE / HUGE,
        r.private_backend,
        if r.memslot { " bound to memslot 0" } else { "" }
    );
    println!(
        "{} KVM_HC_MAP_GPA_RANGE exits, {} to shared",
        r.hypercalls, r.to_shared
    );
    println!(
        "{:<34} {:>10} {:>12}",
        "punch_holes_in_guest_memfd", "fallocates", "released"
    );
    println!(
        "{:<34} {:>10} {:>8} MiB   ({} huge pages split on huge-page backing)",
        "today (a punch per hypercall)",
        r.direct_fallocates,
        r.direct_released >> 20,
        r.direct_split
    );
    println!(
        "{:<34} {:>10} {:>8} MiB   ({} subpages pending, {} huge pages split)",
        "through hugepunch",
        r.engine_fallocates,
        r.engine_released >> 20,
        r.stats.pending_subpages,
        r.stats.forced_splits
    );
    println!(
        "after teardown the kernel holds {} bytes of the private file",
        r.after_teardown
    );
}

#[allow(dead_code)] // also compiled into linux/tests/vm_memory.rs
fn main() {
    let want_guest_memfd = std::env::args().nth(1).as_deref() != Some("memfd");
    let r = match run(want_guest_memfd, 7) {
        Ok(r) => r,
        Err(Skipped(why)) => {
            println!("{why}; using a memfd instead");
            run(false, 7).expect("a memfd is always available")
        }
    };
    print(&r);
}
