//! A real guest (`hugepunch_linux::vm`): vCPUs at CPL3 give memory back
//! through MMIO exits while the VMM releases it directly or through the
//! engine, on guest_memfd (its own memslot) and on ordinary guest memory
//! (THP, memfd) through `KVM_SET_USER_MEMORY_REGION` over the VMM's
//! mapping; the data checks of `vm::run` hold (the guest's data survives,
//! taken-back pages read zeros, the engine frees no page the guest still
//! uses, memory released matches the engine's accounting). Each test is
//! ignored, with the probe's reason, where this KVM cannot run the guest,
//! has no mmap()able guest_memfd, or the process may not mount (the THP
//! backend) — hugepunch-probe's `needs!`.
#![cfg(target_os = "linux")]

hugepunch_probe::include_needs!();

use hugepunch::testing::watchdog::Watchdog;
use hugepunch_linux::vm::{run, VmOptions, VmReport, VmSide};
use hugepunch_linux::Backend;
use std::sync::{Mutex, MutexGuard};

const SIZE: u64 = 8 << 20;
const HP: u64 = 2 << 20;

/// Serialises the THP guests: their kernel figures are system-wide
/// counters.
static THP: Mutex<()> = Mutex::new(());

fn thp_lock() -> MutexGuard<'static, ()> {
    THP.lock().unwrap_or_else(|p| p.into_inner())
}

fn guest(backend: Backend, vcpus: usize, pattern: &str) -> VmReport {
    let opts = VmOptions {
        backend: backend.clone(),
        size: SIZE,
        vcpus,
        pattern: pattern.parse().unwrap(),
        seed: 1,
    };
    run(&opts, &|_, _, _| {}).unwrap_or_else(|e| panic!("{backend}, {pattern}, {vcpus} vCPUs: {e}"))
}

fn stat(s: &VmSide, k: &str) -> u64 {
    s.kvm.get(k).copied().unwrap_or(0)
}

/// What holds on every backend.
fn check_common(r: &VmReport, pattern: &str) {
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
        // KVM's own counters: the vCPUs exited for every give-back.
        assert!(stat(s, "mmio_exits") >= s.give_backs, "{:?}", s.kvm);
    }
    assert_eq!(d.give_backs, e.give_backs);
    assert_eq!(d.data, e.data, "both sides end with the same guest memory");
    assert_eq!(
        d.punch_calls, d.give_backs,
        "direct: one fallocate per give-back"
    );
    assert!(e.punch_calls <= SIZE / HP, "engine: 2 MiB frees only");
    // The engine asks for at most one remote TLB flush per huge page it
    // frees or takes back into.
    assert!(
        stat(e, "remote_tlb_flush_requests") <= e.punch_calls + e.take_backs,
        "{:?}",
        e.kvm
    );
}

/// guest_memfd: KVM zaps (and asks for a remote TLB flush) at every punch.
fn check_guest_memfd(vcpus: usize, pattern: &str) {
    let _watchdog = Watchdog::arm(&format!("guest_memfd guest {pattern} on {vcpus} vCPUs"));
    let r = guest(Backend::GuestMemfd, vcpus, pattern);
    check_common(&r, pattern);
    assert!(r.memslot.contains("REGION2"), "{}", r.memslot);
    let d = &r.direct;
    assert!(
        stat(d, "remote_tlb_flush_requests") >= d.give_backs,
        "{:?}",
        d.kvm
    );
}

/// THP through an ordinary memslot: the guest's memory really is huge
/// pages (the kernel counts them, KVM maps them 2 MiB where it says), the
/// engine splits none and frees whole what it frees, direct 4 KiB punching
/// splits every huge page it touches.
fn check_thp(vcpus: usize, pattern: &str) {
    let _watchdog = Watchdog::arm(&format!("THP guest {pattern} on {vcpus} vCPUs"));
    let _thp = thp_lock();
    let r = guest(Backend::Thp, vcpus, pattern);
    check_common(&r, pattern);
    assert!(
        r.memslot.contains("KVM_SET_USER_MEMORY_REGION "),
        "{}",
        r.memslot
    );
    let (d, e) = (&r.direct, &r.engine);
    let huge = SIZE / HP;
    let (dk, ek) = (d.kernel.unwrap(), e.kernel.unwrap());
    assert_eq!(dk.whole_at_start, huge, "{dk:?}");
    assert_eq!(ek.whole_at_start, huge, "{ek:?}");
    assert_eq!(ek.split, 0, "the engine split no huge page ({ek:?})");
    assert!(dk.split >= huge, "direct 4 KiB punches split ({dk:?})");
    for s in [d, e] {
        if let Some(m) = s.kvm_mappings_at_start {
            assert!(
                m.pages_2m >= huge,
                "KVM maps the guest's huge pages with 2 MiB entries: {m:?}"
            );
        }
    }
    assert!(
        stat(d, "remote_tlb_flush_requests") > stat(e, "remote_tlb_flush_requests"),
        "direct {:?}, engine {:?}",
        d.kvm,
        e.kvm
    );
}

