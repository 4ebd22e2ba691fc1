//! [`NullHost`]: a host that does nothing (the engine's own, re-exported
//! here beside the other test hosts).

pub use crate::host::NullHost;

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
