//! `examples/cloud_hypervisor_discard.rs`, compiled in and run: Cloud
//! Hypervisor's `punch_holes_in_guest_memfd` on each to-shared
//! `KVM_HC_MAP_GPA_RANGE`, routed through the engine by the vm-memory host,
//! beside today's handler on the same stream, both measured by the kernel.
//! The guest_memfd run skips with the reason where /dev/kvm cannot make one.

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

#[test]
fn cloud_hypervisor_discard_on_guest_memfd() {
    match example::run(true, 11) {
        Ok(r) => {
            assert_eq!(r.private_backend, "guest_memfd");
            check(&r);
        }
        Err(Skipped(why)) => println!("skipped: {why}"),
    }
}
