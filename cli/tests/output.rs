//! What a person reads: every line of the tool's
//! output fits a 100-column terminal, verdicts say what their tables show,
//! `--help` lists the patterns and every default, and a mistake in the
//! arguments points to the subcommand's own help.

use std::process::{Command, Output};

/// The subcommands (`real` and `vm` only on Linux).
const SUBCOMMANDS: &[&str] = if cfg!(target_os = "linux") {
    &["demo", "replay", "gen", "stream", "real", "vm"]
} else {
    &["demo", "replay", "gen", "stream"]
};

const PATTERNS: [&str; 8] = [
    "ascending",
    "descending",
    "random",
    "strided",
    "round-robin",
    "pin",
    "conversion-churn",
    "straddling",
];

fn run(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_hugepunch"))
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{args:?}: exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(args: &[&str]) -> String {
    String::from_utf8(run(args).stdout).expect("UTF-8")
}

fn mixed_trace() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/mixed.trace").to_string()
}

/// Standard output is not a terminal here: the tool writes 100 columns.
fn assert_fits(args: &[&str], text: &str) {
    for (i, line) in text.lines().enumerate() {
        assert!(
            line.chars().count() <= 100,
            "{args:?}, line {}: {} columns:\n{line}",
            i + 1,
            line.chars().count()
        );
    }
}

#[test]
fn every_line_of_the_demo_fits_100_columns() {
    let text = stdout(&["demo"]);
    assert!(text.contains("verdict:"), "{text}");
    assert_fits(&["demo"], &text);
}

#[test]
fn every_line_of_replay_and_help_fits_100_columns() {
    let trace = mixed_trace();
    let mut runs: Vec<Vec<&str>> = vec![
        vec!["replay", &trace, "--strategy", "all"],
        vec!["replay", &trace],
        vec!["--help"],
        vec!["-h"],
    ];
    for &sub in SUBCOMMANDS {
        runs.push(vec![sub, "--help"]);
        runs.push(vec![sub, "-h"]);
    }
    for args in runs {
        let text = stdout(&args);
        assert!(!text.is_empty(), "{args:?}");
        assert_fits(&args, &text);
    }
}

#[cfg(target_os = "linux")]
#[test]
fn every_line_of_real_fits_100_columns_and_the_footnote_comes_once() {
    let args = ["real", "--size", "64M", "--pattern", "all"];
    let text = stdout(&args);
    assert_fits(&args, &text);
    assert_eq!(text.matches("hugepunch real: pattern").count(), 8, "{text}");
    assert!(
        text.matches("no huge page backing here").count() <= 1,
        "one footnote: {text}"
    );
}

