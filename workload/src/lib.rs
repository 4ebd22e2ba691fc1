//! Workloads for [`hugepunch`]: the operations a VMM sends, in one place
//! for every crate that makes or runs them (the simulated kernel, the
//! Linux backend, the benches, the command line tool).
//!
//! - [`trace`]: the operations ([`Op`]) and the trace format of
//!   docs/CONTRACT.md — a streaming [`Parser`] with [`Limits`], and
//!   [`Trace::to_text`] to write one. The engine keeps no text format of
//!   its own.
//! - [`pattern`]: the adversarial patterns, one generator with one seeded
//!   random number generator ([`Rng`]), so that a pattern's name, geometry,
//!   range and seed mean the same operations in `hugepunch gen`, `hugepunch
//!   real`, the demo and the bench report.
//! - [`target`]: one way to apply an operation — [`apply`] an [`Op`] to a
//!   [`Target`] (the engine, the model's kernel, a real file punched
//!   directly, a benchmark's tracker).
//! - [`guest`]: a guest's writes and reads among the operations, for the
//!   demo, and the demo's workloads.
//! - [`stream`]: the conversion stream a confidential guest sends
//!   (SWIOTLB, virtio rings, coherent DMA, balloon, free page reporting),
//!   from a documented model ([`StreamModel`]).
//!
//! ```
//! use hugepunch::Geometry;
//! use hugepunch_workload::{apply, Pattern, Trace, DEFAULT_SEED};
//!
//! // `hugepunch gen random --size 4M` as a trace, written and read back.
//! let geo = Geometry::new(4 << 20, 9)?;
//! let trace = Pattern::Random.trace(geo, DEFAULT_SEED);
//! assert_eq!(Trace::parse(&trace.to_text())?, trace);
//! assert_eq!(trace.ops.len(), 1024);
//!
//! // Replayed on the engine: both huge pages freed whole.
//! let file = hugepunch::HugePunch::new(hugepunch::Config::new(4 << 20), std::sync::Arc::new(hugepunch::NullHost))?;
//! for (_, op) in &trace.ops {
//!     apply(&file, op)?;
//! }
//! assert_eq!(file.stats().huge_frees, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod guest;
pub mod pattern;
pub mod rng;
pub mod step;
pub mod stream;
pub mod target;
pub mod trace;

pub use guest::{demo_window, demo_workloads, run_step, Guest, Workload};
pub use pattern::{Pattern, UnknownPattern, DEFAULT_SEED};
pub use rng::Rng;
pub use step::Step;
pub use stream::{BadModel, StreamModel};
pub use target::{apply, apply_all, Target};
pub use trace::{
    number, parse_number, Limits, NumberError, Op, ParseError, Parser, Trace, MAX_LINE_BYTES,
};
