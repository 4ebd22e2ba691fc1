//! Replaying a trace (CONTRACT.md §7) on a [`Kernel`]: operations that fail are
//! counted and the replay goes on, as a VMM would report the error to the
//! guest and carry on.

use crate::kernel::Kernel;
use hugepunch::Error;
use hugepunch_workload::{apply, Op, Trace};
use serde::Serialize;

/// One operation that returned an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// Its line in the trace.
    pub line: usize,
    /// The operation.
    pub op: Op,
    /// What it returned.
    #[serde(serialize_with = "display")]
    pub error: Error,
}

fn display<S: serde::Serializer>(e: &Error, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(e)
}

/// Replay every operation of `trace` on `kernel`; `progress` is called
/// with the number of operations done, now and then.
pub fn replay(kernel: &Kernel, trace: &Trace, mut progress: impl FnMut(usize)) -> Vec<Failure> {
    let mut failures = Vec::new();
    for (i, (line, op)) in trace.ops.iter().enumerate() {
        if let Err(error) = apply(kernel, op) {
            failures.push(Failure {
                line: *line,
                op: *op,
                error,
            });
        }
        if i % 1024 == 1023 {
            progress(i + 1);
        }
    }
    progress(trace.ops.len());
    failures
}
