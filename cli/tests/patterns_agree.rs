//! One pattern, one meaning: for a few patterns P, one size and one seed,
//! `hugepunch gen P | hugepunch replay -`, `hugepunch real --pattern P` and
//! the bench report's P run the same operations.
//!
//! The operation lists are compared exactly where each user takes them
//! from (the trace `gen` writes, what `hugepunch real` runs, the bench
//! report's one-thread workload); the commands are compared by what the
//! engine counted: gen's output piped into `replay -` and the real run on
//! memfd report the same number of operations and the same statistics,
//! counter for counter.

use hugepunch::Geometry;
use hugepunch_workload::{Op, Pattern, Trace};
use serde_json::Value;
use std::io::Write as _;
use std::process::{Command, Output, Stdio};

/// Small: four 2 MiB huge pages.
const SIZE: u64 = 8 << 20;
const SIZE_ARG: &str = "8M";
const SEED: u64 = 5;
const SEED_ARG: &str = "5";
/// The seeded patterns, and two that are not.
const PATTERNS: [&str; 6] = [
    "random",
    "pin",
    "straddling",
    "conversion-churn",
    "round-robin",
    "ascending",
];

fn hugepunch(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hugepunch"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the hugepunch binary runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input)
            .expect("write the trace to replay's stdin");
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "hugepunch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// `hugepunch gen P --size 8M --seed 5`: its text and its operations.
fn gen(pattern: &str, seed: &str) -> (Vec<u8>, Vec<Op>) {
    let text = hugepunch(&["gen", pattern, "--size", SIZE_ARG, "--seed", seed], None).stdout;
    let trace = Trace::parse(std::str::from_utf8(&text).unwrap()).unwrap();
    assert_eq!((trace.size, trace.order), (SIZE, 9));
    let ops = trace.ops.into_iter().map(|(_, op)| op).collect();
    (text, ops)
}

#[test]
fn gen_replay_real_and_the_bench_report_run_the_same_operations() {
    let geo = Geometry::new(SIZE, 9).unwrap();
    for name in PATTERNS {
        let pattern: Pattern = name.parse().unwrap();
        let (text, ops) = gen(name, SEED_ARG);
        assert_eq!(
            ops,
            pattern.ops(geo, 0, SIZE, SEED),
            "{name}: gen writes the workload crate's operations"
        );

        // The bench report's P with one thread: the same list.
        let bench = hugepunch_benches::workload(
            pattern,
            SIZE >> 21,
            1,
            hugepunch_benches::Sharing::Disjoint,
            SEED,
        );
        assert_eq!(bench, vec![ops.clone()], "{name}: the bench report's");

        // gen | replay -: every operation, through the engine.
        let replay = json(&hugepunch(&["replay", "-", "--json"], Some(&text)));
        assert_eq!(replay["operations"], ops.len(), "{name}: replay -");
        assert_eq!(replay["model"]["violations"], 0, "{name}");

        #[cfg(target_os = "linux")]
        {
            // What `hugepunch real` runs: the same list ...
            assert_eq!(
                hugepunch_linux::replay::ops(pattern, SIZE, SEED).unwrap(),
                ops,
                "{name}: real's operations"
            );
            // ... and what it ran: as many operations, and the engine
            // counted exactly what it counted under replay.
            let real = json(&hugepunch(
                &[
                    "real",
                    "--backend",
                    "memfd",
                    "--size",
                    SIZE_ARG,
                    "--pattern",
                    name,
                    "--seed",
                    SEED_ARG,
                    "--json",
                ],
                None,
            ));
            assert_eq!(real["operations"], ops.len(), "{name}: real");
            assert_eq!(real["seed"], SEED, "{name}: real");
            assert_eq!(
                real["engine_stats"], replay["stats"],
                "{name}: the engine counted the same on real memory as on the model"
            );
        }
    }
}

/// The comparisons above are not vacuous: another seed is another
/// pattern, for every seeded one.
#[test]
fn another_seed_is_another_pattern() {
    for name in ["random", "pin", "straddling"] {
        assert_ne!(gen(name, SEED_ARG).1, gen(name, "6").1, "{name}");
    }
    assert_eq!(gen("ascending", SEED_ARG).1, gen("ascending", "6").1);
}
