//! A simulated kernel for [`hugepunch`], and the strategies it is compared
//! with.
//!
//! The model links the engine the way a kernel would: [`KernelHost`]
//! implements [`hugepunch::Host`] over simulated memory (huge folios and
//! 4 KiB pages with content), per-subpage attributes, a KVM-like MMU with
//! the fault-retry protocol ([`mmu`]) and a 2 MiB direct map. A
//! [`Kernel`] puts one [`Strategy`] on one host and adds a guest that
//! writes and reads through the MMU, checking invariants 2, 4 and 5 of
//! docs/CONTRACT.md as it goes. Everything is sparse: the model's size grows with
//! the huge pages a run touches, not with the file.
//!
//! ```
//! use hugepunch_model::{Kernel, ModelConfig, StrategyKind};
//! let k = Kernel::new(ModelConfig::new(8 << 20), StrategyKind::HugePunch).unwrap();
//! let token = k.guest_write(0x3000).unwrap();
//! for s in 0..512u64 {
//!     if s != 3 {
//!         k.punch(s * 4096, 4096).unwrap();
//!     }
//! }
//! assert_eq!(k.guest_read(0x3000).unwrap(), token); // kept
//! assert_eq!(k.stats().pending_subpages, 511);
//! assert!(k.violations().is_empty());
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod geometry;
pub mod host;
pub mod kernel;
pub mod mmu;
pub mod rangemap;
pub mod replay;
pub mod strategy;
mod sync;

pub use host::{HugePageBacking, KernelHost, MemoryFigures, Violation};
pub use kernel::{Figures, Kernel, ModelConfig, PageView, Verification};
pub use replay::{replay, Failure};
pub use strategy::{Options, Strategy, StrategyKind};
