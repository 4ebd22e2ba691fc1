//! One huge page's state: a state word plus the bitmap words, and the
//! protocol every operation follows on them.
//!
//! # State
//!
//! Each huge page is `1 + W` atomic words: the **state word** and `W =
//! ceil(subpages / 64)` **bitmap words** (8 for 2 MiB, 4096 for 1 GiB, 1 for
//! the tiny orders of tests and loom models). The bitmap is the source of
//! truth for subpages; the state word is the commit point of every
//! transition. The state word packs:
//!
//! | bits  | field        | meaning |
//! |-------|--------------|---------|
//! | 0-1   | `MODE`       | backing: `ABSENT`, `HUGE`, `SPLIT` |
//! | 2     | `COMPLETING` | a completion owns the huge page (set by one RMW, cleared when it ends) |
//! | 3     | `BUSY`       | a slow path owns the huge page: a forced split, teardown, an allocation, or any operation on a `SPLIT` huge page |
//! | 4     | `TORN`       | teardown has visited the huge page; never unset once set |
//! | 5     | `WANTED`     | the shrinker skipped the huge page (operations were registered); the next exit clears it and runs the shrinker |
//! | 8-17  | `PUNCHING`   | partial/whole punches between their entry and exit RMWs |
//! | 18-27 | `UNPUNCHING` | populates (and `CancelAndZero` conversions) between entry and exit |
//! | 28-37 | `CONVERTING` | conversions to private between their mark and unmark |
//! | 44-63 | `COUNT`      | `HUGE`: punched subpages committed by exits (may be transiently "negative", wrapping in its 20 bits, see below); `SPLIT`: absent subpages; `ABSENT`: 0 |
//!
//! Bitmap meaning by mode: `HUGE`, bit set = subpage punched (pending);
//! `SPLIT`, bit set = subpage absent (freed); `ABSENT`, all bits clear.
//! The forced split turns punched bits into absent bits without touching
//! them: the punched subpages are exactly the ones it frees.
//!
//! # Invariants
//!
//! 1. Bits of a `HUGE` huge page are changed only by an operation registered
//!    in `PUNCHING` (sets) or `UNPUNCHING` (clears), or by the owner of
//!    `COMPLETING`/`BUSY`, which is never held while anything is registered.
//! 2. A registration is taken only on a `HUGE` huge page with none of
//!    `COMPLETING`, `BUSY` and `TORN` (an entry RMW), so a life of a huge page cannot
//!    end while an operation of that life is still touching its bits: the
//!    registration counts are this engine's generation. No late punch can
//!    set a bit in the next life.
//! 3. `COUNT` = bits set by exited punches − bits cleared by exited
//!    un-punches. An un-punch is registered from before its bits are cleared
//!    until after `COUNT` is lowered; so whenever `UNPUNCHING == 0`,
//!    `COUNT` ≤ the number of set bits, and `COUNT == full` means every
//!    subpage is punched. (While an un-punch is in flight `COUNT` may exceed
//!    or, by wrapping, undershoot the bits; nobody decides on it then.)
//!
//! # Transitions (each a single RMW on the state word)
//!
//! * **punch entry**: `HUGE`, no `COMPLETING`/`BUSY`/`TORN` → `PUNCHING + 1`.
//! * **punch exit**: `PUNCHING − 1`, `COUNT + n` (n = bits this punch newly
//!   set); if the result is *complete* (`HUGE`, `COUNT == full`, nothing
//!   registered, no `COMPLETING`/`BUSY`), the same RMW sets `COMPLETING`
//!   and its caller runs the completion. This is the only way a completion
//!   is claimed, so exactly one operation wins it: the RMW's previous value
//!   decides.
//! * **un-punch entry/exit**: as for punches, in `UNPUNCHING`, with
//!   `COUNT − k`. An un-punch exit whose result is complete claims the
//!   completion too (possible only when concurrent punches filled the huge
//!   page while it found nothing to un-punch).
//! * **conversion mark/unmark**: `CONVERTING ± 1`, in any mode, `BUSY` or not
//!   (a slow path's release keeps the marks).
//! * **completion end**: freed: bits reset, then `ABSENT`, `COUNT = 0`,
//!   `COMPLETING` cleared in one RMW; free failed: `COMPLETING` cleared
//!   only (the huge page stays `HUGE`, every subpage pending).
//! * **slow claim** (`BUSY`): set when neither `COMPLETING` nor `BUSY` is
//!   set; the owner then waits until nothing is registered before it
//!   touches bits (new registrations are refused while `BUSY` is set).
//!   The shrinker claims only an idle huge page (one CAS, no waiting);
//!   otherwise it sets `WANTED` (an RMW) and skips it.
//! * **exit and `WANTED`**: every exit clears `WANTED` in its RMW and
//!   tells its caller, whose operation then runs the shrinker at its end
//!   (if still over the budget). The RMWs order the two sides: an exit
//!   before the shrinker's mark is seen by it (nothing registered: it
//!   claims after all), an exit after it sees the mark.
//!
//! # Who wins each race
//!
//! * Two or three punches completing one huge page: their exits are RMWs on
//!   one word, so they are totally ordered; only the exit whose result is
//!   complete sets `COMPLETING`, later ones see it set.
//! * Un-punch vs. the completing punch: whichever entry/exit comes first in
//!   the state word's modification order wins. If the completion's claim is
//!   first, the populate's entry sees `COMPLETING` and waits until the huge
//!   page is `ABSENT`, then allocates it anew (as a KVM fault retries on
//!   `mmu_invalidate_seq`). If the un-punch's entry is first, the punch's
//!   exit sees `UNPUNCHING > 0` and claims nothing; the un-punch's exit
//!   lowers `COUNT`.
//! * Punch (shared path) vs. conversion to private: the punch sets its bits,
//!   then its exit RMW reads `CONVERTING`; the conversion marks
//!   `CONVERTING` with an RMW, then reads the bits. Both RMWs are on the
//!   state word: if the conversion's mark is first, the punch's exit sees
//!   it and invalidates now; if the punch's exit is first, the mark (an
//!   Acquire RMW reading the exit's Release) makes the punch's bits visible
//!   to the conversion, which refuses. If the conversion ended before the
//!   exit, the exit acquires its unmark, so the punch's later `is_shared`
//!   call sees the private attribute. No SeqCst is needed: the state word,
//!   not a store-load pair, orders the two sides.
//!
//! # Orderings
//!
//! Entries are `Acquire` (the operation's bit accesses may not move before
//! them, and they see the bit reset a completion published). Exits and
//! releases are `Release` or `AcqRel` (the bit accesses may not move after
//! them; an exit that claims a completion must see every other exit's bits).
//! Every bitmap write is `Release` and every lock-free bitmap read
//! `Acquire`: the populate fast path and the queries read bits without
//! registering and then re-read the state word, so a reader that sees a
//! bit must also see the registration or claim of whoever wrote it.

