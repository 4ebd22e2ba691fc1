//! Loom models of the engine live in `tests/`; this crate's library is the
//! recording host they share and the model runner.
//!
//! Everything here exists only under `--cfg hugepunch_loom` (see
//! `ci/loom.sh`); a normal `cargo test --workspace` builds an empty crate.
//!
//! # The recording host
//!
//! A `World` is the host side of one model run: per subpage, is memory
//! allocated for it (`resident`), what it holds (`content`), does the guest
//! have a mapping of it that no invalidation has zapped yet (`mapped`), and
//! has the guest punched it and not populated it since (`punch_called`).
//! One or more `ModelHost`s (named, so a model can swap host A for host B)
//! act on one world and log every callback with the host's name and the loom
//! thread that made it.
//!
//! The host state sits behind a `std::sync::Mutex`: host callbacks are
//! outside the engine's atomics, and loom runs one thread at a time, so the
//! host is a sequentially consistent observer of the engine's calls that
//! adds no happens-before edge between the engine's threads. No loom
//! operation happens while that mutex is held. Each callback and guest
//! action starts with a Relaxed RMW on one shared loom counter: a schedule
//! point (see `World`'s `schedule`), so loom interleaves other threads
//! between an engine step and the host call after it.
//!
//! The host itself asserts what must hold at each callback, so a model
//! fails at the first bad call, with a message naming the invariant of
//! CONTRACT.md §4 it breaks:
//!
//! * `free` of a subpage that is not allocated: freed twice (invariant 6);
//! * `free` of a subpage the guest still maps: freed without invalidation
//!   first (invariant 4);
//! * `free` of a subpage the guest never punched, or that the engine zeroed
//!   since (an un-punch hands it back), outside teardown: freed while
//!   unpunched (invariants 1 and 4);
//! * `allocate` of an allocated subpage: a leak (invariant 6);
//! * `zero` of a subpage that is not allocated (invariant 4).
//!
//! The models call the guest's side themselves: `World::guest_punch`
//! before a punch, `World::guest_populated` after a populate returns (it
//! asserts the subpage is allocated and, where the model knows the punch
//! came first, reads as zeros; then the guest maps it and writes to it).
#![cfg(hugepunch_loom)]
#![forbid(unsafe_code)]

use hugepunch::{
    Attribute, ByteRange, Config, Hint, Host, HostError, HugePunch, SubpageState, SUBPAGE_SIZE,
};
use loom::sync::Arc;
use loom::thread::ThreadId;
use std::sync::{Mutex, MutexGuard};

/// Preemption bound used when `LOOM_MAX_PREEMPTIONS` is not set.
pub const DEFAULT_PREEMPTIONS: usize = 2;

/// Run `f` under loom with the suite's defaults: `LOOM_MAX_PREEMPTIONS`
/// (default `DEFAULT_PREEMPTIONS`) and room for the engine's atomic
/// operations (`LOOM_MAX_BRANCHES`, default 20 000).
pub fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(DEFAULT_PREEMPTIONS);
    }
    if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
        b.max_branches = 20_000;
    }
    b.check(f);
}

/// One host callback: the engine's tests' own record of one
/// ([`hugepunch::testing::Event`]).
pub use hugepunch::testing::Event;

/// One callback as the host saw it: which host, from which loom thread.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// The name of the [`ModelHost`] called.
    pub host: &'static str,
    /// The loom thread that made the call.
    pub thread: ThreadId,
    /// What was called.
    pub event: Event,
}

/// What a subpage holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Guest data (what every subpage holds at the start of a model).
    Data,
    /// Zeros: freshly allocated or zeroed by the engine.
    Zero,
}

/// The host-side state of one model run.
#[derive(Debug)]
pub struct WorldState {
    /// Attribute per subpage.
    pub attrs: Vec<Attribute>,
    /// Is memory allocated for the subpage?
    pub resident: Vec<bool>,
    /// What the subpage holds (meaningful while resident).
    pub content: Vec<Content>,
    /// Does the guest map it (mapped by a populate, not invalidated since)?
    pub mapped: Vec<bool>,
    /// Has the guest punched it, and not populated it since?
    pub punch_called: Vec<bool>,
    /// Successful frees per subpage.
    pub frees: Vec<u32>,
    /// Allocations per subpage (the initial backing counts as one).
    pub allocations: Vec<u32>,
    /// Open invalidations per subpage (begin seen, end not yet).
    pub open_invalidations: Vec<u32>,
    /// The guest has called teardown: every free is legitimate from now on.
    pub teardown_called: bool,
    /// Fail this many of the next frees.
    pub fail_next_frees: u32,
    /// Every callback, in the order loom ran them.
    pub calls: Vec<Call>,
}

