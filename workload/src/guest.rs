//! The guest's accesses among a pattern's operations: a [`Step`] is an
//! operation or a guest write or read, a [`Guest`] a target a guest can
//! access (the simulated kernel), and the demo's workloads are patterns
//! over a window of a guest with the guest's accesses around them, so
//! that lost or stale data shows.

use crate::pattern::Pattern;
pub use crate::step::Step;
use crate::target::{apply, Target};
use hugepunch::{Geometry, SUBPAGE_SIZE};

/// A target with a guest that writes and reads its memory.
pub trait Guest: Target {
    /// The guest writes the subpage at `offset`.
    fn guest_write(&self, offset: u64) -> Result<(), Self::Error>;
    /// The guest reads the subpage at `offset`.
    fn guest_read(&self, offset: u64) -> Result<(), Self::Error>;
}

/// Run one step on `target`.
pub fn run_step<T: Guest + ?Sized>(target: &T, step: &Step) -> Result<(), T::Error> {
    match *step {
        Step::Op(ref op) => apply(target, op),
        Step::GuestWrite(offset) => target.guest_write(offset),
        Step::GuestRead(offset) => target.guest_read(offset),
    }
}

/// A demo workload: a pattern over a window of a guest, with the guest's
/// own accesses around it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The pattern.
    pub pattern: Pattern,
    /// The window's size in bytes.
    pub window: u64,
    /// Its steps.
    pub steps: Vec<Step>,
}

/// The window the demo's workloads punch in a guest of geometry `geo`
/// when asked for `window` bytes: at most the guest less a huge page on
/// each side, at least one huge page, whole huge pages.
pub fn demo_window(geo: Geometry, window: u64) -> u64 {
    let hps = geo.huge_page_size();
    window.min(geo.size().saturating_sub(2 * hps)).max(hps) / hps * hps
}

/// The demo's workloads for a guest of geometry `geo`: every pattern over
/// a window of [`demo_window`] bytes in the middle of the guest, the
/// pattern of index `i` in [`Pattern::ALL`] with seed `seed + i`. Before
/// each, the guest writes the first subpage of every huge page of the
/// window (so it is mapped, huge, and punches must invalidate it) and one
/// witness subpage in each neighbouring huge page; then the pattern's
/// steps ([`Pattern::steps`]); after it, the guest reads the witnesses
/// back.
pub fn demo_workloads(geo: Geometry, window: u64, seed: u64) -> Vec<Workload> {
    let hps = geo.huge_page_size();
    let window = demo_window(geo, window);
    let base = ((geo.size() - window) / 2) / hps * hps;
    let witnesses: Vec<u64> = [base.checked_sub(SUBPAGE_SIZE), Some(base + window)]
        .into_iter()
        .flatten()
        .filter(|&w| w < geo.size())
        .collect();
    Pattern::ALL
        .iter()
        .enumerate()
        .map(|(i, &pattern)| {
            let mut steps: Vec<Step> = (0..window / hps)
                .map(|h| Step::GuestWrite(base + h * hps))
                .collect();
            steps.extend(witnesses.iter().map(|&w| Step::GuestWrite(w)));
            steps.extend(pattern.steps(geo, base, window, seed.wrapping_add(i as u64)));
            steps.extend(witnesses.iter().map(|&w| Step::GuestRead(w)));
            Workload {
                pattern,
                window,
                steps,
            }
        })
        .collect()
}
