//! The host interface (CONTRACT.md §2.2) and the slot that lets the host
//! and the policy be replaced while other threads punch.

use crate::error::HostError;
use crate::range::{ByteRange, Hint};
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
}

pub(crate) use slot::CallbackSlot;

/// The swappable slot. Outside loom it is an `ArcSwap`: a load is a few
/// uncontended instructions and takes no lock. arc-swap is invisible to
/// loom, so under `hugepunch_loom` the slot is a stand-in with the same
/// contract built on a loom `AtomicPtr` (old values are kept until the slot
/// is dropped, which is what makes a plain pointer load safe).
#[cfg(not(hugepunch_loom))]
mod slot {
    use super::Callbacks;
    use crate::sync::Arc;
    use arc_swap::ArcSwap;

    pub(crate) struct CallbackSlot(ArcSwap<Callbacks>);

    /// A loaded set; derefs to the callbacks.
    pub(crate) struct Loaded(arc_swap::Guard<Arc<Callbacks>>);

    impl std::ops::Deref for Loaded {
        type Target = Callbacks;
        fn deref(&self) -> &Callbacks {
            &self.0
        }
    }

    impl CallbackSlot {
        pub fn new(cb: Callbacks) -> Self {
            CallbackSlot(ArcSwap::from_pointee(cb))
        }

        /// One consistent set of callbacks for one operation.
        pub fn load(&self) -> Loaded {
            Loaded(self.0.load())
        }

        /// Replace one part of the set; concurrent updates are not lost.
        pub fn update(&self, f: impl Fn(&Callbacks) -> Callbacks) {
            self.0.rcu(|cur| Arc::new(f(cur)));
        }
    }
}

#[cfg(hugepunch_loom)]
mod slot {
    use super::Callbacks;
    use crate::sync::{AtomicPtr, Mutex, Ordering};

    pub(crate) struct CallbackSlot {
        current: AtomicPtr<Callbacks>,
        /// Every value ever installed, freed on drop. Touched only by
        /// `update` (registration is not a punch path).
        all: Mutex<Vec<*mut Callbacks>>,
    }

    // SAFETY: the raw pointers point to `Callbacks` (Send + Sync) owned by
    // the slot and freed only in `drop`, which has exclusive access.
    unsafe impl Send for CallbackSlot {}
    // SAFETY: see `Send`; shared access only reads through the pointers.
    unsafe impl Sync for CallbackSlot {}

    impl CallbackSlot {
        pub fn new(cb: Callbacks) -> Self {
            let p = Box::into_raw(Box::new(cb));
            CallbackSlot {
                current: AtomicPtr::new(p),
                all: Mutex::new(vec![p]),
            }
        }

        pub fn load(&self) -> Box<Callbacks> {
            // ORDERING: Acquire pairs with the Release of `update`'s CAS, so
            // the pointee's fields, written before it was published, are
            // seen whole: the stand-in's "never a torn set".
            let p = self.current.load(Ordering::Acquire);
            // SAFETY: `p` was published by `new` or `update` from a live
            // Box and is freed only when the slot is dropped, which cannot
            // happen while `&self` is borrowed.
            Box::new(unsafe { (*p).clone() })
        }

        pub fn update(&self, f: impl Fn(&Callbacks) -> Callbacks) {
            loop {
                // ORDERING: Acquire, as in `load`: we read the fields of the
                // current set to build the next.
                let cur = self.current.load(Ordering::Acquire);
                // SAFETY: as in `load`.
                let next = Box::into_raw(Box::new(f(unsafe { &*cur })));
                self.all.lock().unwrap().push(next);
                // ORDERING: Release publishes `next`'s fields to `load`'s
                // Acquire; AcqRel on success so a later update reading
                // through the result is ordered; Relaxed on failure: we
                // retry with a fresh Acquire load.
                if self
                    .current
                    .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
            }
        }
    }

    impl Drop for CallbackSlot {
        fn drop(&mut self) {
            for p in self.all.lock().unwrap().drain(..) {
                // SAFETY: each pointer came from Box::into_raw exactly once
                // and is dropped exactly once, here, with exclusive access.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}
