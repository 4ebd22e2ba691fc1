//! Helpers shared by the model's integration tests.
#![allow(dead_code)]

/// The workspace's test watchdog (`hugepunch::testing::watchdog`).
#[allow(unused_imports)] // not every test binary arms one
pub use hugepunch::testing::watchdog;
