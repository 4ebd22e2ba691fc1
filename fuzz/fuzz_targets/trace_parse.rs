//! The trace parser (SPEC.md §7) on arbitrary bytes: it never panics, its
//! memory stays proportional to its input (libFuzzer's `-malloc_limit_mb`
//! catches any single allocation sized by a number in the text), and every
//! accepted trace survives a write-then-parse round trip through the
//! writer of `hugepunch gen` unchanged.
#![no_main]

use hugepunch::trace::{Op, Trace};
use hugepunch_fuzz::write_trace;
use libfuzzer_sys::fuzz_target;

fn ops(t: &Trace) -> Vec<Op> {
    t.ops.iter().map(|(_, op)| *op).collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(trace) = Trace::parse(text) else {
        return;
    };
    // One operation per line at most, each numbered by its own line, in
    // order.
    let lines = text.lines().count();
    assert!(trace.ops.len() <= lines);
    assert!(trace.ops.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(trace
        .ops
        .last()
        .is_none_or(|(l, _)| (1..=lines).contains(l)));

    let written = write_trace(&trace);
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
