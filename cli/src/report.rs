//! `hugepunch replay TRACE`: a trace on the simulated kernel, with one
//! strategy or all of them side by side (the replay itself is the
//! library's, [`hugepunch_cli::replay`]; this is the command and its
//! report).

use crate::compare::{self, Contender, Row};
use crate::{progress, svg, write_stdout, ReplayArgs, StrategyArg};
use anyhow::Context as _;
use hugepunch_cli::format::{bytes, count, paragraph};
use hugepunch_cli::replay::{self, Outcome, ReplayOptions};
use hugepunch_model::{Failure, Options, StrategyKind};
use hugepunch_workload::Trace;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::io::BufRead;
use std::time::Instant;

/// Failures listed in the output (all are counted).
const LISTED_FAILURES: usize = replay::LISTED_FAILURES;

/// Peak resident memory of this process, from /proc (Linux), if known.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The trace's name in messages: its path, or `<stdin>` for `-`.
fn trace_name(a: &ReplayArgs) -> String {
    if a.trace.as_os_str() == "-" {
        "<stdin>".to_string()
    } else {
        a.trace.display().to_string()
    }
}

pub fn run(a: ReplayArgs) -> anyhow::Result<()> {
    let name = trace_name(&a);
    let opts = ReplayOptions {
        strategies: match a.strategy {
            StrategyArg::One(k) => vec![k],
            StrategyArg::All => StrategyKind::ALL.to_vec(),
        },
        budget: a.budget,
        policy: a.policy.map(Into::into),
        limits: Default::default(),
    };
    let read = |input: &mut dyn BufRead| replay::read_trace(input, &opts.limits);
    let checked = if a.trace.as_os_str() == "-" {
        read(&mut std::io::stdin().lock())
    } else {
        let file =
            std::fs::File::open(&a.trace).with_context(|| format!("cannot read trace {name}"))?;
        read(&mut std::io::BufReader::with_capacity(64 << 10, file))
    };
    let checked = checked.map_err(|e| match e {
        replay::ReplayError::Read(e) => anyhow::anyhow!("cannot read trace {name}: {e}"),
        e => anyhow::anyhow!("{name}: {e}"),
    })?;
    let huge_pages = checked.trace.size >> (12 + checked.trace.order as u32);
    let estimate = replay::check(&checked, &opts).map_err(|e| match e {
        // A flag that does not go with the others.
        replay::ReplayError::Options(m) if m.starts_with("--") => crate::arg_error("replay", m),
        e => anyhow::anyhow!("{name}: {e}"),
    })?;
    if a.svg.is_some() && huge_pages > svg::MAX_PAGES {
        return Err(crate::arg_error(
            "replay",
            format!(
                "--svg draws files of at most {} huge pages; this one has {}",
                count(svg::MAX_PAGES),
                count(huge_pages)
            ),
        ));
    }
    let ops = checked.trace.ops.len() as u64;
    let pb = progress::bar(ops * opts.strategies.len() as u64, !a.json, "replaying");
    let start = Instant::now();
    let report = replay::run(checked, &opts, estimate, |n| pb.set_position(n))
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    pb.finish_and_clear();
    let elapsed = start.elapsed();
    let trace = &report.trace;
    let outcomes = &report.outcomes;
    let options = report.options;
    if let Some(path) = &a.svg {
        let panels: Vec<svg::Panel> = outcomes
            .iter()
            .map(|o| svg::panel(&o.kernel, format!("{} after {}", o.kind, file_name(&name))))
            .collect();
        let caption = format!(
            "{}: {} file, {} huge pages",
            file_name(&name),
            bytes(trace.size),
            bytes(4096u64 << trace.order)
        );
        std::fs::write(path, svg::render(&panels, &caption))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let out = if a.json {
        let mut v = json_of(&name, trace, outcomes, options, elapsed.as_secs_f64());
        v["estimate"] = json!({
            "seconds": report.estimate.seconds,
            "bytes": report.estimate.bytes,
        });
        if let Some(path) = &a.svg {
            v["svg"] = json!(path.display().to_string());
        }
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        human(&name, trace, outcomes, options, elapsed.as_secs_f64())
    };
    write_stdout(&out)
}

fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map_or(path.to_string(), |f| f.to_string_lossy().to_string())
}

fn failures_json(f: &[Failure]) -> Value {
    json!(f.iter().take(LISTED_FAILURES).map(|f| json!({"line": f.line, "op": f.op, "error": f.error.to_string(), "errno": f.error.errno()})).collect::<Vec<_>>())
}

