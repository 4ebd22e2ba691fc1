//! The `hugepunch` binary, as a user runs it.

#[cfg(target_os = "linux")]
hugepunch_probe::include_needs!();

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hugepunch"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/examples")
}

fn tmp(name: &str, text: &str) -> PathBuf {
    // Under target/tmp (cargo's scratch space for tests), not /tmp: nothing is
    // left behind on the machine.
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

/// A user error: non-zero exit, exactly one line on stderr, no panic.
fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout");
    err
}

const STAT_NAMES: [&str; 19] = [
    "punch_calls",
    "convert_calls",
    "populate_calls",
    "punched_subpages",
    "pending_subpages",
    "pending_bytes_peak",
    "huge_frees",
    "teardown_frees",
    "small_freed_subpages",
    "free_calls",
    "invalidations",
    "invalidations_immediate",
    "conversions_ok",
    "conversions_rejected",
    "repopulated_subpages",
    "forced_splits",
    "free_errors",
    "errors_invalid_range",
    "errors_torn_down",
];

#[test]
fn every_worked_example_gives_its_figures() {
    let mut checked = 0;
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".expected.json") else {
            continue;
        };
        let trace = examples().join(format!("{stem}.trace"));
        let expected: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (flags, want) in expected {
            let mut args = vec!["replay", trace.to_str().unwrap(), "--json"];
            if flags != "defaults" {
                args.extend(flags.split_whitespace());
            }
            let got = json(&run(&args));
            let stats = got["stats"].as_object().expect("stats object");
            assert_eq!(
                stats.len(),
                STAT_NAMES.len(),
                "{stem} [{flags}]: exactly the names of docs/CONTRACT.md §6"
            );
            for name in STAT_NAMES {
                assert!(stats.contains_key(name), "{stem}: missing {name}");
            }
            for (stat, value) in want.as_object().unwrap() {
                assert_eq!(stats.get(stat), Some(value), "{stem} [{flags}]: {stat}");
            }
            assert_eq!(
                got["model"]["violations"], 0,
                "{stem}: the model saw a violation"
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} example runs");
}

