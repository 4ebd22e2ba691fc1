//! The index scales with what is touched, not with the file's size, and
//! teardown of a populated file frees every huge page without allocating
//! tracking state for the ones nobody touched.

use hugepunch::{Attribute, ByteRange, Config, Error, Hint, Host, HostError, HugePunch};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counts whole frees; fails the frees of chosen huge pages (once each).
#[derive(Default)]
struct Frees {
    whole: AtomicU64,
    fail_page: AtomicU64,
    fails_left: AtomicU64,
}

impl Host for Frees {
    fn is_shared(&self, _: ByteRange) -> bool {
        true
    }
    fn set_attributes(&self, _: ByteRange, _: Attribute) {}
    fn invalidate_begin(&self, _: ByteRange, _: Hint) {}
    fn invalidate_end(&self, _: ByteRange) {}
    fn allocate(&self, _: ByteRange, _: u8) -> Result<(), HostError> {
        Ok(())
    }
    fn free(&self, r: ByteRange, order: u8) -> Result<(), HostError> {
        if r.offset == self.fail_page.load(Ordering::SeqCst) << 21
            && self.fails_left.load(Ordering::SeqCst) > 0
        {
            self.fails_left.fetch_sub(1, Ordering::SeqCst);
            return Err(HostError { errno: 5 });
        }
        if order == 9 {
            self.whole.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    fn zero(&self, _: ByteRange) {}
}

const TIB: u64 = 1 << 40;

#[test]
fn a_terabyte_file_touched_in_a_few_places_costs_a_few_chunks() {
    let host = Arc::new(Frees::default());
    let file = HugePunch::new(Config::new(TIB), host.clone()).unwrap();
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
    assert_eq!(host.whole.load(Ordering::SeqCst), 524_288);
    assert_eq!(file.stats().teardown_frees, 524_288);
    assert_eq!(file.stats().pending_subpages, 0);
    assert_eq!(
        file.tracking_bytes(),
        touched,
        "teardown allocated tracking state"
    );
}

#[test]
fn a_failed_free_of_an_untouched_huge_page_is_retried_by_the_next_teardown() {
    let host = Arc::new(Frees::default());
    host.fail_page.store(123_456, Ordering::SeqCst);
    host.fails_left.store(1, Ordering::SeqCst);
    let file = HugePunch::new(Config::new(TIB), host.clone()).unwrap();
    let report = file.teardown();
    assert_eq!(
        report.still_allocated,
        vec![ByteRange::new(123_456 << 21, 2 << 20)]
    );
    assert_eq!(file.stats().free_errors, 1);
    assert_eq!(host.whole.load(Ordering::SeqCst), 524_287);
    // Everything else is refused; the second teardown frees what is left.
    assert_eq!(file.punch(0, 4096), Err(Error::TornDown));
    assert!(file.teardown().still_allocated.is_empty());
    assert_eq!(host.whole.load(Ordering::SeqCst), 524_288);
    // A third teardown has nothing to do.
    assert!(file.teardown().still_allocated.is_empty());
    assert_eq!(host.whole.load(Ordering::SeqCst), 524_288);
    assert_eq!(file.stats().teardown_frees, 524_288);
}

#[test]
fn absurd_sizes_are_refused() {
    let host = Arc::new(Frees::default());
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
