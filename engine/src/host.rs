//! The host interface (CONTRACT.md §2.2) and the slot that lets the host
//! and the policy be replaced while other threads punch.

use crate::error::HostError;
use crate::range::{ByteRange, Hint};
use crate::sync::{AtomicPtr, Ordering};
use serde::{Deserialize, Serialize};

/// A subpage's memory attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Attribute {
    /// Private (encrypted) guest memory: mapped from this file.
    Private,
    /// Shared with the host: in the seed's model, backed elsewhere.
    Shared,
}

/// What a conversion to private does over pending punches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Policy {
    /// Refuse the whole conversion with [`Error::PendingPunch`](crate::Error::PendingPunch)
    /// (the seed's rule, and the default).
    #[default]
    Reject,
    /// Un-punch (and zero) the pending subpages, then convert.
    CancelAndZero,
}

/// What the engine acts on memory through: the kernel model and the Linux
/// backend are two hosts.
///
/// # What a callback may do
///
/// * **Block**: yes, every callback may block (take locks, sleep, do I/O).
///   The engine calls the host under no lock of its own, with one
///   exception: `flush` and teardown (the slow paths) serialise on the
///   file's slow-path mutex and call the host under it, as
///   `docs/CONTRACT.md` §5.4 allows; a blocked callback there delays
///   another `flush` or teardown, never a punch (no punch takes that
///   mutex: the shrinker a punch runs takes no lock). Otherwise the only
///   engine state a callback can be "inside" is a per-huge-page mark (a
///   completion, an un-punch, a forced split or another slow path in
///   flight), which delays only the operations on that huge page that
///   wait for such a mark (`docs/CONTRACT.md` §5.2): a `populate` meeting
///   a completion or an un-punch, any operation meeting a slow path.
/// * **Re-enter the engine**: only through the read-only calls
///   ([`HugePunch::stats`](crate::HugePunch::stats),
///   [`HugePunch::max_mapping_order`](crate::HugePunch::max_mapping_order),
///   [`HugePunch::backing`](crate::HugePunch::backing)). A callback must not
///   call `punch`, `convert`, `populate`, `flush`, `teardown`, `is_punched`,
///   `subpage_state` or `pending_ranges` on the same file: `zero` and
///   `free` run while the huge page is marked, and those calls may wait
///   for the mark to go, which would never happen.
/// * **Panic**: a panicking callback counts as a *failed* call, and the
///   operation runs to its end exactly as it would have with that failure;
///   then, once its statistics are applied, the first panic propagates to
///   the engine's caller. What "failed" means for each callback is said on
///   it below. So a panic never makes the engine free twice, free a subpage
///   that is not punched, or leave its statistics apart from its bitmaps
///   (`pending_subpages` is the number of punched subpages at every
///   quiescent point), and teardown still accounts for every byte (what it
///   could not free is freed by the next `teardown`). The engine calls no
///   callback while it unwinds (it never unwinds through its own state), so
///   a second panic cannot abort the process; and an `invalidate_begin`
///   that returned is always followed by its `invalidate_end`, also when a
///   `free` inside the bracket panicked.
pub trait Host: Send + Sync {
    /// The shared-state check: is every subpage of `range` in a state where
    /// no mapping of it backed by this file can exist? (In the seed's model:
    /// is all of it shared?) Answering `false` is always safe; it costs an
    /// immediate invalidation.
    ///
    /// Called on the punch path with no engine mark held: may block; may
    /// call the engine's read-only functions. A panic counts as `false`:
    /// the punch invalidates the range now (its bits stay pending).
    fn is_shared(&self, range: ByteRange) -> bool;

    /// Change the attribute of `range`. Called by `convert` once the engine
    /// has decided the conversion may go ahead; for a conversion to
    /// private, while it still marks the range as converting (a conversion
    /// to shared takes no mark).
    ///
    /// May block. A conversion to private runs it while its marks are
    /// held (concurrent punches of the range then invalidate at once): must
    /// not call the engine's mutating functions on this file. A panic
    /// counts as an attribute that did not change; the engine releases its
    /// marks, and what it decided stands (the conversion counts as
    /// `conversions_ok`; subpages a `CancelAndZero` conversion un-punched
    /// stay un-punched and zeroed).
    fn set_attributes(&self, range: ByteRange, to: Attribute);

