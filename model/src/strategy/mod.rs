//! The strategies compared, behind one interface, all acting on the same
//! simulated kernel ([`KernelHost`]):
//!
//! * [`StrategyKind::HugePunch`]: the engine — defer partial punches of a
//!   huge page, free it whole when all of it is punched.
//! * [`StrategyKind::Eager`]: today's guest_memfd and shmem — a partial
//!   punch splits the huge page and frees the 4 KiB pages now.
//! * [`StrategyKind::ZeroOnly`]: hugetlb — a partial punch only zeroes;
//!   memory is freed only by a punch of a whole huge page in one call.
//! * [`StrategyKind::SinglePartial`]: QEMU's and Cloud Hypervisor's
//!   balloon — one partially punched huge page is tracked; a partial punch
//!   of another drops it, and what was tracked is never freed.
//!
//! Every strategy validates ranges as the engine does, refuses everything
//! after teardown, invalidates a partial punch of possibly-private memory
//! at once (invariant 2 is not a matter of policy), and reports the
//! statistic names of CONTRACT.md §6, counting what it did.

mod baseline;
mod engine;

use crate::host::KernelHost;
use baseline::Baseline;
use hugepunch::{Attribute, ByteRange, Error, Geometry, Policy, Stats};
use serde::Serialize;
use std::sync::Arc;

pub use engine::build_engine;

/// Which strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrategyKind {
    /// The engine.
    HugePunch,
    /// Split and free 4 KiB now.
    Eager,
    /// Zero partial punches, free only whole huge pages punched at once.
    ZeroOnly,
    /// Track one partially punched huge page.
    SinglePartial,
}

impl StrategyKind {
    /// Every strategy, the engine first.
    pub const ALL: [StrategyKind; 4] = [
        StrategyKind::HugePunch,
        StrategyKind::Eager,
        StrategyKind::ZeroOnly,
        StrategyKind::SinglePartial,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::HugePunch => "hugepunch",
            StrategyKind::Eager => "eager",
            StrategyKind::ZeroOnly => "zero-only",
            StrategyKind::SinglePartial => "single-partial",
        }
    }

    /// What it models, in a few words.
    pub fn describes(self) -> &'static str {
        match self {
            StrategyKind::HugePunch => "deferred coalescing (this project)",
            StrategyKind::Eager => "guest_memfd/shmem today: split, free 4 KiB now",
            StrategyKind::ZeroOnly => "hugetlb: zero partial punches, free whole ones",
            StrategyKind::SinglePartial => {
                "QEMU/Cloud Hypervisor balloon: one partial page tracked"
            }
        }
    }

    /// Does it promise that a punched subpage reads as zeros (invariant 5)?
    /// The balloon's tracker does not zero what it un-tracks.
    pub fn zeroes_punched(self) -> bool {
        self != StrategyKind::SinglePartial
    }
}

impl Serialize for StrategyKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for StrategyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StrategyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown strategy {s:?} (expected one of: {})",
                    StrategyKind::ALL.map(|k| k.name()).join(", ")
                )
            })
    }
}

/// One strategy acting on the model. Every operation takes `&self` and
/// may be called from several threads.
pub trait Strategy: Send + Sync {
    /// Which one.
    fn kind(&self) -> StrategyKind;
    /// `punch(offset, len)` (CONTRACT.md §3 for the engine; its own rules for
    /// the others).
    fn punch(&self, offset: u64, len: u64) -> Result<(), Error>;
    /// `convert(offset, len, to)`.
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error>;
    /// `populate(offset, len)`: a fault or a fallocate allocation.
    fn populate(&self, offset: u64, len: u64) -> Result<(), Error>;
    /// `flush(offset, len)`: force out what is pending (a no-op where
    /// nothing is ever pending).
    fn flush(&self, offset: u64, len: u64) -> Result<(), Error>;
    /// Free everything; returns the ranges still allocated (failed frees).
    fn teardown(&self) -> Vec<ByteRange>;
    /// The largest mapping order the fault path may install for huge page `h`.
    fn max_mapping_order(&self, h: u64) -> u8;
    /// Punched, not yet freed subpages of huge page `h` (pending).
    fn pending_in(&self, h: u64) -> u32;
    /// Is the subpage at `offset` punched and pending (reads as zeros)?
    fn is_punched(&self, offset: u64) -> bool;
    /// The statistics of CONTRACT.md §6.
    fn stats(&self) -> Stats;
    /// Bytes of the strategy's own tracking state.
    fn tracking_bytes(&self) -> usize;
}

/// Options of a strategy (the engine's; the others have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// Pending-bytes budget (engine only).
    pub budget: Option<u64>,
    /// Conversion policy (engine only).
    pub policy: Policy,
}

/// Build strategy `kind` for a file of geometry `geo` on `host` (`geo` is
/// valid by construction: [`Geometry::new`] checked it).
pub fn build(
    kind: StrategyKind,
    geo: Geometry,
    populated: bool,
    options: Options,
    host: Arc<KernelHost>,
) -> Result<Box<dyn Strategy>, Error> {
    Ok(match kind {
        StrategyKind::HugePunch => build_engine(geo, populated, options, host)?,
        _ => Box::new(Baseline::new(kind, geo, host)),
    })
}
