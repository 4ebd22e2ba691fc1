//! Test support, compiled only with the `test-util` feature: a host that
//! does nothing, a recording host, a forwarding host with hooks (to block,
//! panic, fail or skip inside a callback), the sequential reference model of `docs/CONTRACT.md` §3 and
//! §6, and the differential harness that runs one case on both and
//! compares them after every step. The engine's property tests and its
//! `differential` fuzz target share them, so both judge the engine by the
//! same oracle.
//!
//! Not for production: the host and the model keep one entry per subpage
//! (small files only), and the host panics on a double free or a double
//! allocation so that a test sees them. The host's knobs use the standard
//! library's atomics and locks directly, not the crate's `sync` facade:
//! they must stay real under `--cfg hugepunch_loom`, outside any model.

mod differential;
mod hooked;
mod host;
mod model;
mod null;
pub mod watchdog;

pub use differential::{
    check_state, engine_stats, merge_zeros, normalise, run_case, run_engine, run_model, CaseStep,
    Mismatch, Outcome,
};
pub use hooked::{Action, Hook, HookedHost};
pub use host::{Event, RecordingHost};
pub use model::{MBacking, MPage, Model, Setup};
pub use null::NullHost;