use crate::sync::{backoff, AtomicU64, Ordering};
use smallvec::SmallVec;

/// (word index, bits) pairs: inline for the common few-word case, so a
/// 4 KiB operation allocates nothing.
pub(crate) type Words = SmallVec<[(usize, u64); 4]>;
/// (first subpage, count) runs, inline for the common case.
pub(crate) type Runs = SmallVec<[(u32, u32); 4]>;

pub(crate) const MODE_MASK: u64 = 0b11;
pub(crate) const ABSENT: u64 = 0;
pub(crate) const HUGE: u64 = 1;
pub(crate) const SPLIT: u64 = 2;
pub(crate) const COMPLETING: u64 = 1 << 2;
pub(crate) const BUSY: u64 = 1 << 3;
pub(crate) const TORN: u64 = 1 << 4;
/// The shrinker skipped this huge page because operations were registered
/// on it (it never waits for them): the next exit clears it and runs the
/// shrinker at the end of its operation.
pub(crate) const WANTED: u64 = 1 << 5;

const FIELD_BITS: u32 = 10;
const FIELD_MAX: u64 = (1 << FIELD_BITS) - 1;
const PUNCHING_SHIFT: u32 = 8;
const UNPUNCHING_SHIFT: u32 = 18;
const CONVERTING_SHIFT: u32 = 28;
pub(crate) const PUNCH_ONE: u64 = 1 << PUNCHING_SHIFT;
pub(crate) const UNPUNCH_ONE: u64 = 1 << UNPUNCHING_SHIFT;
pub(crate) const CONVERT_ONE: u64 = 1 << CONVERTING_SHIFT;
const COUNT_SHIFT: u32 = 44;
const COUNT_ONE: u64 = 1 << COUNT_SHIFT;
const REGISTERED: u64 = (FIELD_MAX << PUNCHING_SHIFT) | (FIELD_MAX << UNPUNCHING_SHIFT);

