//! The `hugepunch` tool as a library: trace replay on the simulated
//! kernel within bounded time and memory ([`replay::replay_bytes`], what
//! the fuzz target calls), the cost estimate behind those bounds
//! ([`cost`]), and the tool's human formatting ([`mod@format`]). The binary
//! (`src/main.rs`) adds the command line, the demo, `gen`, `real` and the
//! reports.
#![deny(missing_docs)]

pub mod cost;
pub mod format;
pub mod replay;

pub use replay::{replay_bytes, Limits, ReplayError, ReplayOptions, ReplayReport};