needs! { kvm_guest, guest_memfd;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn guest_memfd_guest_gives_back_ascending_on_one_vcpu() {
        check_guest_memfd(1, "ascending");
    }
}

needs! { kvm_guest, guest_memfd;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn guest_memfd_guest_gives_back_random_on_two_vcpus() {
        check_guest_memfd(2, "random");
    }
}

needs! { kvm_guest, guest_memfd;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn guest_memfd_guest_gives_back_strided_and_round_robin_on_two_vcpus() {
        check_guest_memfd(2, "strided");
        check_guest_memfd(2, "round-robin");
    }
}

needs! { kvm_guest, mount;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn thp_guest_gives_back_ascending_on_one_vcpu() {
        check_thp(1, "ascending");
    }
}

needs! { kvm_guest, mount;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn thp_guest_gives_back_random_on_two_vcpus() {
        check_thp(2, "random");
    }
}

needs! { kvm_guest, mount;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn thp_guest_gives_back_strided_and_round_robin_on_two_vcpus() {
        check_thp(2, "strided");
        check_thp(2, "round-robin");
    }
}

needs! { kvm_guest;
    /// memfd (4 KiB shmem) through an ordinary memslot, as QEMU's
    /// memory-backend-memfd: no huge pages, so no kernel huge page figures.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn memfd_guest_gives_back_random_on_two_vcpus() {
        let _watchdog = Watchdog::arm("memfd_guest_gives_back_random_on_two_vcpus");
        // A memfd may get THP where the host's shmem settings offer it.
        let _thp = thp_lock();
        let r = guest(Backend::Memfd, 2, "random");
        check_common(&r, "random");
        assert!(r.engine.kernel.is_none() || r.huge_backing.contains("THP"));
    }
}

/// `pin` keeps one page of every huge page: the engine frees nothing and
/// holds every given-back page pending, deferring every flush; direct
/// punching releases each page.
fn check_pin(backend: Backend) {
    let _watchdog = Watchdog::arm(&format!("{backend} guest pin"));
    let _thp = thp_lock();
    let r = guest(backend.clone(), 2, "pin");
    let e = &r.engine;
    assert_eq!(e.punch_calls, 0);
    assert_eq!(e.bytes_released, 0);
    assert_eq!(
        e.pending_bytes,
        (e.give_backs - e.take_backs) * 4096,
        "every page given back and not taken back is pending"
    );
    if let Some(k) = e.kernel {
        assert_eq!((k.split, k.whole_at_end), (0, SIZE / HP), "{k:?}");
    }
    // Direct punching released each given-back page, except what a take-back
    // brought back with it (a huge=always tmpfs backs a 4 KiB allocation in a
    // 2 MiB hole with a whole huge page).
    let d = &r.direct;
    assert_eq!(
        d.bytes_released + d.held_unused_bytes,
        (d.give_backs - d.take_backs) * 4096
    );
    if backend == Backend::GuestMemfd {
        assert_eq!(d.held_unused_bytes, 0);
    }
}

needs! { kvm_guest, guest_memfd;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn guest_memfd_pin_defers_everything_through_the_engine() {
        check_pin(Backend::GuestMemfd);
    }
}

needs! { kvm_guest, mount;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn thp_pin_defers_everything_through_the_engine() {
        check_pin(Backend::Thp);
    }
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
            backend: Backend::Memfd,
            size,
            vcpus,
            pattern: "ascending".parse().unwrap(),
            seed: 1,
        };
        let e = run(&opts, &|_, _, _| {}).unwrap_err().to_string();
        assert!(e.contains("2 MiB") || e.contains("vCPUs"), "{e}");
    }
}
