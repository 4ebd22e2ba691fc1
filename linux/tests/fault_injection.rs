//! Failing frees on a real memfd lose nothing and free nothing twice
//! (CONTRACT.md §2 "A failed free", invariant 6): a [`Faulty`] host fails the
//! chosen `fallocate(PUNCH_HOLE)` calls before they reach the kernel, keeps a
//! ledger of what is allocated, and records any free of unallocated memory.
//! After every step the ledger, the engine and the kernel (`st_blocks`)
//! agree.
#![cfg(target_os = "linux")]

mod common;

use common::*;
use hugepunch::testing::{Action, Event, HookedHost};
use hugepunch::{Backing, ByteRange, Config, HostError, HugePunch, SubpageState};
use hugepunch_linux::replay::{engine_allocated_bytes, pattern, replay_engine};
use hugepunch_linux::{Backend, LinuxHost};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Something the ledger saw that must never happen.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Violation {
    /// A free covered a subpage that was not allocated.
    FreedUnallocated { range: ByteRange, subpage: u64 },
    /// An allocation covered a subpage that was already allocated.
    AllocatedTwice { range: ByteRange, subpage: u64 },
}

struct Ledger {
    /// One flag per subpage: allocated?
    allocated: Vec<bool>,
    free_calls: u64,
    injected: u64,
    violations: Vec<Violation>,
}

impl Ledger {
    fn subpages(r: ByteRange) -> std::ops::Range<usize> {
        r.first_subpage() as usize..(r.first_subpage() + r.subpages()) as usize
    }

    /// `range` is allocated (true) or freed (false) now.
    fn mark(&mut self, range: ByteRange, allocated: bool) {
        let subs = Self::subpages(range);
        if let Some(s) = subs.clone().find(|&s| self.allocated[s] == allocated) {
            self.violations.push(if allocated {
                Violation::AllocatedTwice {
                    range,
                    subpage: s as u64,
                }
            } else {
                Violation::FreedUnallocated {
                    range,
                    subpage: s as u64,
                }
            });
        }
        self.allocated[subs].iter_mut().for_each(|a| *a = allocated);
    }
}

/// The real host behind a hook that fails the frees `rule` chooses (`rule`
/// sees the free's number from 0, failed ones included, and its range;
/// a failed free never reaches the kernel) and keeps the ledger of a file
/// that starts fully allocated. The ledger follows every allocation and
/// free the hook lets through (the memfd's own never fail; if one did, the
/// ledger and `st_blocks` would disagree and the test would say so).
struct Faulty {
    host: Arc<HookedHost<LinuxHost>>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Faulty {
    fn new(
        inner: Arc<LinuxHost>,
        size: u64,
        rule: impl Fn(u64, ByteRange) -> Option<i32> + Send + Sync + 'static,
    ) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger {
            allocated: vec![true; (size / SUB) as usize],
            free_calls: 0,
            injected: 0,
            violations: Vec::new(),
        }));
        let host = HookedHost::new(inner);
        let l = ledger.clone();
        host.set(move |e| {
            let mut l = l.lock().unwrap_or_else(PoisonError::into_inner);
            match *e {
                Event::Free(range, _) => {
                    l.free_calls += 1;
                    if let Some(errno) = rule(l.free_calls - 1, range) {
                        l.injected += 1;
                        return Action::Fail(HostError { errno });
                    }
                    l.mark(range, false);
                }
                Event::Allocate(range, _) => l.mark(range, true),
                _ => {}
            }
            Action::Forward
        });
        Faulty { host, ledger }
    }

    /// Fail the free calls whose numbers (from 0) are in `calls`, with `EIO`.
    fn failing_calls(inner: Arc<LinuxHost>, size: u64, calls: Vec<u64>) -> Self {
        Self::new(inner, size, move |n, _| {
            calls.contains(&n).then_some(libc::EIO)
        })
    }

    /// A file of `cfg` over this host.
    fn engine(&self, cfg: Config) -> HugePunch {
        HugePunch::new(cfg, self.host.clone()).unwrap()
    }

    fn inner(&self) -> &LinuxHost {
        self.host.inner()
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frees the rule made fail.
    fn injected(&self) -> u64 {
        self.ledger().injected
    }

    /// Free calls seen (failed or not).
    fn free_calls(&self) -> u64 {
        self.ledger().free_calls
    }

    /// Everything the ledger caught (empty when all is well).
    fn violations(&self) -> Vec<Violation> {
        self.ledger().violations.clone()
    }

    /// Bytes allocated according to the ledger.
    fn allocated_bytes(&self) -> u64 {
        self.ledger().allocated.iter().filter(|&&a| a).count() as u64 * SUB
    }
}