/// A decoded copy of a state word.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot(pub u64);

impl Snapshot {
    pub fn mode(self) -> u64 {
        self.0 & MODE_MASK
    }
    pub fn is(self, flag: u64) -> bool {
        self.0 & flag != 0
    }
    fn field(self, shift: u32) -> u64 {
        (self.0 >> shift) & FIELD_MAX
    }
    pub fn punching(self) -> u64 {
        self.field(PUNCHING_SHIFT)
    }
    pub fn unpunching(self) -> u64 {
        self.field(UNPUNCHING_SHIFT)
    }
    pub fn converting(self) -> u64 {
        self.field(CONVERTING_SHIFT)
    }
    /// `COUNT` as its raw 20-bit value (transiently ≥ 2^19 when "negative").
    pub fn count(self) -> u32 {
        (self.0 >> COUNT_SHIFT) as u32
    }
    fn registered(self) -> bool {
        self.0 & REGISTERED != 0
    }
    /// Idle huge page: no registration, no owner.
    pub fn idle(self) -> bool {
        !self.registered() && !self.is(COMPLETING | BUSY)
    }
    fn complete(self, full: u32) -> bool {
        self.mode() == HUGE && self.idle() && self.count() == full
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = ["ABSENT", "HUGE", "SPLIT", "?"][self.mode() as usize];
        let mut d = f.debug_struct("Snapshot");
        d.field("mode", &mode)
            .field("completing", &self.is(COMPLETING))
            .field("busy", &self.is(BUSY))
            .field("torn", &self.is(TORN))
            .field("wanted", &self.is(WANTED))
            .field("punching", &self.punching())
            .field("unpunching", &self.unpunching())
            .field("converting", &self.converting())
            .field("count", &self.count());
        d.finish()
    }
}

/// The result of trying to register on a huge page.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Registered on a `HUGE` huge page.
    Registered,
    /// A completion owns the huge page.
    Completing,
    /// The huge page is not `HUGE` (its snapshot says which mode).
    NotHuge(Snapshot),
}

/// The result of an exit.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exit {
    /// The state word after the exit.
    pub after: Snapshot,
    /// This exit set `COMPLETING`: the caller must run the completion.
    pub claimed_completion: bool,
    /// This exit cleared `WANTED`: the caller runs the shrinker at the end
    /// of its operation (if pending bytes are still over the budget).
    pub shrink_wanted: bool,
}

/// A view of one huge page's words.
#[derive(Clone, Copy)]
pub(crate) struct Page<'a> {
    state: &'a AtomicU64,
    words: &'a [AtomicU64],
    /// Subpages per huge page (`full`).
    full: u32,
}

/// The (word index, mask) pairs covering subpages `first .. first + count`.
pub(crate) fn word_masks(first: u32, count: u32) -> impl Iterator<Item = (usize, u64)> {
    let end = first + count;
    let mut at = first;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let w = at / 64;
        let lo = at % 64;
        let hi = (end - w * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        at = (w + 1) * 64;
        Some((w as usize, mask))
    })
}

/// `count_ones` without the software fallback for the common single bit
/// (a 4 KiB punch) when the target has no `popcnt`.
#[inline]
fn ones(bits: u64) -> u32 {
    if bits & bits.wrapping_sub(1) == 0 {
        (bits != 0) as u32
    } else {
        bits.count_ones()
    }
}

/// Contiguous runs `(first, count)` of set bits in `masks` (word index,
/// bits), which must come in ascending word order.
pub(crate) fn runs(masks: impl IntoIterator<Item = (usize, u64)>) -> Runs {
    let mut out = Runs::new();
    for (w, mut bits) in masks {
        while bits != 0 {
            let lo = bits.trailing_zeros();
            let len = (!(bits >> lo)).trailing_zeros().min(64 - lo);
            let first = w as u32 * 64 + lo;
            match out.last_mut() {
                Some((f, c)) if *f + *c == first => *c += len,
                _ => out.push((first, len)),
            }
            bits = if lo + len >= 64 {
                0
            } else {
                bits & !(((1u64 << len) - 1) << lo)
            };
        }
    }
    out
}

