//! Invariant 5 (CONTRACT.md §4).

use super::*;

/// The content of every subpage (one byte stands for its 4 KiB), kept by
/// a hook in front of a recording host: allocation gives zeros, `zero`
/// clears, a free that succeeds leaves garbage; the test writes.
#[derive(Clone)]
struct Content {
    inner: Arc<RecordingHost>,
    data: Arc<Mutex<Vec<u8>>>,
}

impl Content {
    /// A recording host for a file of `size` bytes, populated, and the
    /// hooked host (to give the engine) that keeps its content.
    fn host(size: u64, start: Attribute) -> (Self, Arc<HookedHost>) {
        let content = Content {
            inner: RecordingHost::new(size, start, true),
            data: Arc::new(Mutex::new(vec![0; (size / SUB) as usize])),
        };
        let host = HookedHost::new(content.inner.clone());
        let c = content.clone();
        // The hook runs before the recording host's callback, which fails
        // a free exactly when `fail_next_frees` is not 0 (and panics on a
        // double free): fill only the frees that are about to succeed.
        host.set(move |e| {
            match *e {
                Event::Allocate(r, _) | Event::Zero(r) => c.fill(r, 0),
                Event::Free(r, _) if c.inner.fail_next_frees.load(Ordering::SeqCst) == 0 => {
                    // Freed memory holds garbage as far as this file is concerned.
                    c.fill(r, 0xEE)
                }
                _ => {}
            }
            Action::Forward
        });
        (content, host)
    }

    fn write(&self, offset: u64, v: u8) {
        assert!(
            self.inner.is_resident(offset),
            "writing unallocated memory at {offset:#x}"
        );
        self.data.lock().unwrap()[(offset / SUB) as usize] = v;
    }
    fn read(&self, offset: u64) -> u8 {
        self.data.lock().unwrap()[(offset / SUB) as usize]
    }
    fn fill(&self, r: ByteRange, v: u8) {
        self.data.lock().unwrap()[(r.offset / SUB) as usize..(r.end() / SUB) as usize]
            .iter_mut()
            .for_each(|b| *b = v);
    }
}

/// A punched subpage that is populated again reads as zeros, and its
/// `zero` was called before `populate` returned; untouched neighbours keep
/// their data; a huge mapping never covers a punched subpage.
#[test]
fn invariant_5_repopulated_subpage_reads_as_zeros() {
    let order = 3u8;
    let per = 1u64 << order;
    let size = 2 * per * SUB;
    let (content, host) = Content::host(size, Attribute::Private);
    let inner = content.inner.clone();
    let e = HugePunch::new(Config::new(size).order(order), host).unwrap();
    for s in 0..size / SUB {
        content.write(s * SUB, 0xA0 + s as u8);
    }
    e.punch(2 * SUB, 3 * SUB).unwrap();
    assert_eq!(
        e.max_mapping_order(0),
        Ok(0),
        "a huge mapping would cover punched subpages"
    );
    assert_eq!(
        e.pending_ranges(0, size),
        Ok(vec![ByteRange::new(2 * SUB, 3 * SUB)])
    );
    inner.take_events();
    e.populate(0, 4 * SUB).unwrap();
    let ev = inner.take_events();
    let zeroed: Vec<u64> = ev
        .iter()
        .filter_map(|e| {
            if let Event::Zero(r) = e {
                Some(*r)
            } else {
                None
            }
        })
        .flat_map(|r| r.offset / SUB..r.end() / SUB)
        .collect();
    assert_eq!(
        zeroed,
        vec![2, 3],
        "invariant 5: populate must zero exactly the punched subpages it un-punches"
    );
    assert_eq!(
        content.read(2 * SUB),
        0,
        "invariant 5: stale data after populate"
    );
    assert_eq!(
        content.read(3 * SUB),
        0,
        "invariant 5: stale data after populate"
    );
    assert_eq!(content.read(SUB), 0xA1, "a present subpage was zeroed");
    assert_eq!(
        e.subpage_state(4 * SUB),
        Ok(SubpageState::Punched),
        "outside the range: still punched"
    );
    assert_eq!(e.stats().repopulated_subpages, 2);
    // Re-populating present memory does not zero it.
    e.populate(0, 4 * SUB).unwrap();
    assert!(!inner
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::Zero(_))));
    assert_eq!(content.read(SUB), 0xA1);
    // The last punched subpage, populated: whole again, huge mapping allowed.
    e.populate(4 * SUB, SUB).unwrap();
    assert_eq!(content.read(4 * SUB), 0);
    assert_eq!(e.max_mapping_order(0), Ok(order));
    // A Split huge page: punched subpages freed, repopulated as fresh (zero)
    // memory.
    let (e2, host2) = file(order, 1, Attribute::Shared, true, Some(0), Policy::Reject);
    e2.punch(SUB, SUB).unwrap();
    assert_eq!(e2.backing(0), Ok(Backing::Split));
    host2.take_events();
    e2.populate(0, per * SUB).unwrap();
    assert_eq!(
        host2.take_events(),
        vec![Event::Allocate(ByteRange::new(SUB, SUB), 0)]
    );
    assert_eq!(
        e2.backing(0),
        Ok(Backing::Split),
        "a Split huge page stays Split"
    );
    assert_eq!(e2.max_mapping_order(0), Ok(0));
}

