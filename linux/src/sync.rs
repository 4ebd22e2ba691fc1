//! The only door to atomics in this crate (house rule: one `sync` module).
//! The backend is not model-checked with loom (its atomics are counters and
//! an attribute bitmap, see `host`), so this is plain `std`.

pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