impl<'a> Page<'a> {
    /// A view of a huge page of `full` subpages (a power of two) whose
    /// bitmap is `words`, `ceil(full / 64)` of them (the fast paths index
    /// them unchecked on that promise).
    pub fn new(state: &'a AtomicU64, words: &'a [AtomicU64], full: u32) -> Self {
        debug_assert!(full.is_power_of_two() && words.len() == full.div_ceil(64) as usize);
        Page { state, words, full }
    }

    pub fn full(&self) -> u32 {
        self.full
    }

    /// The state word now.
    pub fn load(&self) -> Snapshot {
        // ORDERING: Acquire, so a caller that then reads bits sees every bit
        // change published by the Release exit or end that wrote this value.
        Snapshot(self.state.load(Ordering::Acquire))
    }

    /// The state word now, read with a read-modify-write (`fetch_add(0)`),
    /// so the read takes the latest value in the word's modification order
    /// and is ordered after the caller's earlier accesses (see NOTES on
    /// store-then-load patterns: loom gives RMWs exactly that meaning).
    pub fn load_rmw(&self) -> Snapshot {
        // ORDERING: AcqRel. Release: the caller's earlier host call (the
        // shared-state check) happens-before any RMW later in the word's
        // modification order, a conversion's mark included, so that
        // conversion's attribute change comes after the check answered.
        // Acquire: a mark earlier in the order is seen.
        Snapshot(self.state.fetch_add(0, Ordering::AcqRel))
    }

