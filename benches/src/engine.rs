//! The engine, on a host that does nothing or on one whose memory is all
//! private.

use crate::Tracker;
use hugepunch::{Attribute, ByteRange, Config, Error, Hint, Host, HostError, HugePunch};
use hugepunch_workload::Target;
use std::sync::Arc;

/// A host that does nothing (all memory shared, frees succeed): the cost
/// measured is the engine's own.
pub use hugepunch::NullHost;

/// A host whose memory is all private (every partial punch invalidates
/// now, the immediate-invalidation path); otherwise the [`NullHost`].
pub struct PrivateHost;

impl Host for PrivateHost {
    fn is_shared(&self, _: ByteRange) -> bool {
        false
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

/// hugepunch itself.
pub struct Engine(pub HugePunch);

impl Engine {
    /// A populated file of `huge_pages` 2 MiB huge pages, all shared.
    pub fn new(huge_pages: u64) -> Self {
        Self::with_host(huge_pages, Arc::new(NullHost))
    }

    /// The same over `host`.
    pub fn with_host(huge_pages: u64, host: Arc<dyn Host>) -> Self {
        Engine(HugePunch::new(Config::new(huge_pages << 21), host).expect("valid config"))
    }
}

impl Target for Engine {
    type Error = Error;
    fn punch(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.0.punch(offset, len)
    }
    fn convert(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Error> {
        self.0.convert(offset, len, to)
    }
    fn populate(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.0.populate(offset, len)
    }
    fn flush(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.0.flush(offset, len)
    }
    fn teardown(&self) -> Result<(), Error> {
        self.0.teardown();
        Ok(())
    }
}

impl Tracker for Engine {
    fn completions(&self) -> u64 {
        self.0.stats().huge_frees
    }
}