    /// Zap every mapping of `range` (a KVM MMU invalidation). `hint` names
    /// the huge page backing it and its order. Paired with
    /// [`invalidate_end`](Host::invalidate_end) on the same range.
    ///
    /// May block (this is where a VMM waits for its vCPUs to leave the
    /// range). May run while a completion, a forced split or teardown owns
    /// the huge page: must not call the engine's mutating functions on this
    /// file. A panic counts as an invalidation that did not happen: nothing
    /// is freed under it (a completion or a teardown free stays pending or
    /// allocated, a forced split is abandoned, a punch of a `Split` huge
    /// page keeps its subpages present and zeroes them).
    fn invalidate_begin(&self, range: ByteRange, hint: Hint);

    /// End of the invalidation of `range`. Same rules as
    /// [`invalidate_begin`](Host::invalidate_begin), except that a panic
    /// counts as an invalidation that happened (its `begin` returned): what
    /// was freed under it stays freed, once.
    fn invalidate_end(&self, range: ByteRange);

    /// Allocate backing for `range`: a whole huge page (`order` = the file's
    /// order) or a run of 4 KiB subpages (`order` = 0).
    ///
    /// May block. Runs while the huge page is `BUSY`: must not call the
    /// engine's mutating functions on this file. `Err` fails the populate
    /// with [`Error::AllocationFailed`](crate::Error::AllocationFailed);
    /// a panic counts as a failed allocation (the huge page or subpages stay
    /// absent).
    fn allocate(&self, range: ByteRange, order: u8) -> Result<(), HostError>;

    /// Return `range` to the system: a whole huge page (`order` = the
    /// file's order) or a run of 4 KiB subpages (`order` = 0). On `Err`
    /// the engine keeps the memory recorded as allocated and retries later
    /// (`flush`, the shrinker, teardown); it never assumes a failed free
    /// freed anything.
    ///
    /// May block. Runs while the huge page is owned (completion, forced
    /// split, teardown): must not call the engine's mutating functions on
    /// this file. A panic counts as a failed free (`free_errors`; the
    /// memory stays allocated and is retried later).
    fn free(&self, range: ByteRange, order: u8) -> Result<(), HostError>;

    /// Zero `range` (subpages being un-punched), before anyone can read it.
    ///
    /// May block. Runs while the populate is registered on the huge page
    /// (a completion of it waits): must not call the engine's mutating
    /// functions on this file. A panic counts as memory that was not zeroed:
    /// an un-punch leaves those subpages punched (pending, counted), and a
    /// `CancelAndZero` conversion over them does not go ahead (it counts as
    /// refused). A subpage left present by a failed 4 KiB free whose `zero`
    /// then panics keeps its old content (both calls failed: the punch
    /// reports the panic).
    fn zero(&self, range: ByteRange);
}

/// One whole set of callbacks: what an operation uses from start to end.
#[derive(Clone)]
pub(crate) struct Callbacks {
    #[allow(clippy::disallowed_types)] // the public API's `Arc`: std's, also under loom
    pub host: std::sync::Arc<dyn Host>,
    pub policy: Policy,
    /// `Arc::as_ptr(&host)`, computed once: calling through it skips the
    /// pointer arithmetic from the `Arc`'s allocation to the host on every
    /// callback.
    direct: *const dyn Host,
}

// SAFETY: `direct` points into `host`'s allocation, which is `Send + Sync`
// (`Host: Send + Sync`) and kept alive by `host` for as long as the set is.
unsafe impl Send for Callbacks {}
// SAFETY: as for `Send`: shared access only calls `&self` methods of the host.
unsafe impl Sync for Callbacks {}

impl Callbacks {
    #[allow(clippy::disallowed_types)] // the public API's `Arc`: std's, also under loom
    pub fn new(host: std::sync::Arc<dyn Host>, policy: Policy) -> Self {
        let direct = std::sync::Arc::as_ptr(&host);
        Callbacks {
            host,
            policy,
            direct,
        }
    }

    /// The host.
    #[inline(always)]
    pub fn host(&self) -> &dyn Host {
        // SAFETY: `direct` is `Arc::as_ptr(&self.host)` (clones copy both
        // together), and `self.host` keeps that allocation alive while
        // `self` is borrowed.
        unsafe { &*self.direct }
    }
}