/// The host side of one model run, shared by its [`ModelHost`]s.
#[derive(Debug)]
pub struct World {
    order: u8,
    state: Mutex<WorldState>,
    /// Bumped (a Relaxed RMW) at the start of every host callback and
    /// guest action: a loom schedule point that adds no synchronisation.
    /// Without it, a callback would be atomic with the engine step before
    /// it (loom only switches threads at loom operations), and loom's
    /// partial-order reduction ignores a switch that no other thread's
    /// operation conflicts with: every callback and guest action touches
    /// this one word, so they all conflict with each other.
    schedule: loom::sync::atomic::AtomicUsize,
}

fn subs(r: ByteRange) -> std::ops::Range<usize> {
    (r.offset / SUBPAGE_SIZE) as usize..(r.end() / SUBPAGE_SIZE) as usize
}

impl World {
    /// A world of `size` bytes at huge page `order`, every subpage with
    /// attribute `attr`, allocated (holding guest data) when `populated`.
    /// The guest maps the private subpages of a populated world.
    pub fn new(size: u64, order: u8, attr: Attribute, populated: bool) -> std::sync::Arc<World> {
        let n = (size / SUBPAGE_SIZE) as usize;
        let mapped = populated && attr == Attribute::Private;
        std::sync::Arc::new(World {
            order,
            state: Mutex::new(WorldState {
                attrs: vec![attr; n],
                resident: vec![populated; n],
                content: vec![Content::Data; n],
                mapped: vec![mapped; n],
                punch_called: vec![false; n],
                frees: vec![0; n],
                allocations: vec![populated as u32; n],
                open_invalidations: vec![0; n],
                teardown_called: false,
                fail_next_frees: 0,
                calls: Vec::new(),
            }),
            schedule: loom::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The host state (for assertions after the model's threads joined).
    pub fn state(&self) -> MutexGuard<'_, WorldState> {
        // A panicking model thread may poison the mutex; the model has
        // already failed then, and the next assertion should not hide why.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A host callback or guest action starts: let loom schedule another
    /// thread here.
    fn callback(&self) -> MutexGuard<'_, WorldState> {
        // ORDERING: Relaxed on purpose: a schedule point only; the host
        // must not synchronise the engine's threads with each other (a
        // Relaxed RMW creates no happens-before edge).
        self.schedule
            .fetch_add(1, loom::sync::atomic::Ordering::Relaxed);
        self.state()
    }

    fn record(&self, st: &mut WorldState, host: &'static str, event: Event) {
        st.calls.push(Call {
            host,
            thread: loom::thread::current().id(),
            event,
        });
    }

    /// Fail the next `n` frees.
    pub fn fail_next_frees(&self, n: u32) {
        self.state().fail_next_frees = n;
    }

    /// The guest is about to punch `offset .. offset + len`: from now on the
    /// engine may free those subpages.
    pub fn guest_punch(&self, offset: u64, len: u64) {
        let mut st = self.callback();
        for s in subs(ByteRange::new(offset, len)) {
            st.punch_called[s] = true;
        }
    }

    /// The guest is about to tear the file down: every free is legitimate.
    pub fn guest_teardown(&self) {
        self.callback().teardown_called = true;
    }

    /// A populate of `offset .. offset + len` returned `Ok`: the guest now
    /// reads the range (as zeros when `expect_zero`: a punch of it returned
    /// before the populate started), writes guest data to it and maps its
    /// private subpages (shared memory is mapped from elsewhere: the seed's
    /// model, in which `is_shared` means "no mapping from this file").
    pub fn guest_populated(&self, offset: u64, len: u64, expect_zero: bool) {
        self.guest_faulted(offset, len, expect_zero, true);
    }

    /// As [`guest_populated`](Self::guest_populated), but the guest only
    /// reads (two vCPUs faulting one subpage: neither may see the other's
    /// write, so both must see zeros).
    pub fn guest_read(&self, offset: u64, len: u64, expect_zero: bool) {
        self.guest_faulted(offset, len, expect_zero, false);
    }

    fn guest_faulted(&self, offset: u64, len: u64, expect_zero: bool, write: bool) {
        let mut st = self.callback();
        for s in subs(ByteRange::new(offset, len)) {
            assert!(
                st.resident[s],
                "invariant 4 (no data loss): populate returned but subpage {s} is not allocated (a completion freed what populate un-punched?)"
            );
            if expect_zero {
                assert_eq!(
                    st.content[s],
                    Content::Zero,
                    "invariant 5 (no stale data): punched subpage {s} populated again does not read as zeros"
                );
            }
            st.mapped[s] = st.attrs[s] == Attribute::Private;
            if write {
                st.content[s] = Content::Data;
            }
            st.punch_called[s] = false;
        }
    }

    /// Invariant 2, when a punch of `offset .. offset + len` has returned:
    /// no mapping of any subpage of it is left (an invalidation covering it
    /// began after the guest last mapped it).
    pub fn assert_unmapped(&self, offset: u64, len: u64) {
        let st = self.state();
        for s in subs(ByteRange::new(offset, len)) {
            assert!(
                !st.mapped[s],
                "invariant 2 (no deferred invalidation): punch returned, subpage {s} still mapped\n{:#?}",
                st.calls
            );
        }
    }

    /// Every callback so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The successful frees of the whole huge page `h` so far.
    pub fn whole_frees(&self, h: u64) -> usize {
        let size = SUBPAGE_SIZE << self.order;
        let whole = ByteRange::new(h * size, size);
        self.calls()
            .iter()
            .filter(|c| c.event == Event::Free(whole, self.order))
            .count()
    }

    /// Successful frees of any size so far.
    pub fn frees(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| matches!(c.event, Event::Free(..)))
            .count()
    }

    /// Did thread `t` begin an invalidation covering subpage offset `offset`?
    pub fn invalidated_by(&self, t: ThreadId, offset: u64) -> bool {
        self.calls().iter().any(|c| {
            c.thread == t && matches!(c.event, Event::InvalidateBegin(r, _) if r.offset <= offset && offset < r.end())
        })
    }

    /// Invariant 6 at a quiescent point: the engine's view of every subpage
    /// agrees with the host's (present or punched = allocated, absent = not),
    /// every invalidation ended, and `pending_subpages` counts the punched.
    pub fn assert_accounting(&self, engine: &HugePunch) {
        let st = self.state();
        let mut punched = 0;
        for s in 0..st.resident.len() {
            let state = engine
                .subpage_state(s as u64 * SUBPAGE_SIZE)
                .expect("live engine");
            punched += (state == SubpageState::Punched) as u64;
            assert_eq!(
                st.resident[s],
                state != SubpageState::Absent,
                "invariant 6 (nothing leaked, nothing lost): subpage {s} is {state:?} in the engine, resident={} in the host\n{:#?}",
                st.resident[s],
                st.calls
            );
            assert_eq!(
                st.open_invalidations[s], 0,
                "invalidation of subpage {s} never ended"
            );
        }
        assert_eq!(
            engine.stats().pending_subpages,
            punched,
            "invariant 6: pending_subpages at a quiescent point"
        );
    }

    /// Invariant 6 after teardown: nothing allocated, every allocation freed
    /// exactly once.
    pub fn assert_all_freed(&self) {
        let st = self.state();
        for s in 0..st.resident.len() {
            assert!(
                !st.resident[s],
                "invariant 6 (nothing leaked): subpage {s} still allocated after teardown\n{:#?}",
                st.calls
            );
            assert_eq!(
                st.frees[s], st.allocations[s],
                "invariant 6 (every byte freed exactly once): subpage {s}"
            );
        }
    }
}

/// A host acting on a [`World`], logging under its `name`.
#[derive(Debug)]
pub struct ModelHost {
    name: &'static str,
    world: std::sync::Arc<World>,
}

impl ModelHost {
    /// A host named `name` on `world`.
    pub fn on(name: &'static str, world: &std::sync::Arc<World>) -> std::sync::Arc<dyn Host> {
        std::sync::Arc::new(ModelHost {
            name,
            world: world.clone(),
        })
    }
}

impl Host for ModelHost {
    fn is_shared(&self, range: ByteRange) -> bool {
        let mut st = self.world.callback();
        let shared = st.attrs[subs(range)]
            .iter()
            .all(|a| *a == Attribute::Shared);
        self.world
            .record(&mut st, self.name, Event::IsShared(range));
        shared
    }

    fn set_attributes(&self, range: ByteRange, to: Attribute) {
        let mut st = self.world.callback();
        self.world
            .record(&mut st, self.name, Event::SetAttributes(range, to));
        for s in subs(range) {
            st.attrs[s] = to;
            if to == Attribute::Shared {
                // The host zaps private mappings on its own conversion path.
                st.mapped[s] = false;
            }
        }
    }

    fn invalidate_begin(&self, range: ByteRange, hint: Hint) {
        let mut st = self.world.callback();
        self.world
            .record(&mut st, self.name, Event::InvalidateBegin(range, hint));
        for s in subs(range) {
            st.mapped[s] = false;
            st.open_invalidations[s] += 1;
        }
    }

    fn invalidate_end(&self, range: ByteRange) {
        let mut st = self.world.callback();
        self.world
            .record(&mut st, self.name, Event::InvalidateEnd(range));
        for s in subs(range) {
            assert!(
                st.open_invalidations[s] > 0,
                "invalidate_end of subpage {s} without a begin"
            );
            st.open_invalidations[s] -= 1;
        }
    }

    fn allocate(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        let mut st = self.world.callback();
        self.world
            .record(&mut st, self.name, Event::Allocate(range, order));
        for s in subs(range) {
            assert!(
                !st.resident[s],
                "invariant 6 (nothing leaked): allocation of allocated subpage {s} ({range:?})"
            );
            st.resident[s] = true;
            st.content[s] = Content::Zero;
            st.allocations[s] += 1;
        }
        Ok(())
    }

    fn free(&self, range: ByteRange, order: u8) -> Result<(), HostError> {
        let mut st = self.world.callback();
        if st.fail_next_frees > 0 {
            st.fail_next_frees -= 1;
            self.world
                .record(&mut st, self.name, Event::FreeFailed(range, order));
            return Err(HostError { errno: 5 });
        }
        self.world
            .record(&mut st, self.name, Event::Free(range, order));
        for s in subs(range) {
            assert!(st.resident[s], "invariant 6 (freed exactly once): free of subpage {s} that is not allocated ({range:?})\n{:#?}", st.calls);
            assert!(
                !st.mapped[s],
                "invariant 4 (no data loss): free of subpage {s} that the guest maps, without an invalidation first ({range:?})\n{:#?}",
                st.calls
            );
            assert!(
                st.punch_called[s] || st.teardown_called,
                "invariant 1/4 (no free of an unpunched subpage): free of subpage {s} that is not punched (never punched, or un-punched since) ({range:?})\n{:#?}",
                st.calls
            );
            st.resident[s] = false;
            st.frees[s] += 1;
        }
        Ok(())
    }

    fn zero(&self, range: ByteRange) {
        let mut st = self.world.callback();
        self.world.record(&mut st, self.name, Event::Zero(range));
        for s in subs(range) {
            assert!(st.resident[s], "invariant 4 (no data loss): zero of subpage {s} that is not allocated ({range:?})\n{:#?}", st.calls);
            st.content[s] = Content::Zero;
            // The engine zeroes a subpage only when it stops being punched
            // (an un-punch, or a forced split whose 4 KiB free failed): from
            // now on it is the guest's again, and only a new punch (or
            // teardown) may free it.
            st.punch_called[s] = false;
        }
    }
}

/// A file of `huge_pages` huge pages of `1 << order` subpages, populated,
/// every subpage `attr`, with one host named "A" on a fresh world.
pub fn file(
    huge_pages: u64,
    order: u8,
    attr: Attribute,
    config: impl FnOnce(Config) -> Config,
) -> (Arc<HugePunch>, std::sync::Arc<World>) {
    let size = huge_pages * (SUBPAGE_SIZE << order);
    let cfg = config(Config::new(size).order(order));
    let world = World::new(size, order, attr, cfg.populated);
    let engine = HugePunch::new(cfg, ModelHost::on("A", &world)).expect("valid config");
    (Arc::new(engine), world)
}

/// Byte offset of subpage `s` (4 KiB units).
pub const fn sub(s: u64) -> u64 {
    s * SUBPAGE_SIZE
}

/// Byte length of `n` subpages.
pub const fn subs_len(n: u64) -> u64 {
    n * SUBPAGE_SIZE
}
