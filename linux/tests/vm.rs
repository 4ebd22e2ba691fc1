//! A real guest on guest_memfd (`hugepunch_linux::vm`): vCPUs at CPL3 give
//! memory back through port I/O while the VMM releases it directly or
//! through the engine; the data checks of `vm::run` hold (the guest's data
//! survives, taken-back pages read zeros, the engine frees no page the
//! guest still uses, memory released matches the engine's accounting).
//! Skips, saying why, where /dev/kvm offers no mmap()able guest_memfd.
#![cfg(target_os = "linux")]

use hugepunch::testing::watchdog::Watchdog;
use hugepunch_linux::guest_memfd_unavailable;
use hugepunch_linux::vm::{run, VmOptions, VmReport};

const SIZE: u64 = 8 << 20;

fn guest(vcpus: usize, pattern: &str) -> Option<VmReport> {
    if let Some(why) = guest_memfd_unavailable() {
        eprintln!("skipped: guest_memfd unavailable here: {why}");
        return None;
    }
    let opts = VmOptions {
        size: SIZE,
        vcpus,
        pattern: pattern.parse().unwrap(),
        seed: 1,
    };
    Some(run(&opts, &|_, _, _| {}).unwrap_or_else(|e| panic!("{pattern}, {vcpus} vCPUs: {e}")))
}

fn check(vcpus: usize, pattern: &str) {
    let _watchdog = Watchdog::arm(&format!("guest {pattern} on {vcpus} vCPUs"));
    let Some(r) = guest(vcpus, pattern) else {
        return;
    };
    let pages = SIZE / 4096;
    let (d, e) = (&r.direct, &r.engine);
    assert_eq!(r.guest_cpl, 3);
    for s in [d, e] {
        assert!(s.give_backs > 0, "{pattern}: {s:?}");
        assert_eq!(
            s.data.kept_pages + s.data.given_back_pages,
            pages,
            "{pattern}: every page checked or given back"
        );
        assert_eq!(s.data.taken_back_zeroed, s.take_backs);
        assert!(s.take_backs > 0, "the guest takes some pages back");
    }
    assert_eq!(d.give_backs, e.give_backs);
    assert_eq!(d.data, e.data, "both sides end with the same guest memory");
    assert_eq!(
        d.punch_calls, d.give_backs,
        "direct: one fallocate per give-back"
    );
    assert!(
        e.punch_calls <= SIZE / (2 << 20),
        "engine: 2 MiB frees only"
    );
    // KVM's own counters: the vCPUs exited for every give-back, and
    // direct punching asked for a remote TLB flush per give-back, the
    // engine at most one per huge page it freed.
    let stat = |s: &hugepunch_linux::vm::VmSide, k: &str| s.kvm.get(k).copied().unwrap_or(0);
    assert!(stat(d, "mmio_exits") >= d.give_backs, "{:?}", d.kvm);
    assert!(stat(e, "mmio_exits") >= e.give_backs, "{:?}", e.kvm);
    assert!(
        stat(d, "remote_tlb_flush_requests") >= d.give_backs,
        "{:?}",
        d.kvm
    );
    assert!(
        stat(e, "remote_tlb_flush_requests") <= e.punch_calls + e.take_backs,
        "{:?}",
        e.kvm
    );
}

#[test]
#[cfg_attr(miri, ignore)]
#[cfg_attr(
    hugepunch_no_kvm,
    ignore = "needs /dev/kvm, which the test build could not open"
)]
fn guest_gives_back_ascending_on_one_vcpu() {
    check(1, "ascending");
}

#[test]
#[cfg_attr(miri, ignore)]
#[cfg_attr(
    hugepunch_no_kvm,
    ignore = "needs /dev/kvm, which the test build could not open"
)]
fn guest_gives_back_random_on_two_vcpus() {
    check(2, "random");
}

#[test]
#[cfg_attr(miri, ignore)]
#[cfg_attr(
    hugepunch_no_kvm,
    ignore = "needs /dev/kvm, which the test build could not open"
)]
fn guest_gives_back_strided_and_round_robin_on_two_vcpus() {
    check(2, "strided");
    check(2, "round-robin");
}

/// `pin` keeps one page of every huge page: the engine frees nothing and
/// holds every given-back page pending, deferring every flush; direct
/// punching pays a flush request per page.
#[test]
#[cfg_attr(miri, ignore)]
#[cfg_attr(
    hugepunch_no_kvm,
    ignore = "needs /dev/kvm, which the test build could not open"
)]
fn guest_pin_defers_everything_through_the_engine() {
    let _watchdog = Watchdog::arm("guest_pin_defers_everything_through_the_engine");
    let Some(r) = guest(2, "pin") else {
        return;
    };
    let e = &r.engine;
    assert_eq!(e.punch_calls, 0);
    assert_eq!(e.bytes_released, 0);
    assert_eq!(
        e.pending_bytes,
        (e.give_backs - e.take_backs) * 4096,
        "every page given back and not taken back is pending"
    );
    assert_eq!(
        r.direct.bytes_released,
        (r.direct.give_backs - r.direct.take_backs) * 4096
    );
}

#[test]
#[cfg_attr(miri, ignore)]
fn bad_guest_options_are_refused() {
    for (size, vcpus) in [
        (0, 1),
        (3 << 20, 1),
        (128 << 30, 1),
        (8 << 20, 0),
        (8 << 20, 9),
    ] {
        let opts = VmOptions {
            size,
            vcpus,
            pattern: "ascending".parse().unwrap(),
            seed: 1,
        };
        let e = run(&opts, &|_, _, _| {}).unwrap_err().to_string();
        assert!(e.contains("2 MiB") || e.contains("vCPUs"), "{e}");
    }
}