/// pin keeps one subpage of every huge page: the engine releases nothing
/// (it defers), so its run is not "faster" than one that did the work.
#[cfg(target_os = "linux")]
#[test]
fn real_never_calls_a_run_that_released_nothing_faster() {
    let json = stdout(&["real", "--size", "8M", "--pattern", "pin", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["engine"]["bytes_released"], 0, "pin releases nothing");
    let text = stdout(&["real", "--size", "8M", "--pattern", "pin"]);
    assert!(
        !text.contains("faster") && !text.contains("slower"),
        "{text}"
    );
    assert!(text.contains("hugepunch released nothing"), "{text}");
    // Where both released the same, the times are compared.
    let text = stdout(&["real", "--size", "8M", "--pattern", "ascending"]);
    assert!(
        text.contains("x faster") || text.contains("x slower"),
        "{text}"
    );
}

fn count(n: u64) -> String {
    hugepunch_cli::format::count(n)
}

/// The straddling verdict gives eager's free calls, the figure of its own
/// table (not the 4 KiB subpages freed, which differ here).
#[test]
fn the_straddling_verdict_counts_the_tables_free_calls() {
    let args = [
        "demo",
        "--size",
        "32M",
        "--window",
        "16M",
        "--only",
        "straddling",
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let v: serde_json::Value = serde_json::from_str(&stdout(&json_args)).unwrap();
    let w = &v["workloads"][0];
    let rows = w["rows"].as_array().unwrap();
    let row = |s: &str| rows.iter().find(|r| r["label"] == s).unwrap();
    let (eager, hp) = (row("eager"), row("hugepunch"));
    let eager_calls = eager["stats"]["free_calls"].as_u64().unwrap();
    let eager_subpages = eager["stats"]["small_freed_subpages"].as_u64().unwrap();
    assert_ne!(eager_calls, eager_subpages, "the case that was wrong");
    let verdict = w["verdict"].as_str().unwrap();
    assert!(
        verdict.contains(&format!("with {} free calls", count(eager_calls))),
        "{verdict}"
    );
    assert!(
        !verdict.contains(&count(eager_subpages)),
        "no 4 KiB count: {verdict}"
    );
    let hp_calls = hp["stats"]["free_calls"].as_u64().unwrap();
    assert!(
        verdict.contains(&format!("in {} free calls", count(hp_calls))),
        "{verdict}"
    );
    // The table printed beside it shows the same figures.
    let text = stdout(&args);
    let table_row = |label: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{label} ")))
            .unwrap_or_else(|| panic!("row {label}: {text}"))
            .to_string()
    };
    assert!(
        table_row("eager").contains(&format!(" {} ", count(eager_calls))),
        "{text}"
    );
}

/// One rounding rule: `2 MiB` is exactly 2 MiB; no `2.00 MiB`.
#[test]
fn sizes_have_one_rounding_rule() {
    let text = stdout(&["replay", &mixed_trace(), "--strategy", "all"]);
    assert!(!text.contains(".00 "), "{text}");
    assert!(
        text.contains("256 MiB file with 2 MiB huge pages"),
        "{text}"
    );
}

/// Every option that takes a value shows its default, in `-h` and
/// `--help`; the pattern names are listed where a pattern is asked for.
#[test]
fn help_shows_every_default_and_the_pattern_names() {
    for &sub in SUBCOMMANDS {
        for flag in ["-h", "--help"] {
            let text = stdout(&[sub, flag]);
            let options = text.split("Options:").nth(1).expect("options");
            let options = options.split("Trace format").next().unwrap();
            // One block per option: from its line to the next option's.
            let mut blocks: Vec<String> = Vec::new();
            for line in options.lines() {
                let t = line.trim_start();
                if t.starts_with("--") || (t.starts_with('-') && t.chars().nth(2) == Some(',')) {
                    blocks.push(String::new());
                }
                if let Some(b) = blocks.last_mut() {
                    b.push_str(line);
                    b.push('\n');
                }
            }
            assert!(!blocks.is_empty(), "{sub} {flag}: {text}");
            for b in blocks {
                let head = b.lines().next().unwrap();
                if head.contains('<') {
                    assert!(
                        b.contains("[default:"),
                        "{sub} {flag}: no default shown for\n{b}"
                    );
                }
            }
            if !matches!(sub, "replay" | "stream") {
                for p in PATTERNS {
                    assert!(text.contains(p), "{sub} {flag}: pattern {p} not listed");
                }
            }
        }
    }
    let replay = stdout(&["replay", "--help"]);
    for word in [
        "size N",
        "order N",
        "start populated|empty",
        "start private|shared",
        "punch OFFSET LEN",
        "convert OFFSET LEN private|shared",
        "populate OFFSET LEN",
        "flush OFFSET LEN",
        "teardown",
        "0x",
        "K, M or G",
        "docs/CONTRACT.md",
    ] {
        assert!(replay.contains(word), "replay --help lacks {word:?}");
    }
    assert!(!replay.contains("SPEC.md"));
}

/// A mistake in a subcommand's arguments ends with where its help is.
#[test]
fn argument_errors_point_to_the_subcommands_help() {
    let trace = mixed_trace();
    for (args, sub) in [
        (
            vec!["replay", trace.as_str(), "--strategy", "lazy"],
            "replay",
        ),
        (vec!["replay"], "replay"),
        (
            vec![
                "replay",
                trace.as_str(),
                "--strategy",
                "eager",
                "--budget",
                "2M",
            ],
            "replay",
        ),
        (vec!["gen", "sideways"], "gen"),
        (vec!["gen", "random", "--size", "3M"], "gen"),
        (vec!["demo", "--only", "nope"], "demo"),
        (vec!["demo", "--size", "3M"], "demo"),
        (vec!["real", "--pattern", "nope"], "real"),
        (vec!["real", "--size", "0x4000000000000000"], "real"),
    ] {
        if !SUBCOMMANDS.contains(&sub) {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_hugepunch"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains(&format!("see 'hugepunch {sub} --help'")),
            "{args:?}: {err}"
        );
    }
}