/// The swappable slot: the set in use is one `AtomicPtr` to an immutable
/// node, and every set ever installed stays allocated until the slot (the
/// file) is dropped, on a chain from the newest node back to the first.
///
/// So a load is one `Acquire` load of a pointer and hands out a plain
/// `&Callbacks` for as long as the file is borrowed: no reference count, no
/// debt slot, no write to a shared cache line (the arc-swap load
/// it replaces cost ~35 instructions and two stores per operation). The
/// price: a replaced set (its `Arc<dyn Host>` included) lives until the file
/// is dropped, one node of 40 bytes per `set_host` / `set_policy` call,
/// which a VMM makes a handful of times in a file's life. The same code
/// runs under loom (its `AtomicPtr` comes from [`crate::sync`]), so the
/// models check the slot itself.
///
/// A replacement applies to every operation that loads after it in the
/// pointer's modification order: an operation that starts after
/// `set_host` returned (on the same thread, or on one that synchronised
/// with it) loads the new set or a later one (read-write coherence).
pub(crate) struct CallbackSlot {
    current: AtomicPtr<SlotNode>,
}

struct SlotNode {
    cb: Callbacks,
    /// The set this one replaced (null for the first); never changed.
    prev: *mut SlotNode,
}

// SAFETY: the raw pointers point to `SlotNode`s owned by the slot, holding
// `Callbacks` (Send + Sync), written only before they are published and
// freed only in `drop`, which has exclusive access.
unsafe impl Send for CallbackSlot {}
// SAFETY: see `Send`; shared access only reads through the pointers.
unsafe impl Sync for CallbackSlot {}

impl CallbackSlot {
    pub fn new(cb: Callbacks) -> Self {
        let node = Box::into_raw(Box::new(SlotNode {
            cb,
            prev: std::ptr::null_mut(),
        }));
        CallbackSlot {
            current: AtomicPtr::new(node),
        }
    }

    /// One consistent set of callbacks for one operation.
    #[inline]
    pub fn load(&self) -> &Callbacks {
        // ORDERING: Acquire pairs with the Release of `update`'s CAS, so
        // the node's fields, written before it was published, are seen
        // whole (never a torn set).
        let p = self.current.load(Ordering::Acquire);
        // SAFETY: `p` was published by `new` or `update` from a live Box,
        // and every node stays allocated until the slot is dropped, which
        // cannot happen while `&self` is borrowed.
        unsafe { &(*p).cb }
    }

    /// Replace one part of the set; concurrent updates are not lost.
    pub fn update(&self, f: impl Fn(&Callbacks) -> Callbacks) {
        // ORDERING: Acquire, as in `load`: we read the current set's fields
        // to build the next.
        let mut cur = self.current.load(Ordering::Acquire);
        loop {
            // SAFETY: as in `load`.
            let current = unsafe { &(*cur).cb };
            let next = Box::into_raw(Box::new(SlotNode {
                cb: f(current),
                prev: cur,
            }));
            // ORDERING: Release (in AcqRel) publishes `next`'s fields to
            // `load`'s Acquire; Acquire on failure: we read the set that
            // won to build ours again.
            match self
                .current
                .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(now) => {
                    // SAFETY: `next` was never published; we own it.
                    drop(unsafe { Box::from_raw(next) });
                    cur = now;
                }
            }
        }
    }
}

impl Drop for CallbackSlot {
    fn drop(&mut self) {
        // ORDERING: Relaxed: `&mut self`, no other thread.
        let mut at = self.current.load(Ordering::Relaxed);
        while !at.is_null() {
            // SAFETY: each node came from Box::into_raw exactly once, is on
            // the chain exactly once, and is freed exactly once, here.
            let node = unsafe { Box::from_raw(at) };
            at = node.prev;
        }
    }
}

/// A host that does nothing and records nothing: all memory is shared (so
/// no punch needs an immediate invalidation), and every allocation and free
/// succeeds. For measuring the engine's own cost, and for tests that look
/// only at the engine's side; wrap it in a `testing::HookedHost` (feature `test-util`)
/// to watch a callback or make one fail.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullHost;

impl Host for NullHost {
    fn is_shared(&self, _: ByteRange) -> bool {
        true
    }
    fn set_attributes(&self, _: ByteRange, _: Attribute) {}
    fn invalidate_begin(&self, _: ByteRange, _: Hint) {}
    fn invalidate_end(&self, _: ByteRange) {}
    fn allocate(&self, _: ByteRange, _: u8) -> Result<(), HostError> {
        Ok(())
    }
    fn free(&self, _: ByteRange, _: u8) -> Result<(), HostError> {
        Ok(())
    }
    fn zero(&self, _: ByteRange) {}
}
