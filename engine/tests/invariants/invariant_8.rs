//! Invariant 8 (CONTRACT.md §4).

use super::*;

/// The bad-range matrix, plus empty, overflowing and
/// past-the-end ranges, for a file of `size` bytes.
fn bad_ranges(size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 1),
        (0, 4095),
        (0, 4097),
        (1, 1),
        (1, 4095),
        (1, 4096),
        (1, 4097),
        (4096, 1),
        (4096, 4095),
        (4096, 4097),
        (0, 0),
        (4096, 0),
        (size, 0),
        (u64::MAX - 4095, 8192),
        (8192, u64::MAX - 4095),
        (u64::MAX - 4095, 4096),
        (size, 4096),
        (size - 4096, 8192),
        (0, size + 4096),
    ]
}

/// Bad offsets for the one-subpage queries.
fn bad_offsets(size: u64) -> Vec<u64> {
    vec![1, 4095, 4097, size, size + 4096, u64::MAX, u64::MAX - 4095]
}

/// A file in a mixed state: punched, Split (with absent subpages), Absent,
/// private and shared subpages.
fn mixed_file() -> (HugePunch, Arc<RecordingHost>) {
    let order = 2u8;
    let hp = SUB << order;
    let (e, host) = file(order, 4, Attribute::Private, true, None, Policy::Reject);
    e.convert(hp, hp, Attribute::Shared).unwrap();
    e.punch(SUB, SUB).unwrap();
    e.punch(hp + 2 * SUB, SUB).unwrap();
    e.punch(2 * hp, SUB).unwrap();
    e.flush(2 * hp, SUB).unwrap();
    e.punch(3 * hp, hp).unwrap();
    assert_eq!(
        backings(&e),
        vec![
            Backing::Huge,
            Backing::Huge,
            Backing::Split,
            Backing::Absent
        ]
    );
    host.take_events();
    (e, host)
}

/// Every `InvalidRange` leaves everything as it was but
/// `errors_invalid_range`: no host event, same stats, same subpage states,
/// same attributes and residency.
#[test]
fn invariant_8_bad_input_changes_nothing() {
    let (e, host) = mixed_file();
    let size = e.size();
    let mut expected_errors = e.stats().errors_invalid_range;
    // Read-only queries move no counter, even when they fail (CONTRACT.md §6:
    // a VMM may poll them freely); every other call counts its error.
    let mut check = |what: String, res: Result<(), Error>, want: Error| {
        assert_eq!(res, Err(want), "{what}");
        assert_eq!(res.unwrap_err().errno(), EINVAL, "{what}: errno");
        let query = ["pending_ranges", "subpage_state", "is_punched"]
            .iter()
            .any(|q| what.starts_with(q));
        if !query {
            expected_errors += 1;
        }
        assert_eq!(
            e.stats().errors_invalid_range,
            expected_errors,
            "{what}: errors_invalid_range"
        );
    };
    let base_stats = e.stats();
    let base_states = states(&e);
    let base_attrs = host.attrs.lock().unwrap().clone();
    let base_resident = host.resident.lock().unwrap().clone();
    for (o, l) in bad_ranges(size) {
        let want = Error::InvalidRange { offset: o, len: l };
        check(format!("punch({o:#x}, {l:#x})"), e.punch(o, l), want);
        check(
            format!("convert({o:#x}, {l:#x}, private)"),
            e.convert(o, l, Attribute::Private),
            want,
        );
        check(
            format!("convert({o:#x}, {l:#x}, shared)"),
            e.convert(o, l, Attribute::Shared),
            want,
        );
        check(format!("populate({o:#x}, {l:#x})"), e.populate(o, l), want);
        check(format!("flush({o:#x}, {l:#x})"), e.flush(o, l), want);
        check(
            format!("pending_ranges({o:#x}, {l:#x})"),
            e.pending_ranges(o, l).map(|_| ()),
            want,
        );
    }
    for o in bad_offsets(size) {
        let want = Error::InvalidRange {
            offset: o,
            len: SUB,
        };
        check(
            format!("subpage_state({o:#x})"),
            e.subpage_state(o).map(|_| ()),
            want,
        );
        check(
            format!("is_punched({o:#x})"),
            e.is_punched(o).map(|_| ()),
            want,
        );
    }
    for h in [e.huge_pages(), e.huge_pages() + 1, u64::MAX] {
        assert!(
            matches!(e.backing(h), Err(Error::InvalidRange { .. })),
            "backing({h})"
        );
        assert!(
            matches!(e.max_mapping_order(h), Err(Error::InvalidRange { .. })),
            "max_mapping_order({h})"
        );
    }
    let after = e.stats();
    assert_eq!(
        after.errors_invalid_range, expected_errors,
        "queries count no error"
    );
    assert_eq!(
        without(after, "errors_invalid_range"),
        without(base_stats, "errors_invalid_range"),
        "invariant 8: stats moved"
    );
    assert_eq!(
        host.events(),
        vec![],
        "invariant 8: a bad range reached the host"
    );
    assert_eq!(
        states(&e),
        base_states,
        "invariant 8: subpage states changed"
    );
    assert_eq!(*host.attrs.lock().unwrap(), base_attrs);
    assert_eq!(*host.resident.lock().unwrap(), base_resident);
}