    /// One CAS loop on the state word: `f` maps the current value to the new
    /// one, or to `None` to leave it. Returns the previous value and
    /// whether it was replaced.
    #[inline(always)]
    fn update(
        &self,
        success: Ordering,
        mut f: impl FnMut(Snapshot) -> Option<u64>,
    ) -> (Snapshot, bool) {
        // ORDERING: Acquire on the load and on a failed CAS: when `f`
        // declines to write, its caller acts on the value it saw (for
        // instance "a completion is in flight"), so that value must carry
        // the ordering of the write that produced it. The successful CAS
        // uses the caller's ordering.
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            let Some(new) = f(Snapshot(cur)) else {
                return (Snapshot(cur), false);
            };
            match self
                .state
                .compare_exchange_weak(cur, new, success, Ordering::Acquire)
            {
                Ok(prev) => return (Snapshot(prev), true),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Register as a punch (`PUNCHING + 1`) or an un-punch (`UNPUNCHING + 1`,
    /// plus `CONVERTING + 1` for a `CancelAndZero` conversion). Waits only
    /// while a slow path owns the huge page (`BUSY`) or a field is saturated.
    #[inline]
    pub fn enter(&self, one: u64) -> Entry {
        let mut spins = 0;
        loop {
            let mut saturated = false;
            // ORDERING: Acquire: the bit RMWs that follow must not move
            // before the registration, and must see the bit reset that the
            // Release end of a previous completion published.
            let (prev, done) = self.update(Ordering::Acquire, |s| {
                if s.mode() != HUGE || s.is(COMPLETING | BUSY | TORN) {
                    return None;
                }
                saturated = s.punching() == FIELD_MAX
                    || s.unpunching() == FIELD_MAX
                    || s.converting() == FIELD_MAX;
                (!saturated).then(|| s.0 + one)
            });
            if done {
                return Entry::Registered;
            }
            if prev.is(COMPLETING) {
                return Entry::Completing;
            }
            if (prev.is(BUSY) && !prev.is(TORN)) || saturated {
                backoff(&mut spins);
                continue;
            }
            return Entry::NotHuge(prev);
        }
    }

    /// The punch entry of the 4 KiB fast path: `enter(PUNCH_ONE)`
    /// with its one decision made by one mask compare, and no waiting:
    /// `false` when the huge page is not `HUGE`, is owned (`COMPLETING`,
    /// `BUSY`), torn down or has `PUNCHING` saturated (the caller then takes
    /// the general path, which calls `enter`). Nothing changed on `false`.
    #[inline(always)]
    pub fn try_enter_punch(&self) -> bool {
        const GATE: u64 = MODE_MASK | COMPLETING | BUSY | TORN | (FIELD_MAX << PUNCHING_SHIFT);
        // ORDERING: Acquire, as in `enter`; `update`'s Acquire load and
        // failed CAS, as there.
        let (_, done) = self.update(Ordering::Acquire, |s| {
            // `HUGE`, no owner, not torn, and `PUNCHING` below its maximum
            // (`PUNCHING == FIELD_MAX` would carry into the next field).
            let g = s.0 & GATE;
            (g & !(FIELD_MAX << PUNCHING_SHIFT) == HUGE && g < FIELD_MAX << PUNCHING_SHIFT)
                .then_some(s.0 + PUNCH_ONE)
        });
        done
    }

    /// The punch exit of the 4 KiB fast path: `exit(PUNCH_ONE, newly)`, the
    /// same single RMW with the completion decided by one mask compare.
    /// Returns the state word after it (with `COMPLETING` when this exit
    /// claimed the completion) and whether it cleared `WANTED`.
    #[cfg(not(hugepunch_broken = "completion"))]
    #[inline(always)]
    pub fn exit_punch(&self, newly: u32) -> (Snapshot, bool) {
        // `complete`: `HUGE`, nothing registered, no owner, `COUNT == full`.
        const CHECK: u64 = MODE_MASK | COMPLETING | BUSY | REGISTERED | (u64::MAX << COUNT_SHIFT);
        let complete = HUGE | ((self.full as u64) << COUNT_SHIFT);
        let step = ((newly as u64) * COUNT_ONE).wrapping_sub(PUNCH_ONE);
        // The value the successful CAS wrote (the closure's last call).
        let mut after = 0;
        // ORDERING: AcqRel, as in `exit`.
        let (prev, _) = self.update(Ordering::AcqRel, |s| {
            let new = s.0.wrapping_add(step) & !WANTED;
            // `COMPLETING` is clear in `new` (an exit of a registration
            // never sees it set), so the claim is this bit alone.
            after = new | (((new & CHECK == complete) as u64) << COMPLETING.trailing_zeros());
            Some(after)
        });
        (Snapshot(after), prev.is(WANTED))
    }

    /// The planted bug's exit (see the other `exit`), for the fast path.
    #[cfg(hugepunch_broken = "completion")]
    pub fn exit_punch(&self, newly: u32) -> (Snapshot, bool) {
        let exit = self.exit(PUNCH_ONE, newly as i64);
        (exit.after, exit.shrink_wanted)
    }

    /// Leave a registration taken with `one`, committing `delta` to `COUNT`
    /// (`+n` for a punch, `-k` for an un-punch). Claims the completion if
    /// the result is complete.
    #[cfg(not(hugepunch_broken = "completion"))]
    #[inline]
    pub fn exit(&self, one: u64, delta: i64) -> Exit {
        let full = self.full;
        let mut claimed = false;
        let mut wanted = false;
        // ORDERING: AcqRel. Release: our bit RMWs happen-before whoever
        // reads this value or a later one (the claiming exit, a slow path
        // waiting for the registrations to drain, a conversion's mark).
        // Acquire: an exit that claims the completion must see the bits of
        // every exit before it, and a punch deciding on `CONVERTING` must
        // see the attribute change of a conversion that already unmarked.
        let (prev, _) = self.update(Ordering::AcqRel, |s| {
            wanted = s.is(WANTED);
            let mut new =
                s.0.wrapping_sub(one)
                    .wrapping_add((delta as u64).wrapping_mul(COUNT_ONE))
                    & !WANTED;
            claimed = Snapshot(new).complete(full);
            if claimed {
                new |= COMPLETING;
            }
            Some(new)
        });
        let after = prev
            .0
            .wrapping_sub(one)
            .wrapping_add((delta as u64).wrapping_mul(COUNT_ONE))
            & !WANTED;
        Exit {
            after: Snapshot(after | if claimed { COMPLETING } else { 0 }),
            claimed_completion: claimed,
            shrink_wanted: wanted,
        }
    }

    /// BROKEN on purpose, test-only (`--cfg hugepunch_broken="completion"`,
    /// see loom-tests): the exit's RMW only leaves the registration and
    /// commits `COUNT`; the completion is then decided by a separate load
    /// and claimed by a separate store. Two exits that both load the
    /// complete state both claim it: two completions of one life, the huge
    /// page freed twice (invariant 1). Never built outside that cfg.
    #[cfg(hugepunch_broken = "completion")]
    pub fn exit(&self, one: u64, delta: i64) -> Exit {
        let step = |s: u64| {
            s.wrapping_sub(one)
                .wrapping_add((delta as u64).wrapping_mul(COUNT_ONE))
        };
        // ORDERING: AcqRel, as in the real `exit`.
        let (prev, _) = self.update(Ordering::AcqRel, |s| Some(step(s.0)));
        let now = self.load();
        let claimed = now.complete(self.full);
        if claimed {
            // ORDERING: Release, as a claim would be; the bug is that this
            // store is not the RMW that decided.
            self.state.store(now.0 | COMPLETING, Ordering::Release);
        }
        let after = step(prev.0) | if claimed { COMPLETING } else { 0 };
        Exit {
            after: Snapshot(after),
            claimed_completion: claimed,
            shrink_wanted: prev.is(WANTED),
        }
    }

    /// Set the bits of `first .. first + count`; returns how many were newly
    /// set. Caller is registered (or owns the huge page).
    pub fn set_bits(&self, first: u32, count: u32) -> u32 {
        // Every bit of the range, less those that were set already
        // (counted only where there are some: a fresh range needs no
        // population count).
        let mut newly = count;
        for (w, mask) in word_masks(first, count) {
            // ORDERING: Release. Among registered operations the entry
            // and exit order the bits; but lock-free readers (the populate
            // fast path, queries) read a bit and then the state word, and a
            // reader that sees this bit must then see our registration.
            let prev = self.words[w].fetch_or(mask, Ordering::Release);
            if mask & prev != 0 {
                newly -= ones(mask & prev);
            }
        }
        newly
    }

    /// Set the bit of subpage `sub`; returns 1 if this call set it, else 0.
    /// Caller is registered. (The 4 KiB case of `set_bits`.)
    #[inline]
    pub fn set_bit(&self, sub: u32) -> u32 {
        let mask = 1u64 << (sub % 64);
        // ORDERING: Release, as in `set_bits`.
        let prev = self.word(sub).fetch_or(mask, Ordering::Release);
        (prev & mask == 0) as u32
    }

    /// The bitmap word of subpage `sub % full`, without a bounds check.
    #[inline(always)]
    fn word(&self, sub: u32) -> &AtomicU64 {
        let w = ((sub & (self.full - 1)) / 64) as usize;
        debug_assert!(w < self.words.len());
        // SAFETY: `full` is a power of two and `words` holds
        // `ceil(full / 64)` words (the index builds every page so), so
        // `(sub mod full) / 64` is in bounds.
        unsafe { self.words.get_unchecked(w) }
    }

    /// Clear the bit of subpage `sub`; returns 1 if this call cleared it
    /// (it is the caller's now), else 0. Caller is registered as an
    /// un-punch. (The 4 KiB case of `clear_bits`.)
    #[inline]
    pub fn clear_bit(&self, sub: u32) -> u32 {
        let mask = 1u64 << (sub % 64);
        // ORDERING: Release, as in `clear_bits`.
        let prev = self.words[(sub / 64) as usize].fetch_and(!mask, Ordering::Release);
        (prev & mask != 0) as u32
    }

    /// Is subpage `sub`'s bit set? (`read_bits` for one subpage.)
    #[inline]
    pub fn bit(&self, sub: u32) -> bool {
        // ORDERING: Acquire, as in `read_bits`.
        self.words[(sub / 64) as usize].load(Ordering::Acquire) >> (sub % 64) & 1 != 0
    }

    /// Set the bits `mask` of bitmap word `w`; returns how many this call
    /// set, and the word before. Caller is registered (a `punch_many`
    /// group).
    #[inline]
    pub fn or_word(&self, w: usize, mask: u64) -> (u32, u64) {
        // ORDERING: Release, as in `set_bits`.
        let prev = self.words[w].fetch_or(mask, Ordering::Release);
        (ones(mask & !prev), prev)
    }

    /// Clear the bits of `first .. first + count`; returns the (word, bits)
    /// this call cleared (they are the caller's now).
    pub fn clear_bits(&self, first: u32, count: u32) -> Words {
        let mut cleared = Words::new();
        for (w, mask) in word_masks(first, count) {
            // ORDERING: Release, as in `set_bits`: a populate that reads
            // this bit clear (its fast path) must then see our
            // registration and wait for our zeroing (loom found it with
            // Relaxed: two populates of one subpage).
            let prev = self.words[w].fetch_and(!mask, Ordering::Release);
            if prev & mask != 0 {
                cleared.push((w, prev & mask));
            }
        }
        cleared
    }

    /// The set bits among `first .. first + count`, as (word, bits).
    pub fn read_bits(&self, first: u32, count: u32) -> Words {
        word_masks(first, count)
            .filter_map(|(w, mask)| {
                // ORDERING: Acquire, paired with the Release bitmap writes
                // (`set_bits`, `clear_bits`, `owner_set`, the completion's
                // reset): a reader that sees a bit value also sees the
                // registration or claim of whoever wrote it, so callers that
                // read without registering re-load the state word after
                // this read and retry if something was in flight.
                let bits = self.words[w].load(Ordering::Acquire) & mask;
                (bits != 0).then_some((w, bits))
            })
            .collect()
    }

    /// The first set bit among `first .. first + count` (the conversion's
    /// check, after its mark; see "Who wins each race").
    pub fn first_set_bit(&self, first: u32, count: u32) -> Option<u32> {
        for (w, mask) in word_masks(first, count) {
            // ORDERING: Acquire load. Every write to the state word is an
            // RMW, so a mark that comes after a punch's exit in the state
            // word's order reads from the exit's release sequence, and
            // its Acquire half makes the punch's bits (set before its
            // Release exit) visible to this load. A mark that comes first
            // is seen by the exit instead, and the punch invalidates. A
            // plain load (not an RMW) on purpose: loom may serve it stale,
            // so the conversion model fails when the mark is weakened
            // (planted bug `hugepunch_broken="mark"`).
            let bits = self.words[w].load(Ordering::Acquire) & mask;
            if bits != 0 {
                return Some(w as u32 * 64 + bits.trailing_zeros());
            }
        }
        None
    }

    /// Mark a conversion (`CONVERTING + 1`), in any mode: a slow path keeps
    /// the mark when it releases the huge page. Returns the state before.
    #[cfg(not(hugepunch_broken = "mark"))]
    pub fn mark_converting(&self) -> Snapshot {
        let mut spins = 0;
        loop {
            // ORDERING: AcqRel. The Acquire half is the one the conversion
            // check rests on: it makes the bits of every punch whose exit
            // precedes this mark visible to `first_set_bit` (loom's
            // `broken_mark_is_caught` fails without it). The Release half
            // orders what the converting thread did before (nothing the
            // punch reads) and keeps the state word's release sequences
            // whole for later readers.
            let (prev, done) = self.update(Ordering::AcqRel, |s| {
                (s.converting() < FIELD_MAX).then_some(s.0 + CONVERT_ONE)
            });
            if done {
                return prev;
            }
            backoff(&mut spins);
        }
    }

    /// BROKEN on purpose, test-only (`--cfg hugepunch_broken="mark"`, see
    /// loom-tests): the mark is a Relaxed RMW, so a conversion that marks
    /// after a punch's exit need not see that punch's bits, and may
    /// convert over a pending punch nobody invalidated (invariant 3).
    #[cfg(hugepunch_broken = "mark")]
    pub fn mark_converting(&self) -> Snapshot {
        // ORDERING: Relaxed, the planted bug.
        Snapshot(self.state.fetch_add(CONVERT_ONE, Ordering::Relaxed))
    }

    /// Remove a conversion mark.
    pub fn unmark_converting(&self) {
        // ORDERING: Release: the host's attribute change (made while marked)
        // happens-before any punch exit that reads this value (Acquire), so
        // its `is_shared` call sees the new attribute.
        self.state.fetch_sub(CONVERT_ONE, Ordering::Release);
    }

    /// Claim the huge page for a slow path (`BUSY`), waiting out a
    /// completion in flight and then every registration. Returns the state
    /// once drained.
    pub fn claim_busy(&self) -> Snapshot {
        let mut spins = 0;
        loop {
            // ORDERING: Acquire: the slow path's reads follow the claim.
            let (_, done) = self.update(Ordering::Acquire, |s| {
                (!s.is(BUSY | COMPLETING)).then_some(s.0 | BUSY)
            });
            if done {
                break;
            }
            backoff(&mut spins);
        }
        loop {
            let s = self.load();
            if !s.registered() {
                return s;
            }
            backoff(&mut spins);
        }
    }

    /// Claim `BUSY` only if the huge page is in `mode` and idle; no waiting.
    pub fn try_claim_busy_if(&self, mode: u64) -> Option<Snapshot> {
        // ORDERING: Acquire, as in `claim_busy`.
        let (prev, done) = self.update(Ordering::Acquire, |s| {
            (s.mode() == mode && s.idle() && !s.is(TORN)).then_some(s.0 | BUSY)
        });
        done.then_some(prev)
    }

    /// The shrinker could not claim this huge page: mark it `WANTED` (the
    /// next exit runs the shrinker). Returns the state before. If nothing
    /// was registered by then, the caller may claim it after all.
    pub fn want_shrink(&self) -> Snapshot {
        // ORDERING: AcqRel: an RMW on the state word, so it is ordered
        // against every exit: an exit after it sees `WANTED`; an exit before
        // it is seen here (nothing registered any more).
        Snapshot(self.state.fetch_or(WANTED, Ordering::AcqRel))
    }

    /// Release `BUSY`, setting the mode, `COUNT` and extra flags.
    pub fn release_busy(&self, mode: u64, count: u32, flags: u64) {
        // ORDERING: Release: the slow path's bit writes and host calls
        // happen-before every later entry (Acquire) on this huge page.
        let (_, _) = self.update(Ordering::Release, |s| {
            debug_assert!(s.is(BUSY), "{s:?}");
            let keep = s.0 & ((FIELD_MAX << CONVERTING_SHIFT) | TORN);
            Some(keep | flags | mode | ((count as u64) << COUNT_SHIFT))
        });
    }

    /// End a completion. `freed`: reset the bits and become `ABSENT`;
    /// otherwise stay `HUGE`, every subpage pending.
    pub fn end_completion(&self, freed: bool) {
        if freed {
            for w in self.words {
                // ORDERING: Release: a lock-free reader that reads this
                // reset (populate's fast path, queries) must then see
                // `COMPLETING`, not the state before the claim (loom found
                // it with Relaxed: a populate returning over a freed page).
                w.store(0, Ordering::Release);
            }
        }
        // ORDERING: Release: the bit reset and the host's free happen-before
        // the entry (Acquire) of any later operation on this huge page.
        let (_, _) = self.update(Ordering::Release, |s| {
            debug_assert!(s.is(COMPLETING), "{s:?}");
            let cleared = s.0 & !COMPLETING;
            Some(if freed {
                (cleared & !(MODE_MASK | (u64::MAX << COUNT_SHIFT))) | ABSENT
            } else {
                cleared
            })
        });
    }

    /// Wait until no completion is in flight.
    pub fn wait_completion(&self) {
        let mut spins = 0;
        while self.load().is(COMPLETING) {
            backoff(&mut spins);
        }
    }

    /// Wait until no un-punch is in flight.
    pub fn wait_unpunches(&self) {
        let mut spins = 0;
        while self.load().unpunching() != 0 {
            backoff(&mut spins);
        }
    }

    /// Store the bits of `first .. first + count` as given by `set`
    /// (owner only: `BUSY` or `COMPLETING` held, nothing registered).
    pub fn owner_set(&self, first: u32, count: u32, set: bool) {
        for (w, mask) in word_masks(first, count) {
            // ORDERING: Release, for the lock-free readers as in
            // `end_completion`: one that reads this value then sees `BUSY`.
            if set {
                self.words[w].fetch_or(mask, Ordering::Release);
            } else {
                self.words[w].fetch_and(!mask, Ordering::Release);
            }
        }
    }

    /// The set bits of the whole huge page as (word, bits), owner only.
    pub fn owner_bits(&self) -> Words {
        self.read_bits(0, self.full)
    }
}

#[cfg(all(test, not(hugepunch_loom)))]
mod tests;
