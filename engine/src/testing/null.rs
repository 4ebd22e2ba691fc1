//! [`NullHost`]: a host that does nothing.

use crate::{Attribute, ByteRange, Hint, Host, HostError};

/// A host that does nothing and records nothing: all memory is shared (so
/// no punch needs an immediate invalidation), and every allocation and free
/// succeeds. For measuring the engine's own cost, and for tests that look
/// only at the engine's side; wrap it in a [`HookedHost`](super::HookedHost)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, HugePunch};
    use std::sync::Arc;

    #[test]
    fn a_file_on_the_null_host_completes_its_huge_pages() {
        let file = HugePunch::new(Config::new(4 << 20), Arc::new(NullHost)).unwrap();
        file.punch(0, 2 << 20).unwrap();
        file.punch(2 << 20, 4096).unwrap();
        let s = file.stats();
        assert_eq!((s.huge_frees, s.pending_subpages), (1, 1));
    }
}
