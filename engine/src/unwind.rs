//! Panicking host callbacks: the one rule the engine keeps (see the
//! "Panic" section of [`Host`](crate::Host)).
//!
//! Every host callback is called through [`Caught::call`], which catches a
//! panic, keeps the first one, and reports the call as *failed*. The
//! operation then runs to its end exactly as it would have with that
//! failure — the huge page's state word, bitmap and statistics move only
//! through the ordinary success and failure paths, which the reference
//! model and the loom models check — and only then, once its statistics
//! are applied, is the first panic resumed to the caller. So there is no
//! separate unwind path to get wrong: no guard restores a state by hand,
//! nothing frees twice, and the statistics equal the bitmaps at every
//! quiescent point, panics or not.
//!
//! What "failed" means for each callback:
//!
//! | callback | a panic counts as |
//! |---|---|
//! | `is_shared` | `false` (possibly private: invalidate now, always safe) |
//! | `invalidate_begin` | the invalidation did not happen: nothing is freed under it (a completion or teardown free stays pending / allocated; a forced split is abandoned; a punch of a `Split` huge page keeps its subpages present and zeroes them) |
//! | `invalidate_end` | the invalidation happened (its `begin` returned); what was freed under it stays freed |
//! | `free` | a failed free (`free_errors`): the memory stays allocated |
//! | `zero` | the subpages were not zeroed: an un-punch leaves them punched |
//! | `allocate` | a failed allocation (the huge page stays `Absent`) |
//! | `set_attributes` | the attribute did not change; the conversion is still counted as the engine decided it |

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// The first panic a host callback raised during one operation.
#[derive(Default)]
pub(crate) struct Caught(Option<Box<dyn Any + Send>>);

impl Caught {
    /// Call a host callback; `None` if it panicked (the panic is kept).
    #[inline(always)]
    pub fn call<R>(&mut self, f: impl FnOnce() -> R) -> Option<R> {
        // `AssertUnwindSafe`: a panic is not observed half-way; the caller
        // treats the call as failed and carries on through its ordinary
        // failure path, and the host's own state is the host's business.
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => Some(r),
            Err(payload) => {
                self.0.get_or_insert(payload);
                None
            }
        }
    }

    /// Has a callback of this operation panicked?
    pub fn any(&self) -> bool {
        self.0.is_some()
    }

    /// Resume the first panic, if any (at the very end of an operation).
    pub fn resume(&mut self) {
        if let Some(payload) = self.0.take() {
            resume_unwind(payload);
        }
    }
}
