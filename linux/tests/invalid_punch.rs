//! The kernel selftests' invalid-punch matrix (tools/testing/selftests/kvm/
//! guest_memfd_test.c, `test_invalid_punch_hole` and the end-of-file cases
//! of `test_fallocate`), asked of the real fd and of hugepunch.
//!
//! hugepunch must refuse every case before any syscall (the backend counts
//! its fallocate calls, zeroes and invalidations: none may move) with
//! `InvalidRange` / EINVAL, changing nothing but `errors_invalid_range`
//! (invariant 8). Where the kernel differs, hugepunch is stricter on
//! purpose (CONTRACT.md §3):
//!
//! | case | guest_memfd | memfd (shmem) | hugepunch |
//! |---|---|---|---|
//! | unaligned offset or length | EINVAL | 0 (zeroes the partial pages) | EINVAL |
//! | zero length | EINVAL | EINVAL | EINVAL |
//! | starts at end of file | 0 (no-op) | 0 (no-op) | EINVAL |
//! | starts past end of file | 0 (no-op) | 0 (no-op) | EINVAL |
//! | runs past end of file | 0 (punches what is inside) | 0 | EINVAL |
//! | offset + len overflows | EFBIG | EFBIG | EINVAL |
#![cfg(target_os = "linux")]

hugepunch_probe::include_needs!();

mod common;

use common::*;
use hugepunch::{Config, Error, HugePunch, EINVAL};
use hugepunch_linux::{Backend, LinuxHost};
use std::sync::Arc;

const PAGE: u64 = 4096;

/// (offset, len, what the kernel answers on guest_memfd, on memfd).
fn matrix(size: u64) -> Vec<(u64, u64, i32, i32)> {
    let efbig = libc::EFBIG;
    vec![
        // test_invalid_punch_hole
        (0, 1, EINVAL, 0),
        (0, PAGE - 1, EINVAL, 0),
        (0, PAGE + 1, EINVAL, 0),
        (1, 1, EINVAL, 0),
        (1, PAGE - 1, EINVAL, 0),
        (1, PAGE, EINVAL, 0),
        (1, PAGE + 1, EINVAL, 0),
        (PAGE, 1, EINVAL, 0),
        (PAGE, PAGE - 1, EINVAL, 0),
        (PAGE, PAGE + 1, EINVAL, 0),
        // test_fallocate: at and after the end of the file
        (size, PAGE, 0, 0),
        (size + PAGE, PAGE, 0, 0),
        // and the ones hugepunch adds
        (0, 0, EINVAL, EINVAL),
        (size - PAGE, 2 * PAGE, 0, 0),
        (i64::MAX as u64 - PAGE + 1, 2 * PAGE, efbig, efbig),
    ]
}

fn check(backend: Backend) {
    let host = host(backend.clone(), SIZE);
    let host = Arc::new(host);
    let engine = HugePunch::new(Config::new(SIZE), host.clone()).unwrap();
    let cases = matrix(SIZE);

    // hugepunch first, on the intact file: nothing reaches the kernel.
    for &(offset, len, _, _) in &cases {
        let counts = host.counts();
        let mut stats = engine.stats();
        let err = engine.punch(offset, len).unwrap_err();
        assert_eq!(err, Error::InvalidRange { offset, len });
        assert_eq!(err.errno(), EINVAL);
        assert_eq!(
            host.counts(),
            counts,
            "punch({offset:#x}, {len:#x}) made a syscall or a callback"
        );
        stats.errors_invalid_range += 1;
        assert_eq!(
            engine.stats(),
            stats,
            "punch({offset:#x}, {len:#x}) changed more than its error counter"
        );
    }
    assert_eq!(host.resident_bytes().unwrap(), SIZE, "nothing was freed");

    // Then the kernel's own answers on the same fd.
    for &(offset, len, gmem, memfd) in &cases {
        let want = if backend == Backend::GuestMemfd {
            gmem
        } else {
            memfd
        };
        let got = host.raw_punch(offset, len).err().unwrap_or(0);
        eprintln!(
            "{backend}: fallocate(PUNCH_HOLE, {offset:#x}, {len:#x}) = {got}, hugepunch: EINVAL"
        );
        assert_eq!(
            got, want,
            "{backend}: the kernel answered {got} to ({offset:#x}, {len:#x})"
        );
    }
}

#[test]
#[cfg_attr(miri, ignore)]
fn memfd_invalid_punches_rejected_before_any_syscall() {
    check(Backend::Memfd);
}

needs! { guest_memfd;
    #[test]
    #[cfg_attr(miri, ignore)]
    fn guest_memfd_invalid_punches_rejected_before_any_syscall() {
        check(Backend::GuestMemfd);
    }
}

/// A VMM that must answer as the kernel does clips a punch to the file
/// first; the clipped punch reaches the kernel and frees what is inside.
#[test]
#[cfg_attr(miri, ignore)]
fn memfd_clipped_punch_past_eof_frees_what_is_inside() {
    let host = Arc::new(LinuxHost::memfd(SIZE, Default::default()).unwrap());
    host.populate_all().unwrap();
    let engine = HugePunch::new(Config::new(SIZE), host.clone()).unwrap();
    let (offset, len) = (SIZE - HP, 2 * HP);
    assert!(engine.punch(offset, len).is_err());
    let clipped = len.min(SIZE.saturating_sub(offset));
    engine.punch(offset, clipped).unwrap();
    assert_eq!(host.resident_bytes().unwrap(), SIZE - HP);
    assert_eq!(host.counts().punch_calls, 1);
}
