//! The index scales with what is touched, not with the file's size, and
//! teardown of a populated file frees every huge page without allocating
//! tracking state for the ones nobody touched.

use hugepunch::testing::{Action, Event, HookedHost, NullHost};
use hugepunch::{ByteRange, Config, Error, HostError, HugePunch};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A null host that counts whole (2 MiB) frees, returned beside it, and
/// fails the first `fails` frees of huge page `fail_page`.
fn counting_host(fail_page: u64, fails: u64) -> (Arc<HookedHost<NullHost>>, Arc<AtomicU64>) {
    let whole_frees = Arc::new(AtomicU64::new(0));
    let fails_left = AtomicU64::new(fails);
    let host = HookedHost::new(Arc::new(NullHost));
    let counted = whole_frees.clone();
    host.set(move |e| match *e {
        Event::Free(r, _)
            if r.offset == fail_page << 21 && fails_left.load(Ordering::SeqCst) > 0 =>
        {
            fails_left.fetch_sub(1, Ordering::SeqCst);
            Action::Fail(HostError { errno: 5 })
        }
        Event::Free(_, order) => {
            if order == 9 {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            Action::Forward
        }
        _ => Action::Forward,
    });
    (host, whole_frees)
}

const TIB: u64 = 1 << 40;

#[test]
fn a_terabyte_file_touched_in_a_few_places_costs_a_few_chunks() {
    let (host, whole_frees) = counting_host(0, 0);
    let file = HugePunch::new(Config::new(TIB), host).unwrap();
    let before = file.tracking_bytes();
    assert!(
        before < 64 << 10,
        "an untouched 1 TiB file costs {before} bytes"
    );
    for h in [0u64, 1, 300_000, 524_287] {
        file.punch(h << 21, 4096).unwrap();
    }
    let touched = file.tracking_bytes();
    assert!(
        touched < 256 << 10,
        "four touched huge pages cost {touched} bytes"
    );
    assert_eq!(file.stats().pending_subpages, 4);

    // Teardown frees all 524288 huge pages, without installing chunks.
    let report = file.teardown();
    assert!(report.still_allocated.is_empty());
    assert_eq!(whole_frees.load(Ordering::SeqCst), 524_288);
    assert_eq!(file.stats().teardown_frees, 524_288);
    assert_eq!(file.stats().pending_subpages, 0);
    assert_eq!(
        file.tracking_bytes(),
        touched,
        "teardown allocated tracking state"
    );
}

/// Punching never-touched huge pages of an empty file (nothing allocated)
/// is a no-op that allocates no tracking state either.
#[test]
fn punching_an_empty_file_allocates_no_tracking_state() {
    let (host, _) = counting_host(0, 0);
    let file = HugePunch::new(Config::new(TIB).empty(), host).unwrap();
    let before = file.tracking_bytes();
    for h in [0u64, 1, 300_000, 524_287] {
        file.punch(h << 21, 4096).unwrap();
        file.punch(h << 21, 2 << 20).unwrap();
    }
    assert_eq!(
        file.tracking_bytes(),
        before,
        "a punch of Absent memory installed chunks"
    );
    assert_eq!(file.stats().pending_subpages, 0);
    assert_eq!(file.stats().punch_calls, 8);
}

#[test]
fn a_failed_free_of_an_untouched_huge_page_is_retried_by_the_next_teardown() {
    let (host, whole_frees) = counting_host(123_456, 1);
    let file = HugePunch::new(Config::new(TIB), host).unwrap();
    let report = file.teardown();
    assert_eq!(
        report.still_allocated,
        vec![ByteRange::new(123_456 << 21, 2 << 20)]
    );
    assert_eq!(file.stats().free_errors, 1);
    assert_eq!(whole_frees.load(Ordering::SeqCst), 524_287);
    // Everything else is refused; the second teardown frees what is left.
    assert_eq!(file.punch(0, 4096), Err(Error::TornDown));
    assert!(file.teardown().still_allocated.is_empty());
    assert_eq!(whole_frees.load(Ordering::SeqCst), 524_288);
    // A third teardown has nothing to do.
    assert!(file.teardown().still_allocated.is_empty());
    assert_eq!(whole_frees.load(Ordering::SeqCst), 524_288);
    assert_eq!(file.stats().teardown_frees, 524_288);
}

#[test]
fn absurd_sizes_are_refused() {
    let (host, _) = counting_host(0, 0);
    let Err(e) = HugePunch::new(Config::new(1 << 62), host.clone()) else {
        panic!("a 4 EiB file was accepted");
    };
    assert!(matches!(
        e,
        Error::InvalidGeometry {
            size: 0x4000_0000_0000_0000,
            order: 9,
            ..
        }
    ));
    assert_eq!(
        e.to_string(),
        "invalid geometry: size 4611686018427387904 bytes (4096 PiB), huge page order 9 \
         (2 MiB huge pages): the size must be at most 4 PiB"
    );
    assert!(HugePunch::new(Config::new(1 << 52), host).is_ok());
}