fn agree(faulty: &Faulty, engine: &HugePunch, when: &str) {
    assert_accounting(faulty.inner(), engine, when);
    assert_eq!(
        faulty.allocated_bytes(),
        faulty.inner().resident_bytes().unwrap(),
        "{when}: ledger and kernel agree"
    );
    assert!(
        faulty.violations().is_empty(),
        "{when}: {:?}",
        faulty.violations()
    );
}

/// Completions whose free fails stay `Huge`, every subpage punched and
/// pending; `flush` frees them whole.
#[test]
#[cfg_attr(miri, ignore)]
fn failed_completions_stay_pending_and_flush_frees_them() {
    let inner = Arc::new(host(Backend::Memfd, SIZE));
    // Free calls 0 and 2: the completions of huge pages 0 and 2.
    let faulty = Faulty::failing_calls(inner.clone(), SIZE, vec![0, 2]);
    let engine = faulty.engine(Config::new(SIZE));
    replay_engine(&engine, &pattern("ascending", SIZE).unwrap());

    let s = engine.stats();
    assert_eq!(faulty.injected(), 2);
    assert_eq!(s.free_errors, 2);
    assert_eq!(s.huge_frees, 2);
    assert_eq!(
        s.pending_subpages,
        2 * 512,
        "the failed huge pages stay pending"
    );
    for h in [0, 2] {
        assert_eq!(engine.backing(h).unwrap(), Backing::Huge);
        assert!(engine.is_punched(h * HP).unwrap());
    }
    assert_eq!(
        inner.resident_bytes().unwrap(),
        2 * HP,
        "the failed frees reached no kernel"
    );
    agree(&faulty, &engine, "after the failed completions");

    engine.flush(0, SIZE).unwrap();
    let s = engine.stats();
    assert_eq!(
        s.huge_frees, 4,
        "flush freed the two failed huge pages whole"
    );
    assert_eq!(s.pending_subpages, 0);
    assert_eq!(inner.resident_bytes().unwrap(), 0);
    agree(&faulty, &engine, "after flush");
    assert!(engine.teardown().still_allocated.is_empty());
    assert_eq!(
        faulty.free_calls(),
        6,
        "four completions, two retries, nothing more"
    );
}

/// A teardown free that fails is reported, counted, and freed by the next
/// teardown.
#[test]
#[cfg_attr(miri, ignore)]
fn failed_teardown_free_is_reported_and_retried() {
    let inner = Arc::new(host(Backend::Memfd, SIZE));
    let armed = AtomicBool::new(true);
    let h1 = ByteRange::new(HP, HP);
    let faulty = Faulty::new(inner.clone(), SIZE, move |_, r| {
        (r == h1 && armed.swap(false, Ordering::Relaxed)).then_some(libc::ENOMEM)
    });
    let engine = faulty.engine(Config::new(SIZE));
    engine.punch(HP + 8 * SUB, 16 * SUB).unwrap();
    agree(&faulty, &engine, "before teardown");

    let report = engine.teardown();
    assert_eq!(report.still_allocated, vec![h1]);
    assert_eq!(engine.stats().free_errors, 1);
    assert_eq!(
        inner.resident_bytes().unwrap(),
        HP,
        "huge page 1 is still held"
    );
    assert_eq!(faulty.allocated_bytes(), HP);

    let again = engine.teardown();
    assert!(again.still_allocated.is_empty());
    assert_eq!(inner.resident_bytes().unwrap(), 0);
    assert_eq!(faulty.allocated_bytes(), 0);
    assert!(faulty.violations().is_empty(), "{:?}", faulty.violations());
}

