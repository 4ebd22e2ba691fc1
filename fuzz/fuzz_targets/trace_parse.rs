//! The trace parser (docs/CONTRACT.md §7, `hugepunch_workload::Trace`) on
//! arbitrary bytes: it never panics, its memory stays proportional to its
//! input (libFuzzer's `-malloc_limit_mb` catches any single allocation
//! sized by a number in the text), and every accepted trace survives a
//! write-then-parse round trip through the project's writer
//! (`Trace::to_text`, what `hugepunch gen` prints) unchanged, line numbers
//! aside.
//!
//! Inputs of odd length are parsed under tight limits (lines of 64 bytes,
//! 8 operations), so that the limits' refusals are fuzzed too.
#![no_main]

use hugepunch_workload::{Limits, Op, Trace};
use libfuzzer_sys::fuzz_target;

fn ops(t: &Trace) -> Vec<Op> {
    t.ops.iter().map(|(_, op)| *op).collect()
}

fuzz_target!(|data: &[u8]| {
    let limits = if data.len() % 2 == 1 {
        Limits {
            max_line_bytes: 64,
            max_operations: 8,
        }
    } else {
        Limits::default()
    };
    let Ok(trace) = Trace::parse_bytes(data, limits) else {
        return;
    };
    // One operation per line at most, each numbered by its own line, in
    // order, within the limits.
    let lines = data.split(|&b| b == b'\n').count();
    assert!(trace.ops.len() <= lines.min(limits.max_operations));
    assert!(trace.ops.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(trace
        .ops
        .last()
        .is_none_or(|(l, _)| (1..=lines).contains(l)));

    let written = trace.to_text();
    let again = match Trace::parse(&written) {
        Ok(t) => t,
        Err(e) => panic!("the written trace does not parse: {e}\n{written}"),
    };
    assert_eq!(
        (trace.size, trace.order, trace.populated, trace.start),
        (again.size, again.order, again.populated, again.start),
        "header changed by the round trip:\n{written}"
    );
    assert_eq!(
        ops(&trace),
        ops(&again),
        "operations changed by the round trip"
    );
});