/// After teardown, every operation but teardown is `TornDown` (EIO), ahead
/// of `InvalidRange`, and changes nothing but `errors_torn_down`; a second
/// teardown is no error and does nothing.
#[test]
fn invariant_8_torn_down_takes_precedence_and_changes_nothing() {
    let (e, host) = mixed_file();
    let size = e.size();
    e.teardown();
    assert_eq!(host.resident_subpages(), 0);
    host.take_events();
    let base = e.stats();
    let mut n = 0;
    // Read-only queries move no counter, even when they fail (CONTRACT.md §6).
    let mut check = |what: String, res: Result<(), Error>| {
        assert_eq!(res, Err(Error::TornDown), "{what}");
        assert_eq!(res.unwrap_err().errno(), EIO);
        let query = [
            "pending_ranges",
            "subpage_state",
            "is_punched",
            "backing",
            "max_mapping_order",
        ]
        .iter()
        .any(|q| what.starts_with(q));
        if !query {
            n += 1;
        }
    };
    let mut ranges = bad_ranges(size);
    ranges.extend([(0, SUB), (0, size), (SUB << 2, SUB << 2)]);
    for (o, l) in ranges {
        check(format!("punch({o:#x}, {l:#x})"), e.punch(o, l));
        check(
            format!("convert({o:#x}, {l:#x}, private)"),
            e.convert(o, l, Attribute::Private),
        );
        check(
            format!("convert({o:#x}, {l:#x}, shared)"),
            e.convert(o, l, Attribute::Shared),
        );
        check(format!("populate({o:#x}, {l:#x})"), e.populate(o, l));
        check(format!("flush({o:#x}, {l:#x})"), e.flush(o, l));
        check(
            format!("pending_ranges({o:#x}, {l:#x})"),
            e.pending_ranges(o, l).map(|_| ()),
        );
    }
    for o in bad_offsets(size).into_iter().chain([0, SUB]) {
        check(
            format!("subpage_state({o:#x})"),
            e.subpage_state(o).map(|_| ()),
        );
        check(format!("is_punched({o:#x})"), e.is_punched(o).map(|_| ()));
    }
    for h in [0, 1, e.huge_pages(), u64::MAX] {
        check(format!("backing({h})"), e.backing(h).map(|_| ()));
        check(
            format!("max_mapping_order({h})"),
            e.max_mapping_order(h).map(|_| ()),
        );
    }
    let after = e.stats();
    assert_eq!(after.errors_torn_down, base.errors_torn_down + n);
    assert_eq!(
        without(after, "errors_torn_down"),
        without(base, "errors_torn_down"),
        "invariant 8: stats moved after teardown"
    );
    assert!(
        host.events().is_empty(),
        "invariant 8: a refused call reached the host: {:?}",
        host.events()
    );
    // A second teardown: no error, nothing done.
    assert!(e.teardown().still_allocated.is_empty());
    assert!(host.events().is_empty());
    assert_eq!(e.stats(), after);
}

/// The errno of each error an operation returns (CONTRACT.md §3).
#[test]
fn invariant_8_errno_mapping() {
    let (e, _host) = file(2, 1, Attribute::Shared, true, None, Policy::Reject);
    let invalid = e.punch(1, SUB).unwrap_err();
    assert!(matches!(
        invalid,
        Error::InvalidRange {
            offset: 1,
            len: 4096
        }
    ));
    assert_eq!((invalid.errno(), EINVAL), (22, 22));
    e.punch(0, SUB).unwrap();
    let pending = e.convert(0, SUB, Attribute::Private).unwrap_err();
    assert_eq!(pending, Error::PendingPunch { offset: 0 });
    assert_eq!((pending.errno(), EAGAIN), (11, 11));
    e.teardown();
    let torn = e.punch(0, SUB).unwrap_err();
    assert_eq!(torn, Error::TornDown);
    assert_eq!((torn.errno(), EIO), (5, 5));
}
