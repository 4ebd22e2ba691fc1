#![doc = include_str!("../../README.md")]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

mod error;
mod file;
mod host;
mod index;
mod page;
mod range;
mod stats;
mod sync;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod trace;
mod unwind;

pub use error::{Error, HostError, EAGAIN, EINVAL, EIO};
pub use file::{Backing, Config, HugePunch, SubpageState, TeardownReport};
pub use host::{Attribute, Host, Policy};
pub use range::{
    ByteRange, Geometry, Hint, PagePart, MAX_ORDER, MAX_SIZE, SUBPAGE_SHIFT, SUBPAGE_SIZE,
};
pub use stats::Stats;
