//! [`RecordingHost`]: a host that keeps per-subpage attributes and
//! residency in memory and records every callback as an [`Event`].

use crate::{Attribute, ByteRange, Hint, Host, HostError, SUBPAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One host callback, as a recording host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// [`Host::is_shared`] of the range.
    IsShared(ByteRange),
    /// [`Host::set_attributes`] of the range to the attribute.
    SetAttributes(ByteRange, Attribute),
    /// [`Host::invalidate_begin`] of the range, with its hint.
    InvalidateBegin(ByteRange, Hint),
    /// [`Host::invalidate_end`] of the range.
    InvalidateEnd(ByteRange),
    /// [`Host::allocate`] of the range at the order.
    Allocate(ByteRange, u8),
    /// A successful [`Host::free`] of the range at the order.
    Free(ByteRange, u8),
    /// A [`Host::free`] of the range at the order that the host failed
    /// (see [`RecordingHost::fail_next_frees`]).
    FreeFailed(ByteRange, u8),
    /// [`Host::zero`] of the range.
    Zero(ByteRange),
}

/// A host that keeps attributes and memory residency per subpage, records
/// every callback, can fail frees on demand, and panics on a double free or
/// a double allocation (so tests see them as failures).
///
/// It holds one entry per subpage of the file: for small files only.
pub struct RecordingHost {
    /// Per subpage: its attribute.
    pub attrs: Mutex<Vec<Attribute>>,
    /// Per subpage: is memory allocated for it?
    pub resident: Mutex<Vec<bool>>,
    /// Every callback so far, in order (when [`RecordingHost::record`]).
    pub events: Mutex<Vec<Event>>,
    /// Fail this many of the next frees.
    pub fail_next_frees: AtomicU64,
    /// Whether callbacks are recorded in [`RecordingHost::events`].
    pub record: bool,
}

impl RecordingHost {
    /// A host for a file of `size` bytes whose subpages start with
    /// attribute `start`, resident when `populated`; recording.
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

    /// A copy of the events recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The events recorded so far, leaving the log empty.
    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    /// The number of resident subpages.
    pub fn resident_subpages(&self) -> u64 {
        self.resident.lock().unwrap().iter().filter(|&&r| r).count() as u64
    }

    /// Whether the subpage at byte `offset` is resident.
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
        // ORDERING: Relaxed: a test knob, set between operations by the
        // thread that then runs them; it publishes nothing.
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