/// A forced split whose 4 KiB free fails leaves the punched subpages
/// present: they must read as zeros.
#[test]
fn invariant_5_failed_small_free_leaves_zeros() {
    let order = 2u8;
    let (e, host) = file(order, 1, Attribute::Shared, true, None, Policy::Reject);
    e.punch(SUB, SUB).unwrap();
    host.take_events();
    host.fail_next_frees.store(1, Ordering::SeqCst);
    e.flush(0, SUB).unwrap();
    let ev = host.take_events();
    assert!(
        ev.contains(&Event::FreeFailed(ByteRange::new(SUB, SUB), 0)),
        "{ev:?}"
    );
    assert_eq!(e.subpage_state(SUB), Ok(SubpageState::Present));
    assert!(host.is_resident(SUB));
    assert!(
        ev.contains(&Event::Zero(ByteRange::new(SUB, SUB))),
        "invariant 5: punched data made present again unzeroed: {ev:?}"
    );
    assert_eq!(e.stats().free_errors, 1);
}

/// The same for a punch of a `Split` huge page whose 4 KiB free fails: the
/// subpage stays present (CONTRACT.md §2: "a failed 4 KiB free leaves those
/// subpages present"), so populate has nothing to un-punch, and the guest
/// that punched it would read its old content unless the engine zeroes it
/// when the free fails (as the forced split does).
#[test]
fn invariant_5_failed_split_punch_free_leaves_zeros() {
    let order = 2u8;
    let per = 1u64 << order;
    let size = per * SUB;
    let (content, host) = Content::host(size, Attribute::Shared);
    let inner = content.inner.clone();
    let e = HugePunch::new(Config::new(size).order(order), host).unwrap();
    for s in 0..per {
        content.write(s * SUB, 0xA0 + s as u8);
    }
    // Make huge page 0 Split: subpage 0 punched and force-split out.
    e.punch(0, SUB).unwrap();
    e.flush(0, SUB).unwrap();
    assert_eq!(e.backing(0), Ok(Backing::Split));
    inner.take_events();
    // Punch subpage 2; its free fails.
    inner.fail_next_frees.store(1, Ordering::SeqCst);
    e.punch(2 * SUB, SUB).unwrap();
    let ev = inner.take_events();
    assert!(
        ev.contains(&Event::FreeFailed(ByteRange::new(2 * SUB, SUB), 0)),
        "{ev:?}"
    );
    assert_eq!(
        e.subpage_state(2 * SUB),
        Ok(SubpageState::Present),
        "a failed 4 KiB free leaves the subpage present"
    );
    assert!(inner.is_resident(2 * SUB));
    // The guest faults it in again and reads it.
    e.populate(2 * SUB, SUB).unwrap();
    assert_eq!(
        content.read(2 * SUB),
        0,
        "invariant 5: a punched subpage whose free failed reads its old content after populate \
         (events of the punch: {ev:?})"
    );
}
