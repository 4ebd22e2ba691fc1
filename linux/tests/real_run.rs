//! `real::run` on small files: the two sides do what the method says and
//! the report serialises and prints.
#![cfg(target_os = "linux")]

hugepunch_probe::include_needs!();

use hugepunch_linux::real::run;
use hugepunch_linux::Backend;

const SIZE: u64 = 16 << 20;
const HUGE_PAGES: u64 = SIZE / (2 << 20);
const SUBPAGES: u64 = SIZE / 4096;

fn check_ascending(backend: Backend) {
    let r = run(backend, SIZE, "ascending").unwrap();
    assert_eq!(
        r.direct.punch_calls, SUBPAGES,
        "direct: one fallocate per 4 KiB"
    );
    assert_eq!(
        r.engine.punch_calls, HUGE_PAGES,
        "engine: one fallocate per huge page"
    );
    assert_eq!(r.direct.bytes_released, SIZE);
    assert_eq!(r.engine.bytes_released, SIZE);
    assert_eq!(r.direct.huge_pages_split, HUGE_PAGES);
    assert_eq!(r.engine.huge_pages_split, 0);
    assert_eq!(r.ratios.fallocate_calls, Some(512.0));
    assert_eq!(r.engine_stats.huge_frees, HUGE_PAGES);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["engine"]["punch_calls"], HUGE_PAGES);
    assert_eq!(json["engine_stats"]["huge_frees"], HUGE_PAGES);
}

#[test]
#[cfg_attr(miri, ignore)]
fn real_run_memfd_ascending() {
    check_ascending(Backend::Memfd);
}

needs! { guest_memfd;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn real_run_guest_memfd_ascending() {
        check_ascending(Backend::GuestMemfd);
    }
}

/// `pin` never completes a huge page: the engine releases nothing and holds
/// every punched subpage pending, the honest cost of deferral.
#[test]
#[cfg_attr(miri, ignore)]
fn real_run_pin_defers_everything() {
    let r = run(Backend::Memfd, SIZE, "pin").unwrap();
    assert_eq!(r.engine.bytes_released, 0);
    assert_eq!(r.engine.pending_bytes, SIZE - HUGE_PAGES * 4096);
    assert_eq!(r.direct.bytes_released, SIZE - HUGE_PAGES * 4096);
    assert_eq!(r.engine.fallocate_calls, 0);
    assert_eq!(r.ratios.fallocate_calls, None);
}

#[test]
#[cfg_attr(miri, ignore)]
fn real_run_rejects_unknown_pattern_and_bad_size() {
    assert!(run(Backend::Memfd, SIZE, "sideways").is_err());
    assert!(run(Backend::Memfd, SIZE + 4096, "ascending").is_err());
}
