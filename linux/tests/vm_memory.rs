//! `examples/cloud_hypervisor_discard.rs`, compiled in and run: Cloud
//! Hypervisor's `punch_holes_in_guest_memfd` on each to-shared
//! `KVM_HC_MAP_GPA_RANGE`, routed through the engine by the vm-memory host,
//! beside today's handler on the same stream, both measured by the kernel.
//! The guest_memfd runs are ignored, with the probe's reason, where the
//! host has no mmap()able guest_memfd (hugepunch-probe's `needs!`).

hugepunch_probe::include_needs!();

#[path = "../examples/cloud_hypervisor_discard.rs"]
mod example;

use example::{Report, Skipped};

const MIB2: u64 = 2 << 20;

fn check(r: &Report) {
    example::print(r);
    // 16 huge pages converted whole: 16 fallocates of 2 MiB, released by
    // the kernel, where today's handler makes one fallocate per hypercall.
    assert_eq!(r.engine_fallocates, 16, "{r:?}");
    assert_eq!(r.engine_released, 16 * MIB2, "{r:?}");
    assert_eq!(r.stats.huge_frees, 16);
    assert_eq!(r.stats.forced_splits, 0);
    assert_eq!(r.direct_fallocates, r.to_shared);
    assert_eq!(
        r.direct_split, 32,
        "today every huge page takes a 4 KiB punch"
    );
    assert_eq!(r.stats.punch_calls, r.to_shared);
    // Today's handler released every converted 4 KiB at once (the
    // scattered ones too, the given-back ones allocated again); the engine
    // holds the scattered ones pending instead of splitting their huge
    // pages.
    let pending = r.stats.pending_subpages * 4096;
    assert!(pending > 0);
    assert_eq!(r.direct_released, r.engine_released + pending, "{r:?}");
    // The given-back bounce buffer was refused once over its pending
    // punches, populated and converted.
    assert_eq!(r.stats.conversions_rejected, 1);
    assert_eq!(r.after_teardown, 0, "teardown released the rest");
}

#[test]
fn cloud_hypervisor_discard_on_memfd() {
    check(&example::run(false, 7).expect("a memfd is always available"));
}

needs! { guest_memfd;
    #[test]
    fn cloud_hypervisor_discard_on_guest_memfd() {
        match example::run(true, 11) {
            Ok(r) => {
                assert_eq!(r.private_backend, "guest_memfd");
                check(&r);
            }
            Err(Skipped(why)) => panic!("the probe found guest_memfd, the example did not: {why}"),
        }
    }
}

needs! { guest_memfd;
    /// The one-file layout on a guest_memfd that vm-memory maps itself
    /// (`GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`): punches
    /// coalesce into one 2 MiB fallocate, an un-punched subpage is zeroed
    /// through the region (vm-memory's volatile writes) and reads zero, its
    /// neighbours keep their data, and the kernel (mincore) agrees.
    #[test]
    fn one_file_guest_memfd_region_mapped_by_vm_memory() {
        use hugepunch::{ByteRange, HugePunch};
        use hugepunch_linux::{sys, vm_memory::GuestMemoryHost};
        use std::sync::Arc;
        use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

        const SIZE: u64 = 4 << 20;
        let kvm = sys::Kvm::open().expect("a VM with guest_memfd");
        let flags = sys::GUEST_MEMFD_FLAG_MMAP | sys::GUEST_MEMFD_FLAG_INIT_SHARED;
        let gmem = kvm
            .guest_memfd(SIZE, flags)
            .expect("KVM_CREATE_GUEST_MEMFD");
        sys::allocate(&gmem, 0, SIZE).expect("fallocate");
        // SAFETY: a guest_memfd of SIZE bytes created MMAP | INIT_SHARED (any
        // page may be faulted in); it cannot be resized.
        let probe = unsafe { sys::Mapping::new(&gmem, SIZE as usize) }.expect("mmap");
        let resident = || probe.resident_pages(ByteRange::new(0, SIZE)).unwrap() * 4096;

        let base = GuestAddress(0x4000_0000);
        let file = std::fs::File::from(gmem.try_clone().unwrap());
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([(
            base,
            SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("vm-memory maps the guest_memfd");
        mem.write_slice(&vec![0x5a; SIZE as usize], base).unwrap();
        assert_eq!(resident(), SIZE);

        let host = Arc::new(GuestMemoryHost::for_address(&mem, base).unwrap());
        host.set_all(hugepunch::Attribute::Shared);
        let engine = HugePunch::new(host.config(), host.clone()).unwrap();
        for sub in (0..512).rev() {
            engine.punch(sub * 4096, 4096).unwrap();
        }
        assert_eq!(host.counts().punch_calls, 1);
        assert_eq!(resident(), SIZE - MIB2, "one huge page released whole");

        engine.punch(MIB2 + 0x5000, 4096).unwrap();
        engine.populate(MIB2 + 0x5000, 4096).unwrap();
        assert_eq!(host.counts().zeroed_bytes, 4096);
        let mut buf = [1u8; 4096];
        mem.read_slice(&mut buf, GuestAddress(base.0 + MIB2 + 0x5000))
            .unwrap();
        assert_eq!(buf, [0u8; 4096], "un-punched memory reads zero");
        mem.read_slice(&mut buf, GuestAddress(base.0 + MIB2 + 0x6000))
            .unwrap();
        assert_eq!(buf, [0x5au8; 4096], "its neighbour kept its data");

        engine.teardown();
        assert_eq!(resident(), 0, "teardown released the rest");
    }
}