#[test]
fn the_host_saw_what_the_engine_counted() {
    let got = json(&run(&[
        "replay",
        examples().join("seed-example.trace").to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(
        got["model"]["host"]["invalidations"],
        got["stats"]["invalidations"]
    );
    assert_eq!(
        got["model"]["host"]["free_calls"],
        got["stats"]["free_calls"]
    );
    assert_eq!(got["model"]["bytes_freed"], 2 << 20);
}

#[test]
fn malformed_line_names_its_line() {
    let p = tmp(
        "malformed.trace",
        "size 4M\n# fine\npunch 0 4K\npunch 0x1000 twelve\npunch 0 4K\n",
    );
    let err = one_line_error(&run(&["replay", p.to_str().unwrap()]));
    assert!(err.contains("line 4"), "{err}");
    let p = tmp("header-late.trace", "punch 0 4K\nsize 4M\n");
    assert!(one_line_error(&run(&["replay", p.to_str().unwrap(), "--json"])).contains("line 2"));
    let p = tmp("unknown-op.trace", "size 4M\n\nfrobnicate 0 4K\n");
    assert!(one_line_error(&run(&["replay", p.to_str().unwrap()])).contains("line 3"));
}

#[test]
fn missing_or_unreadable_trace_is_one_line() {
    let err = one_line_error(&run(&["replay", "/nonexistent/dir/x.trace"]));
    assert!(err.contains("/nonexistent/dir/x.trace"), "{err}");
    let p = tmp("binary.trace", "");
    std::fs::write(&p, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    one_line_error(&run(&["replay", p.to_str().unwrap()]));
    let dir = std::env::temp_dir();
    one_line_error(&run(&["replay", dir.to_str().unwrap()]));
}

#[test]
fn unknown_strategy_policy_or_number_is_one_line() {
    let t = examples().join("flush.trace");
    let t = t.to_str().unwrap();
    let err = one_line_error(&run(&["replay", t, "--strategy", "lazy"]));
    assert!(err.contains("lazy") && err.contains("eager"), "{err}");
    one_line_error(&run(&["replay", t, "--policy", "maybe"]));
    let err = one_line_error(&run(&["replay", t, "--budget", "2Q"]));
    assert!(err.contains("2Q"), "{err}");
    one_line_error(&run(&[
        "replay",
        t,
        "--strategy",
        "eager",
        "--budget",
        "2M",
    ]));
    one_line_error(&run(&["gen", "sideways"]));
    one_line_error(&run(&["gen", "random", "--size", "3M"]));
    one_line_error(&run(&["frobnicate"]));
    let p = tmp("bad-size.trace", "size 3M\npunch 0 4K\n");
    one_line_error(&run(&["replay", p.to_str().unwrap()]));
    let p = tmp("huge-size.trace", "size 0x4000000000000000\npunch 0 4K\n");
    assert!(one_line_error(&run(&["replay", p.to_str().unwrap()])).contains("larger"));
    let p = tmp("many-pages.trace", "size 1024G\norder 1\npunch 0 4K\n");
    one_line_error(&run(&["replay", p.to_str().unwrap(), "--svg", "x.svg"]));
}

#[test]
fn failing_operations_are_counted_and_the_replay_goes_on() {
    let p = tmp(
        "errors.trace",
        "size 4M\nstart shared\npunch 0x800 4K\npunch 0 4K\nteardown\npunch 0 4K\n",
    );
    let got = json(&run(&["replay", p.to_str().unwrap(), "--json"]));
    assert_eq!(got["failed_operations"], 2);
    assert_eq!(got["failures"][0]["line"], 3);
    assert_eq!(got["failures"][0]["errno"], 22);
    assert_eq!(got["failures"][1]["line"], 6);
    assert_eq!(got["failures"][1]["errno"], 5);
    assert_eq!(got["stats"]["punch_calls"], 1);
    assert_eq!(got["stats"]["teardown_frees"], 2);
    // Human output too.
    let out = run(&["replay", p.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("line 3:") && text.contains("2 operations failed"),
        "{text}"
    );
}

#[test]
fn every_strategy_reports_the_same_names() {
    let t = examples().join("pin-with-budget.trace");
    for s in ["hugepunch", "eager", "zero-only", "single-partial"] {
        let got = json(&run(&[
            "replay",
            t.to_str().unwrap(),
            "--json",
            "--strategy",
            s,
        ]));
        assert_eq!(got["strategy"], s);
        let stats = got["stats"].as_object().unwrap();
        assert_eq!(stats.len(), STAT_NAMES.len());
        assert_eq!(got["stats"]["punch_calls"], 2044, "{s}");
        assert_eq!(got["model"]["violations"], 0, "{s}");
    }
    let eager = json(&run(&[
        "replay",
        t.to_str().unwrap(),
        "--json",
        "--strategy",
        "eager",
    ]));
    assert_eq!(eager["stats"]["small_freed_subpages"], 2044);
    assert_eq!(eager["stats"]["pending_subpages"], 0);
    let all = json(&run(&[
        "replay",
        t.to_str().unwrap(),
        "--json",
        "--strategy",
        "all",
        "--budget",
        "2M",
    ]));
    assert_eq!(all["strategies"].as_array().unwrap().len(), 4);
    assert_eq!(
        all["stats"]["forced_splits"], 3,
        "the top-level stats are the engine's"
    );
    let text = run(&["replay", t.to_str().unwrap(), "--strategy", "all"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("verdict:") && text.contains("single-partial"),
        "{text}"
    );
}

/// A trace over a 1 TiB file that touches a few huge pages replays in well
/// under a second and a few tens of MiB: nothing in the engine or the model
/// is per huge page of the whole file.
#[test]
fn replay_scales_with_what_the_trace_touches() {
    let trace = "size 1024G\nstart private\n\
                 punch 0 4K\npunch 0x1000 0x1ff000\n\
                 punch 0x8000000000 4K\nconvert 0x8000000000 2M shared\npunch 0x8000001000 8K\npopulate 0x8000000000 4K\n\
                 punch 0xffffe00000 0x200000\nflush 0x8000000000 4K\n\
                 punch 0x7fffff000 0x3000\n";
    let p = tmp("terabyte.trace", trace);
    for strategy in ["hugepunch", "all"] {
        let start = Instant::now();
        let got = json(&run(&[
            "replay",
            p.to_str().unwrap(),
            "--json",
            "--strategy",
            strategy,
        ]));
        let took = start.elapsed();
        assert!(
            got["elapsed_seconds"].as_f64().unwrap() < 0.5,
            "{strategy}: replay took {}",
            got["elapsed_seconds"]
        );
        assert!(
            took < Duration::from_secs(3),
            "{strategy}: the process took {took:?}"
        );
        if let Some(rss) = got["peak_rss_bytes"].as_u64() {
            assert!(rss < 64 << 20, "{strategy}: peak RSS {} MiB", rss >> 20);
        }
        assert!(got["model"]["model_bytes"].as_u64().unwrap() < 1 << 20);
        assert_eq!(got["model"]["huge_pages"], 1u64 << 19);
        assert_eq!(got["stats"]["huge_frees"], 2);
    }
    // An empty terabyte, populated in a few places and torn down.
    let p = tmp("terabyte-empty.trace", "size 1024G\nstart empty\npopulate 0 4M\npopulate 0x8000000000 4K\npunch 0x1000 4K\nteardown\n");
    let start = Instant::now();
    let got = json(&run(&["replay", p.to_str().unwrap(), "--json"]));
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(got["stats"]["teardown_frees"], 3);
    assert_eq!(got["model"]["resident_bytes"], 0);
}

#[test]
fn gen_writes_traces_replay_reads() {
    for pattern in [
        "ascending",
        "descending",
        "random",
        "strided",
        "round-robin",
        "pin",
        "conversion-churn",
        "straddling",
    ] {
        let out = run(&["gen", pattern, "--size", "4M", "--seed", "3"]);
        assert!(out.status.success(), "{pattern}");
        let p = tmp(
            &format!("gen-{pattern}.trace"),
            &String::from_utf8(out.stdout).unwrap(),
        );
        let got = json(&run(&["replay", p.to_str().unwrap(), "--json"]));
        assert!(
            got["stats"]["punch_calls"].as_u64().unwrap() > 0,
            "{pattern}"
        );
        assert_eq!(got["model"]["violations"], 0, "{pattern}");
        if pattern != "pin" && pattern != "conversion-churn" {
            assert_eq!(
                got["stats"]["huge_frees"], 2,
                "{pattern}: every huge page completes"
            );
        }
    }
    let a = run(&["gen", "random", "--size", "4M", "--seed", "9"]).stdout;
    assert_eq!(
        a,
        run(&["gen", "random", "--size", "4M", "--seed", "9"]).stdout,
        "a seed gives one trace"
    );
    let out = run(&["gen", "strided", "--size", "64K", "--order", "3"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("order 3") && text.lines().filter(|l| l.starts_with("punch")).count() == 16
    );
}

#[test]
fn svg_pictures_the_file() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-svg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("pin.svg");
    let t = examples().join("pin-with-budget.trace");
    let out = run(&[
        "replay",
        t.to_str().unwrap(),
        "--budget",
        "2M",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(
        text.contains("split into 4 KiB pages") && text.contains("pending"),
        "legend"
    );
    assert!(
        text.contains("huge page 3: 1 pending (511 of 512 punched)"),
        "the one huge page left pending"
    );
    let err = one_line_error(&run(&[
        "replay",
        t.to_str().unwrap(),
        "--svg",
        "/nonexistent/dir/x.svg",
    ]));
    assert!(err.contains("x.svg"), "{err}");
}

/// The headers of the first table in `text`: above its line of dashes (one
/// run of dashes per column), each column's text on every header line,
/// joined by spaces.
fn table_headers(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let top = lines
        .iter()
        .position(|l| l.starts_with("strategy "))
        .expect("a table");
    let dashes = top
        + lines[top..]
            .iter()
            .position(|l| l.starts_with('-'))
            .expect("a line of dashes");
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in lines[dashes].chars().chain([' ']).enumerate() {
        match (c, start) {
            ('-', None) => start = Some(i),
            (' ', Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    spans
        .iter()
        .map(|&(a, b)| {
            lines[top..dashes]
                .iter()
                .map(|l| {
                    l.chars()
                        .skip(a)
                        .take(b - a)
                        .collect::<String>()
                        .trim()
                        .to_string()
                })
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn demo_prints_the_side_by_side_table() {
    let out = run(&[
        "demo",
        "--size",
        "32M",
        "--window",
        "8M",
        "--budget",
        "2M",
        "--only",
        "random,pin",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // The headers may wrap (the table fits 100 columns): each column's
    // is its lines above the dashes, joined.
    assert_eq!(
        &table_headers(&text)[..7],
        [
            "strategy",
            "freed (net)",
            "huge pages never split",
            "direct map intact",
            "free calls",
            "invalidations",
            "pending peak",
        ],
        "{text}"
    );
    for s in ["hugepunch", "eager", "zero-only", "single-partial"] {
        assert!(text.contains(&format!("\n{s} ")), "row {s}");
    }
    assert_eq!(text.matches("verdict:").count(), 2);
    assert!(text.contains("nothing leaked"));
    assert!(
        out.stderr.is_empty(),
        "no progress bar when stderr is not a terminal"
    );
    let got = json(&run(&[
        "demo",
        "--size",
        "32M",
        "--window",
        "8M",
        "--only",
        "ascending",
        "--json",
    ]));
    let rows = got["workloads"][0]["rows"].as_array().unwrap();
    let hp = &rows[0];
    assert_eq!(hp["strategy"], "hugepunch");
    assert_eq!(hp["stats"]["huge_frees"], 4);
    assert_eq!(hp["model"]["huge_pages_ever_split"], 0);
    let eager = rows.iter().find(|r| r["strategy"] == "eager").unwrap();
    assert_eq!(eager["model"]["huge_pages_ever_split"], 4);
    assert_eq!(eager["verification"]["lost_writes"], 0);
}

/// A plain host that only keeps attributes (what decides the engine's
/// counters), to check the replay's figures against the engine driven
/// directly: the model's host and the command's plumbing (flags, trace
/// header) must not change a single counter.
struct PlainHost(std::sync::Mutex<Vec<hugepunch::Attribute>>);

impl hugepunch::Host for PlainHost {
    fn is_shared(&self, r: hugepunch::ByteRange) -> bool {
        let a = self.0.lock().unwrap();
        (r.first_subpage()..r.first_subpage() + r.subpages())
            .all(|s| a[s as usize] == hugepunch::Attribute::Shared)
    }
    fn set_attributes(&self, r: hugepunch::ByteRange, to: hugepunch::Attribute) {
        let mut a = self.0.lock().unwrap();
        for s in r.first_subpage()..r.first_subpage() + r.subpages() {
            a[s as usize] = to;
        }
    }
    fn invalidate_begin(&self, _: hugepunch::ByteRange, _: hugepunch::Hint) {}
    fn invalidate_end(&self, _: hugepunch::ByteRange) {}
    fn allocate(&self, _: hugepunch::ByteRange, _: u8) -> Result<(), hugepunch::HostError> {
        Ok(())
    }
    fn free(&self, _: hugepunch::ByteRange, _: u8) -> Result<(), hugepunch::HostError> {
        Ok(())
    }
    fn zero(&self, _: hugepunch::ByteRange) {}
}

fn direct(
    trace: &hugepunch_workload::Trace,
    budget: Option<u64>,
    policy: hugepunch::Policy,
) -> Value {
    let host = PlainHost(std::sync::Mutex::new(vec![
        trace.start;
        (trace.size / 4096) as usize
    ]));
    let mut cfg = hugepunch::Config::new(trace.size)
        .order(trace.order)
        .policy(policy);
    cfg.populated = trace.populated;
    cfg.budget = budget;
    let e = hugepunch::HugePunch::new(cfg, std::sync::Arc::new(host)).unwrap();
    hugepunch_workload::apply_all(&e, trace.ops.iter().map(|(_, op)| op));
    serde_json::to_value(e.stats()).unwrap()
}

#[test]
fn replay_counts_exactly_what_the_engine_counts() {
    for pattern in ["random", "strided", "pin", "conversion-churn", "straddling"] {
        let out = run(&["gen", pattern, "--size", "8M", "--seed", "5"]);
        let text = String::from_utf8(out.stdout).unwrap();
        // Some flushes and a teardown after the pattern, to cover them too.
        let text = format!("{text}flush 0 4M\npopulate 0x1000 0x3000\nteardown\npunch 0 4K\n");
        let p = tmp(&format!("direct-{pattern}.trace"), &text);
        let trace = hugepunch_workload::Trace::parse(&text).unwrap();
        for (flags, budget, policy) in [
            (vec![], None, hugepunch::Policy::Reject),
            (
                vec!["--budget", "1M"],
                Some(1 << 20),
                hugepunch::Policy::Reject,
            ),
            (
                vec!["--policy", "cancel-and-zero"],
                None,
                hugepunch::Policy::CancelAndZero,
            ),
        ] {
            let mut args = vec!["replay", p.to_str().unwrap(), "--json"];
            args.extend(flags.iter().copied());
            let got = json(&run(&args));
            assert_eq!(
                got["stats"],
                direct(&trace, budget, policy),
                "{pattern} {flags:?}"
            );
            assert_eq!(got["model"]["violations"], 0, "{pattern} {flags:?}");
        }
    }
}

/// `hugepunch real` on memfd (always available on Linux): both sides
/// release the same bytes, the engine with 512 times fewer fallocates.
#[cfg(target_os = "linux")]
#[test]
fn real_on_memfd_releases_the_same_bytes_with_fewer_fallocates() {
    let out = run(&[
        "real",
        "--backend",
        "memfd",
        "--size",
        "8M",
        "--pattern",
        "ascending",
        "--json",
    ]);
    let v = json(&out);
    let (direct, engine) = (&v["direct"], &v["engine"]);
    assert_eq!(direct["bytes_released"], engine["bytes_released"]);
    assert_eq!(direct["bytes_released"].as_u64(), Some(8 << 20));
    assert_eq!(direct["fallocate_calls"].as_u64(), Some(2048));
    assert_eq!(engine["fallocate_calls"].as_u64(), Some(4));
}

#[cfg(target_os = "linux")]
#[test]
fn real_rejects_an_unknown_backend_in_one_line() {
    let out = run(&["real", "--backend", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("invalid value 'nope'") && err.contains("thp, file"),
        "{err}"
    );
}

/// `real`, `vm` and `stream` share `--backend` and `--path`; each says its
/// own default, and each checks the pair the same way.
#[cfg(target_os = "linux")]
#[test]
fn each_command_on_real_memory_says_its_own_default_backend() {
    for (command, default) in [
        ("real", "else memfd, saying why"),
        ("vm", "else thp where this process may mount, else memfd"),
        ("stream", "[default: none, the kernel model only]"),
    ] {
        let out = run(&[command, "--help"]);
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(help.contains(default), "{command}: {help}");
        assert!(help.contains("--path <DIR>"), "{command}: {help}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn real_file_backend_needs_its_directory_and_only_it_takes_one() {
    for (args, want) in [
        (&["real", "--backend", "file"][..], "needs --path DIR"),
        (
            &["real", "--backend", "memfd", "--path", "/tmp"][..],
            "--path is for --backend file",
        ),
        (&["vm", "--backend", "file"][..], "needs --path DIR"),
        (&["stream", "--backend", "file"][..], "needs --path DIR"),
        (
            &["stream", "--path", "/tmp"][..],
            "--path is for --backend file, not the default backend",
        ),
    ] {
        let out = run(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = run(&[
        "real",
        "--backend",
        "file",
        "--path",
        "/nonexistent/dir",
        "--size",
        "4M",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/dir") && err.contains("No such file"),
        "{err}"
    );
}

/// A file in a plain directory: 4 KiB pages, both sides run, nothing left
/// in the directory.
#[cfg(target_os = "linux")]
#[test]
fn real_runs_on_a_file_in_a_directory() {
    let dir = std::env::temp_dir().join(format!("hugepunch-cli-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = run(&[
        "real",
        "--backend",
        "file",
        "--path",
        dir.to_str().unwrap(),
        "--size",
        "4M",
        "--json",
    ]);
    let v = json(&out);
    assert_eq!(v["backend"], format!("file:{}", dir.display()));
    assert_eq!(v["engine"]["bytes_released"].as_u64(), Some(4 << 20));
    assert_eq!(v["engine"]["fallocate_calls"].as_u64(), Some(2));
    assert!(
        v["engine"]["kernel"].is_null(),
        "no huge pages in a plain directory"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "no file left");
    std::fs::remove_dir(&dir).unwrap();
}

#[cfg(target_os = "linux")]
needs! { mount;
    /// `--backend thp` on real transparent huge pages, where this process may
    /// mount: the kernel's figures are in the JSON, the engine splits nothing.
    #[test]
    fn real_thp_reports_what_the_kernel_counted() {
        let out = run(&["real", "--backend", "thp", "--size", "8M", "--json"]);
        let v = json(&out);
        let k = &v["engine"]["kernel"];
        assert_eq!(k["whole_at_start"].as_u64(), Some(4), "{k}");
        assert_eq!(k["split"].as_u64(), Some(0), "{k}");
        assert_eq!(k["freed_whole"].as_u64(), Some(4), "{k}");
        assert!(v["direct"]["kernel"]["split"].as_u64().unwrap() >= 4);
        let out = run(&["real", "--backend", "thp", "--size", "8M"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("split (thp_split_page)"), "{text}");
    }
}

/// What every guest run's JSON says: both sides, the guest at CPL3, the
/// data checked, one 2 MiB free per huge page through the engine.
#[cfg(target_os = "linux")]
fn check_vm_json(v: &Value) {
    assert_eq!(v["guest_cpl"], 3);
    assert_eq!(v["vcpus"], 2);
    let (d, e) = (&v["direct"], &v["engine"]);
    assert_eq!(d["give_backs"].as_u64(), Some(2048));
    assert_eq!(e["give_backs"].as_u64(), Some(2048));
    assert_eq!(d["punch_calls"].as_u64(), Some(2048));
    assert_eq!(e["punch_calls"].as_u64(), Some(4));
    assert_eq!(d["data"], e["data"]);
}

#[cfg(target_os = "linux")]
needs! { kvm_guest;
    /// `hugepunch vm` on its default backend says which and why, and runs
    /// a real guest.
    #[test]
    fn vm_runs_a_real_guest_on_the_default_backend_and_says_which() {
        let out = run(&["vm", "--size", "8M", "--vcpus", "2", "--json"]);
        let v = json(&out);
        check_vm_json(&v);
        let note = String::from_utf8_lossy(&out.stderr);
        assert!(note.contains("guest memory: ") && note.contains("because"), "{note}");
        let out = run(&["vm", "--size", "8M"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("at CPL3") && text.contains("remote TLB flush requests"),
            "{text}"
        );
        assert!(text.starts_with("guest memory: "), "{text}");
    }
}

#[cfg(target_os = "linux")]
needs! { kvm_guest, guest_memfd;
    /// `hugepunch vm --backend guest-memfd`: KVM asks for a remote TLB flush
    /// at every 4 KiB punch.
    #[test]
    fn vm_runs_a_real_guest_on_guest_memfd() {
        let v = json(&run(&[
            "vm", "--backend", "guest-memfd", "--size", "8M", "--vcpus", "2", "--json",
        ]));
        check_vm_json(&v);
        assert_eq!(v["backend"], "guest-memfd");
        assert!(v["direct"]["kvm"]["remote_tlb_flush_requests"].as_u64().unwrap() >= 2048);
    }
}

#[cfg(target_os = "linux")]
needs! { kvm_guest, mount;
    /// `hugepunch vm --backend thp`: the kernel's huge page figures and the
    /// 2 MiB mappings KVM keeps, in the JSON and the table.
    #[test]
    fn vm_runs_a_real_guest_on_thp_with_the_kernel_figures() {
        let v = json(&run(&[
            "vm", "--backend", "thp", "--size", "8M", "--vcpus", "2", "--json",
        ]));
        check_vm_json(&v);
        assert_eq!(v["backend"], "thp");
        let k = &v["engine"]["kernel"];
        assert_eq!(k["whole_at_start"].as_u64(), Some(4), "{k}");
        assert_eq!(k["split"].as_u64(), Some(0), "{k}");
        assert!(v["direct"]["kernel"]["split"].as_u64().unwrap() >= 4);
        let out = run(&["vm", "--backend", "thp", "--size", "8M"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("split (thp_split_page)"), "{text}");
        assert!(
            text.contains("2 MiB / 4 KiB mappings") || text.contains("exposes no pages_4k"),
            "{text}"
        );
    }
}

/// Where this KVM has no guest_memfd, `vm --backend guest-memfd` and `real
/// --backend guest-memfd` fail in one line that says why, and `real`
/// without `--backend` falls back to memfd, saying so.
#[cfg(target_os = "linux")]
#[test]
#[cfg_attr(
    hugepunch_has_guest_memfd,
    ignore = "this KVM has mmap()able guest_memfd: nothing to refuse"
)]
fn guest_memfd_is_refused_in_one_line_where_kvm_has_none() {
    let why = hugepunch_linux::guest_memfd_unavailable()
        .expect("the build-time probe found no guest_memfd; now there is one: rebuild");
    for args in [
        &["vm", "--backend", "guest-memfd", "--size", "8M"][..],
        &["real", "--backend", "guest-memfd", "--size", "8M"][..],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("guest_memfd"), "{why}: {err}");
    }
    let out = run(&["real", "--size", "8M"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("note: running on memfd, not KVM guest_memfd"),
        "{text}"
    );
}

/// Where this KVM cannot run the guest at all (no /dev/kvm, or it refuses
/// the memory slot, the vCPU or the guest's first instruction), `hugepunch
/// vm` fails in one line naming the step and its errno.
#[cfg(target_os = "linux")]
#[test]
#[cfg_attr(
    hugepunch_has_kvm_guest,
    ignore = "this KVM runs the guest: no refusal to see"
)]
fn vm_fails_in_one_line_naming_the_step_where_kvm_cannot_run_the_guest() {
    let out = run(&["vm", "--backend", "memfd", "--size", "8M"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("failed: ") && err.contains("os error"),
        "{err}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn vm_refuses_bad_sizes_and_vcpu_counts_in_one_line() {
    for args in [
        &["vm", "--vcpus", "0"][..],
        &["vm", "--vcpus", "9"][..],
        &["vm", "--size", "3M"][..],
    ] {
        let out = run(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

/// `hugepunch stream`: the conversion stream on the kernel model — direct
/// 4 KiB punching splits huge pages, skipping the discard holds the shared
/// pages twice, the engine splits none — and its trace replays.
#[test]
fn stream_compares_the_ways_a_vmm_handles_conversions() {
    let trace = tmp("stream.trace", "");
    let out = run(&[
        "stream",
        "--size",
        "64M",
        "--dma-churn",
        "512",
        "--json",
        "--write-trace",
        trace.to_str().unwrap(),
    ]);
    let v = json(&out);
    let rows = v["on_the_model"].as_array().unwrap();
    let row = |name: &str| rows.iter().find(|r| r["strategy"] == name).unwrap().clone();
    let (direct, kept, engine) = (row("direct 4 KiB"), row("no discard"), row("hugepunch"));
    let given = v["given_back_bytes"].as_u64().unwrap();
    let size = 64u64 << 20;
    assert_eq!(
        direct["private_bytes"].as_u64().unwrap(),
        size - given,
        "direct punching releases everything given back"
    );
    assert!(kept["private_bytes"].as_u64() > direct["private_bytes"].as_u64());
    assert!(direct["huge_pages_split"].as_u64().unwrap() > 0);
    assert_eq!(engine["huge_pages_split"].as_u64(), Some(0));
    assert!(engine["free_calls"].as_u64().unwrap() * 10 < direct["free_calls"].as_u64().unwrap());
    // The trace it wrote replays, and the engine's statistics agree.
    let replayed = json(&run(&["replay", trace.to_str().unwrap(), "--json"]));
    assert_eq!(
        replayed["stats"]["free_calls"].as_u64(),
        engine["free_calls"].as_u64(),
        "{replayed}"
    );
    if cfg!(target_os = "linux") {
        let v = json(&run(&[
            "stream",
            "--size",
            "64M",
            "--dma-churn",
            "512",
            "--backend",
            "memfd",
            "--json",
        ]));
        let real = &v["on_real_memory"];
        assert_eq!(real["pattern"], "conversion-stream");
        assert_eq!(
            real["direct"]["resident_bytes"].as_u64(),
            direct["private_bytes"].as_u64(),
            "the model and the kernel agree on direct punching"
        );
        assert_eq!(
            real["engine"]["resident_bytes"].as_u64(),
            engine["private_bytes"].as_u64(),
            "and on the engine"
        );
    }
}

#[test]
fn stream_refuses_a_bad_model_in_one_line() {
    let out = run(&["stream", "--size", "64M", "--swiotlb", "48M"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("SWIOTLB") && err.contains("hugepunch stream --help"),
        "{err}"
    );
}
