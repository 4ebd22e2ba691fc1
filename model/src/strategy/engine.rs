//! The engine as a strategy.

use super::{Options, Strategy, StrategyKind};
use crate::sync::{AtomicBool, Ordering};
use hugepunch::{Attribute, ByteRange, Config, Error, Geometry, Host, HugePunch, Stats};
use std::sync::Arc;

/// Build the engine for a file of geometry `geo` on any host (the model's,
/// or a wrapper around it, as the planted-bug tests use).
pub fn build_engine(
    geo: Geometry,
    populated: bool,
    options: Options,
    host: Arc<dyn Host>,
) -> Result<Box<dyn Strategy>, Error> {
    let mut cfg = Config::new(geo.size())
        .order(geo.order())
        .policy(options.policy);
    cfg.populated = populated;
    cfg.budget = options.budget;
    let engine = HugePunch::new(cfg, host)?;
    Ok(Box::new(Engine {
        engine,
        geo,
        torn: AtomicBool::new(false),
    }))
}

struct Engine {
    engine: HugePunch,
    geo: Geometry,
    /// Set once teardown ran: the engine's queries would then answer
    /// `TornDown` and count it, so the model stops asking.
    torn: AtomicBool,
}

impl Engine {
    fn torn(&self) -> bool {
        // ORDERING: Relaxed: only keeps the model from asking a torn-down
        // engine; the engine itself orders teardown against operations.
        self.torn.load(Ordering::Relaxed)
    }
}

impl Strategy for Engine {
    fn kind(&self) -> StrategyKind {
        StrategyKind::HugePunch
    }
    fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.engine.punch(offset, len)
    }
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        self.engine.convert(offset, len, to)
    }
    fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.engine.populate(offset, len)
    }
    fn flush(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.engine.flush(offset, len)
    }
    fn teardown(&self) -> Vec<ByteRange> {
        // ORDERING: Relaxed: see `torn`.
        self.torn.store(true, Ordering::Relaxed);
        self.engine.teardown().still_allocated
    }
    fn max_mapping_order(&self, h: u64) -> u8 {
        if self.torn() || h >= self.geo.huge_pages() {
            return 0;
        }
        self.engine.max_mapping_order(h).unwrap_or(0)
    }
    fn pending_in(&self, h: u64) -> u32 {
        if self.torn()
            || h >= self.geo.huge_pages()
            || self.max_mapping_order(h) == self.geo.order()
        {
            return 0;
        }
        if self.engine.backing(h).ok() != Some(hugepunch::Backing::Huge) {
            return 0;
        }
        let r = self.geo.huge_page_range(h);
        self.engine
            .pending_ranges(r.offset, r.len)
            .map_or(0, |v| v.iter().map(|r| r.subpages() as u32).sum())
    }
    fn is_punched(&self, offset: u64) -> bool {
        !self.torn() && offset < self.geo.size() && self.engine.is_punched(offset).unwrap_or(false)
    }
    fn stats(&self) -> Stats {
        self.engine.stats()
    }
    fn tracking_bytes(&self) -> usize {
        self.engine.tracking_bytes()
    }
}