/// With a budget of zero every partial punch is forced out as 4 KiB frees;
/// a failed 4 KiB free leaves its subpages present and zeroed, and
/// teardown frees them once.
#[test]
#[cfg_attr(miri, ignore)]
fn failed_small_free_leaves_zeroed_subpages_present() {
    let inner = Arc::new(host(Backend::Memfd, SIZE));
    let target = ByteRange::new(3 * HP + 100 * SUB, 2 * SUB);
    let faulty = Faulty::new(inner.clone(), SIZE, move |_, r| {
        (r == target).then_some(libc::EIO)
    });
    let engine = faulty.engine(Config::new(SIZE).budget(0));
    engine.punch(target.offset, target.len).unwrap();
    engine.punch(target.offset + 4 * SUB, SUB).unwrap();

    let s = engine.stats();
    assert_eq!(s.free_errors, 1);
    assert_eq!(
        s.pending_subpages, 0,
        "invariant 7: the budget of zero holds"
    );
    assert_eq!(engine.backing(3).unwrap(), Backing::Split);
    for o in [target.offset, target.offset + SUB] {
        assert_eq!(
            engine.subpage_state(o).unwrap(),
            SubpageState::Present,
            "the failed free left {o:#x} present"
        );
        assert!(
            subpage(&inner, o).iter().all(|&b| b == 0),
            "and it reads as zeros"
        );
    }
    assert_eq!(
        engine.subpage_state(target.offset + 4 * SUB).unwrap(),
        SubpageState::Absent
    );
    agree(&faulty, &engine, "after the failed 4 KiB free");
    assert_eq!(engine_allocated_bytes(&engine), SIZE - SUB);

    assert!(engine.teardown().still_allocated.is_empty());
    assert_eq!(inner.resident_bytes().unwrap(), 0);
    assert_eq!(faulty.allocated_bytes(), 0);
    assert!(faulty.violations().is_empty(), "{:?}", faulty.violations());
}

/// Every pattern with every third free failing: nothing lost, nothing freed
/// twice, and flush plus teardown release everything.
#[test]
#[cfg_attr(miri, ignore)]
fn every_third_free_failing_loses_nothing() {
    for name in hugepunch_linux::replay::PATTERNS {
        let inner = Arc::new(host(Backend::Memfd, SIZE));
        let faulty = Faulty::new(inner.clone(), SIZE, |n, _| {
            (n % 3 == 0).then_some(libc::EIO)
        });
        let engine = faulty.engine(Config::new(SIZE).budget(256 << 10));
        replay_engine(&engine, &pattern(name, SIZE).unwrap());
        agree(&faulty, &engine, &format!("{name}: after the replay"));
        assert_eq!(
            engine.stats().free_errors,
            faulty.injected(),
            "{name}: every failure counted"
        );
        engine.flush(0, SIZE).unwrap();
        agree(&faulty, &engine, &format!("{name}: after flush"));
        let mut rounds = 0;
        while !engine.teardown().still_allocated.is_empty() {
            rounds += 1;
            assert!(rounds < 16, "{name}: teardown retries converge");
        }
        assert_eq!(inner.resident_bytes().unwrap(), 0, "{name}: all freed");
        assert_eq!(faulty.allocated_bytes(), 0);
        assert!(
            faulty.violations().is_empty(),
            "{name}: {:?}",
            faulty.violations()
        );
    }
}
