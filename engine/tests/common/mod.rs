//! Test hosts and helpers shared by the engine's integration tests.
#![allow(dead_code)]

/// The workspace's test watchdog (`hugepunch::testing::watchdog`).
#[allow(unused_imports)] // not every test binary arms one
pub use hugepunch::testing::watchdog;

/// The recording host moved to `hugepunch::testing` (the `test-util`
/// feature), where the fuzz targets use it too.
#[allow(unused_imports)] // each test binary uses its own part of it
pub use hugepunch::testing::{Event, RecordingHost};

use hugepunch::{Config, Error, HugePunch, Policy};
use hugepunch_workload::{apply, Trace};
use std::sync::Arc;

/// Parse the flags of an expected-figures key (`defaults`, `--budget 2M`,
/// `--policy cancel-and-zero`).
pub fn flags(key: &str) -> (Option<u64>, Policy) {
    let mut budget = None;
    let mut policy = Policy::Reject;
    let words: Vec<&str> = if key == "defaults" {
        vec![]
    } else {
        key.split_whitespace().collect()
    };
    for pair in words.chunks(2) {
        match pair {
            ["--budget", b] => budget = Some(hugepunch_workload::parse_number(b).expect("budget")),
            ["--policy", "cancel-and-zero"] => policy = Policy::CancelAndZero,
            ["--policy", "reject"] => policy = Policy::Reject,
            other => panic!("unknown flags {other:?}"),
        }
    }
    (budget, policy)
}

/// Replay a trace on a fresh engine and recording host.
pub fn replay(
    trace: &Trace,
    budget: Option<u64>,
    policy: Policy,
) -> (HugePunch, Arc<RecordingHost>, Vec<Result<(), Error>>) {
    let host = RecordingHost::new(trace.size, trace.start, trace.populated);
    let mut cfg = Config::new(trace.size).order(trace.order).policy(policy);
    cfg.populated = trace.populated;
    cfg.budget = budget;
    let engine = HugePunch::new(cfg, host.clone()).expect("valid config");
    let results = trace.ops.iter().map(|(_, op)| apply(&engine, op)).collect();
    (engine, host, results)
}
