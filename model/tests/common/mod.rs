//! Helpers shared by the model's integration tests.
#![allow(dead_code)]

/// [`watchdog::Watchdog`]: every multi-threaded test arms one, so that a
/// livelock or deadlock fails the run naming the test instead of hanging.
pub mod watchdog;