fn json_of(name: &str, trace: &Trace, outcomes: &[Outcome], options: Options, secs: f64) -> Value {
    let per: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            json!({
                "strategy": o.kind.name(),
                "stats": o.kernel.stats(),
                "model": o.kernel.figures(),
                "failed_operations": o.failed_operations,
                "failures": failures_json(&o.failures),
            })
        })
        .collect();
    let first = &outcomes[0];
    let policy = match options.policy {
        hugepunch::Policy::Reject => "reject",
        hugepunch::Policy::CancelAndZero => "cancel-and-zero",
    };
    let mut v = json!({
        "trace": name,
        "size": trace.size,
        "order": trace.order,
        "operations": trace.ops.len(),
        "strategy": if outcomes.len() == 1 { first.kind.name() } else { "all" },
        "budget": options.budget,
        "policy": policy,
        "stats": first.kernel.stats(),
        "model": first.kernel.figures(),
        "failed_operations": first.failed_operations,
        "failures": failures_json(&first.failures),
        "elapsed_seconds": secs,
        "peak_rss_bytes": peak_rss(),
    });
    if outcomes.len() > 1 {
        v["strategies"] = json!(per);
    }
    v
}

fn human(name: &str, trace: &Trace, outcomes: &[Outcome], options: Options, secs: f64) -> String {
    let mut s = String::new();
    s.push_str(&paragraph(
        &format!(
            "{}: {} operations on a {} file with {} huge pages ({} strateg{}, {:.2} s)",
            name,
            count(trace.ops.len() as u64),
            bytes(trace.size),
            bytes(4096u64 << trace.order),
            outcomes.len(),
            if outcomes.len() == 1 { "y" } else { "ies" },
            secs
        ),
        2,
    ));
    if outcomes.len() > 1 {
        let rows: Vec<Row> = outcomes.iter().map(|o| row_of(o, options)).collect();
        s.push('\n');
        s.push_str(&compare::render_table(&rows));
        s.push_str(&compare::verdict_lines(&rows));
        for o in outcomes {
            let _ = writeln!(s, "{}: {} operations failed", o.kind, o.failed_operations);
        }
        return s;
    }
    let o = &outcomes[0];
    let stats = serde_json::to_value(o.kernel.stats()).unwrap_or_default();
    let _ = writeln!(s, "\nstatistics of {} (docs/CONTRACT.md §6):", o.kind);
    if let Value::Object(m) = stats {
        for (k, v) in m {
            let _ = writeln!(s, "  {k:<24} {v}");
        }
    }
    let f = o.kernel.figures();
    let m = &f.memory;
    let _ = writeln!(s, "\nmodel:");
    let _ = writeln!(s, "  {:<24} {}", "bytes freed", bytes(f.bytes_freed));
    let _ = writeln!(
        s,
        "  {:<24} {}",
        "bytes allocated now",
        bytes(m.resident_bytes)
    );
    let _ = writeln!(
        s,
        "  {:<24} {} / {} (huge {}, split {}, absent {})",
        "huge pages intact",
        count(m.huge_pages_intact),
        count(m.huge_pages),
        count(m.huge_pages_huge),
        count(m.huge_pages_split),
        count(m.huge_pages_absent)
    );
    let _ = writeln!(
        s,
        "  {:<24} {} / {}",
        "direct map intact",
        count(m.direct_map_intact),
        count(m.direct_map_entries)
    );
    let violations = if f.violations == 0 {
        "none".to_string()
    } else {
        f.violations_by_kind
            .iter()
            .map(|(k, n)| format!("{k}: {}", count(*n)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    s.push_str(&paragraph(
        &format!("  {:<24} {violations}", "violations"),
        27,
    ));
    let _ = writeln!(
        s,
        "\n{} operations failed (counted; the replay went on)",
        o.failed_operations
    );
    for f in o.failures.iter().take(LISTED_FAILURES) {
        s.push_str(&paragraph(
            &format!("  line {}: {}: {}", f.line, f.op, f.error),
            4,
        ));
    }
    if o.failed_operations > LISTED_FAILURES as u64 {
        let _ = writeln!(
            s,
            "  ... and {} more",
            o.failed_operations - LISTED_FAILURES as u64
        );
    }
    s
}

fn row_of(o: &Outcome, options: Options) -> Row {
    let model = o.kernel.figures();
    let options = if o.kind == StrategyKind::HugePunch {
        options
    } else {
        Options::default()
    };
    Row {
        label: Contender {
            kind: o.kind,
            options,
        }
        .label(),
        strategy: o.kind,
        budget: options.budget,
        stats: o.kernel.stats(),
        verification: Default::default(),
        failed_operations: o.failed_operations,
        violations: model.violations,
        leaked_after_teardown: model.violations_by_kind.contains_key("leak"),
        model,
    }
}
