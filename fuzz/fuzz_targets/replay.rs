//! The command line's replay (`hugepunch replay`, through the tool's
//! library: `hugepunch_cli::replay_bytes`) on arbitrary bytes: it never
//! panics, refuses what it does not replay with a one-line error, and what
//! it replays on the engine leaves the simulated kernel without a
//! violation of the invariants of docs/CONTRACT.md §4.
//!
//! The options come from the input's length, so that mutations reach all
//! of them without a header the text would have to carry: length mod 4 =
//! 0 the engine alone, 1 the engine with budget 0 and cancel-and-zero,
//! 2 the engine with a 2 MiB budget, 3 every strategy side by side. The
//! limits are the tool's, with a smaller time and memory estimate
//! (0.1 s, 64 MiB, so that one input costs milliseconds); libFuzzer's
//! `-timeout` and `-rss_limit_mb` (ci/fuzz.sh) catch an estimate that is
//! badly wrong.
#![no_main]

use hugepunch::Policy;
use hugepunch_cli::{replay_bytes, Limits, ReplayOptions};
use hugepunch_model::StrategyKind;
use libfuzzer_sys::fuzz_target;

fn options(len: usize) -> ReplayOptions {
    let limits = Limits {
        max_seconds: 0.1,
        max_memory: 64 << 20,
        ..Limits::default()
    };
    let engine = |budget, policy| ReplayOptions {
        strategies: vec![StrategyKind::HugePunch],
        budget,
        policy,
        limits,
    };
    match len % 4 {
        0 => engine(None, None),
        1 => engine(Some(0), Some(Policy::CancelAndZero)),
        2 => engine(Some(2 << 20), Some(Policy::Reject)),
        _ => ReplayOptions {
            strategies: StrategyKind::ALL.to_vec(),
            budget: None,
            policy: None,
            limits,
        },
    }
}

fuzz_target!(|data: &[u8]| {
    match replay_bytes(data, &options(data.len())) {
        Err(e) => {
            let message = e.to_string();
            assert!(
                !message.is_empty() && !message.contains('\n'),
                "not a one-line error: {message:?}"
            );
        }
        Ok(report) => {
            for outcome in &report.outcomes {
                assert!(outcome.failed_operations >= outcome.failures.len() as u64);
                if outcome.kind == StrategyKind::HugePunch {
                    let violations = outcome.kernel.violations();
                    assert!(
                        violations.is_empty(),
                        "the engine violated an invariant: {violations:?}"
                    );
                }
            }
        }
    }
});
