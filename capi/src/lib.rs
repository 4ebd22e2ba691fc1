//! A C ABI for [hugepunch]: deferred hole-punch coalescing for
//! guest memory backed by huge pages, for VMMs written in C (QEMU).
//!
//! The header, `include/hugepunch.h`, is generated from this file by
//! cbindgen and checked in; `tests/header.rs` fails when the two differ and
//! prints the command that regenerates it. `docs/CAPI.md` in the
//! repository walks through the ABI; `examples/qemu_discard.c` is a
//! complete host over a memfd or a KVM guest_memfd, built and run by
//! `tests/c_example.rs`.
//!
//! # Conventions
//!
//! * Every function returns `0` on success or a **negative errno**
//!   (`-EINVAL`, `-EAGAIN`, `-EIO`, ...), as the kernel and QEMU do; what
//!   an error carries comes back through an out-parameter (the offset of a
//!   pending punch, the index of a batch's invalid range).
//! * Every pointer is checked: a null handle or a null required
//!   out-parameter is `-EINVAL`, and nothing changes.
//! * No panic crosses the boundary: every entry point runs under
//!   `catch_unwind`. A panic inside hugepunch (a bug) returns
//!   `-HUGEPUNCH_EPANIC`; the handle stays valid to destroy.
//! * Host callbacks are C function pointers plus an opaque pointer
//!   ([`hugepunch_host`]). C cannot unwind, so a callback reports failure
//!   through its return value; the engine then treats the call exactly as
//!   the [`hugepunch::Host`] trait treats a panicking callback (the
//!   operation runs to its end with that call failed) and the entry point
//!   returns the callback's negative errno.
//!
//! # Thread safety
//!
//! Every function but [`hugepunch_destroy`] may be called from any number
//! of threads at once on the same handle. The callbacks run on the thread
//! that made the call, possibly on several threads at once, and must be
//! thread-safe with their opaque pointer.

#![deny(missing_docs)]
#![allow(non_camel_case_types)] // the C names of the header

use hugepunch::{
    Attribute, Backing, ByteRange, Config, Error, Hint, Host, HostError, HugePunch, Policy,
    SubpageState,
};
use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::Arc;

mod chost;
mod guard;
mod lifecycle;
mod operations;
mod queries;
mod types;

use chost::*;
use guard::*;
pub use lifecycle::*;
pub use operations::*;
pub use queries::*;
pub use types::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_panic_leaves_an_entry_point() {
        // A panic of hugepunch itself (a bug): -HUGEPUNCH_EPANIC.
        let quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let rc = guard(|| panic!("a bug"));
        std::panic::set_hook(quiet);
        assert_eq!(rc, -HUGEPUNCH_EPANIC);
        // A failed C callback carried through the engine: its errno.
        assert_eq!(
            guard(|| resume_unwind(Box::new(CallbackFailed(errno_of(-12))))),
            -12
        );
        assert_eq!(guard(|| 0), 0);
    }

    #[test]
    fn callback_results_become_errnos() {
        assert_eq!(errno_of(-12), 12);
        assert_eq!(errno_of(1), EIO, "a positive return is a failure");
        assert_eq!(errno_of(c_int::MIN), EIO, "no overflow");
        assert_eq!(host_result(0), Ok(()));
        assert_eq!(host_result(-28), Err(HostError { errno: 28 }));
    }
}
