//! The only door to atomics in this crate (house rule: one `sync` module
//! per crate that uses them).

pub(crate) use std::sync::atomic::{AtomicBool, Ordering};
