//! Test hosts and helpers shared by the engine's integration tests.
#![allow(dead_code)]

use hugepunch::trace::{Op, Trace};
use hugepunch::{
    Attribute, ByteRange, Config, Error, Hint, Host, HostError, HugePunch, Policy, SUBPAGE_SIZE,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One host callback, as a recording host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    IsShared(ByteRange),
    SetAttributes(ByteRange, Attribute),
    InvalidateBegin(ByteRange, Hint),
    InvalidateEnd(ByteRange),
    Allocate(ByteRange, u8),
    Free(ByteRange, u8),
    FreeFailed(ByteRange, u8),
    Zero(ByteRange),
}

/// A host that keeps attributes and memory residency per subpage, records
/// every callback, can fail frees on demand, and panics on a double free or
/// a double allocation (so tests see them as failures).
pub struct RecordingHost {
    pub attrs: Mutex<Vec<Attribute>>,
    /// Per subpage: is memory allocated for it?
    pub resident: Mutex<Vec<bool>>,
    pub events: Mutex<Vec<Event>>,
    /// Fail this many of the next frees.
    pub fail_next_frees: AtomicU64,
    pub record: bool,
}

impl RecordingHost {
    pub fn new(size: u64, start: Attribute, populated: bool) -> Arc<Self> {
        let n = (size / SUBPAGE_SIZE) as usize;
        Arc::new(RecordingHost {
            attrs: Mutex::new(vec![start; n]),
            resident: Mutex::new(vec![populated; n]),
            events: Mutex::new(Vec::new()),
            fail_next_frees: AtomicU64::new(0),
            record: true,
        })
    }

    /// Without the event log (for stress tests).
    pub fn quiet(size: u64, start: Attribute, populated: bool) -> Arc<Self> {
        let mut h = Arc::try_unwrap(Self::new(size, start, populated))
            .ok()
            .unwrap();
        h.record = false;
        Arc::new(h)
    }

    fn push(&self, e: Event) {
        if self.record {
            self.events.lock().unwrap().push(e);
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    pub fn resident_subpages(&self) -> u64 {
        self.resident.lock().unwrap().iter().filter(|&&r| r).count() as u64
    }

    pub fn is_resident(&self, offset: u64) -> bool {
        self.resident.lock().unwrap()[(offset / SUBPAGE_SIZE) as usize]
    }

    fn subs(r: ByteRange) -> std::ops::Range<usize> {
        (r.offset / SUBPAGE_SIZE) as usize..(r.end() / SUBPAGE_SIZE) as usize
    }
}

impl Host for RecordingHost {
    fn is_shared(&self, range: ByteRange) -> bool {
        self.push(Event::IsShared(range));
        self.attrs.lock().unwrap()[Self::subs(range)]
            .iter()
            .all(|a| *a == Attribute::Shared)
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        self.push(Event::SetAttributes(range, to));
        self.attrs.lock().unwrap()[Self::subs(range)]
            .iter_mut()
            .for_each(|a| *a = to);
    }

    fn invalidate_begin(&self, range: ByteRange, hint: Hint) {
        self.push(Event::InvalidateBegin(range, hint));
    }

    fn invalidate_end(&self, range: ByteRange) {
        self.push(Event::InvalidateEnd(range));
    }

    fn allocate(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        self.push(Event::Allocate(range, order));
        let mut res = self.resident.lock().unwrap();
        for s in Self::subs(range) {
            assert!(!res[s], "allocation of resident subpage {s:#x} ({range:?})");
            res[s] = true;
        }
        Ok(())
    }

    fn free(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        let fail = self
            .fail_next_frees
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            self.push(Event::FreeFailed(range, order));
            return Err(HostError { errno: 5 });
        }
        self.push(Event::Free(range, order));
        let mut res = self.resident.lock().unwrap();
        for s in Self::subs(range) {
            assert!(res[s], "double free of subpage {s:#x} ({range:?})");
            res[s] = false;
        }
        Ok(())
    }

    fn zero(&self, range: ByteRange) {
        self.push(Event::Zero(range));
    }
}

/// Parse the flags of an expected-figures key (`defaults`, `--budget 2M`,
/// `--policy cancel-and-zero`).
pub fn flags(key: &str) -> (Option<u64>, Policy) {
    let mut budget = None;
    let mut policy = Policy::Reject;
    let words: Vec<&str> = if key == "defaults" {
        vec![]
    } else {
        key.split_whitespace().collect()
    };
    for pair in words.chunks(2) {
        match pair {
            ["--budget", b] => budget = Some(hugepunch::trace::parse_number(b).expect("budget")),
            ["--policy", "cancel-and-zero"] => policy = Policy::CancelAndZero,
            ["--policy", "reject"] => policy = Policy::Reject,
            other => panic!("unknown flags {other:?}"),
        }
    }
    (budget, policy)
}

/// Replay a trace on a fresh engine and recording host.
pub fn replay(
    trace: &Trace,
    budget: Option<u64>,
    policy: Policy,
) -> (HugePunch, Arc<RecordingHost>, Vec<Result<(), Error>>) {
    let host = RecordingHost::new(trace.size, trace.start, trace.populated);
    let mut cfg = Config::new(trace.size).order(trace.order).policy(policy);
    cfg.populated = trace.populated;
    cfg.budget = budget;
    let engine = HugePunch::new(cfg, host.clone()).expect("valid config");
    let results = trace
        .ops
        .iter()
        .map(|(_, op)| match *op {
            Op::Punch { offset, len } => engine.punch(offset, len),
            Op::Convert { offset, len, to } => engine.convert(offset, len, to),
            Op::Populate { offset, len } => engine.populate(offset, len),
            Op::Flush { offset, len } => engine.flush(offset, len),
            Op::Teardown => {
                engine.teardown();
                Ok(())
            }
        })
        .collect();
    (engine, host, results)
}
