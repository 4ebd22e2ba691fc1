//! `hugepunch replay TRACE`: a trace on the simulated kernel, with one
//! strategy or all of them side by side.

use crate::compare::{self, Contender, Row};
use crate::format::{bytes, count};
use crate::{progress, svg, write_stdout, ReplayArgs, StrategyArg};
use anyhow::{bail, Context as _};
use hugepunch::trace::Trace;
use hugepunch_model::{replay, Failure, Kernel, ModelConfig, Options, StrategyKind};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::time::Instant;

/// The largest file replayed: 1 PiB.
const MAX_SIZE: u64 = 1 << 50;

/// Failures listed in the output (all are counted).
const LISTED_FAILURES: usize = 20;

/// Peak resident memory of this process, from /proc (Linux), if known.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

struct Outcome {
    kind: StrategyKind,
    kernel: Kernel,
    failures: Vec<Failure>,
}

pub fn run(a: ReplayArgs) -> anyhow::Result<()> {
    let name = a.trace.display().to_string();
    let text = std::fs::read(&a.trace).with_context(|| format!("cannot read trace {name}"))?;
    let text = String::from_utf8(text)
        .map_err(|_| anyhow::anyhow!("{name}: not a text file (invalid UTF-8)"))?;
    let trace = Trace::parse(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let engine_flags = a.budget.is_some() || a.policy.is_some();
    let kinds: Vec<StrategyKind> = match a.strategy {
        StrategyArg::One(k) => {
            if engine_flags && k != StrategyKind::HugePunch {
                bail!("--budget and --policy apply only to the hugepunch strategy, not {k}");
            }
            vec![k]
        }
        StrategyArg::All => StrategyKind::ALL.to_vec(),
    };
    let options = Options {
        budget: a.budget,
        policy: a.policy.map(Into::into).unwrap_or_default(),
    };
    let cfg = ModelConfig::from_trace(&trace);
    if trace.size > MAX_SIZE {
        bail!(
            "{name}: a {} file is larger than this tool replays ({} at most: the engine keeps one pointer per chunk of huge pages of the whole file)",
            bytes(trace.size),
            bytes(MAX_SIZE)
        );
    }
    let huge_pages = trace.size >> (12 + trace.order as u32);
    if a.svg.is_some() && huge_pages > svg::MAX_PAGES {
        bail!(
            "--svg draws files of at most {} huge pages; this one has {}",
            count(svg::MAX_PAGES),
            count(huge_pages)
        );
    }
    let pb = progress::bar((trace.ops.len() * kinds.len()) as u64, !a.json, "replaying");
    let start = Instant::now();
    let mut outcomes = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let opts = if kind == StrategyKind::HugePunch {
            options
        } else {
            Options::default()
        };
        let kernel =
            Kernel::new(cfg.options(opts), kind).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let base = (i * trace.ops.len()) as u64;
        let failures = replay(&kernel, &trace, |n| pb.set_position(base + n as u64));
        outcomes.push(Outcome {
            kind,
            kernel,
            failures,
        });
    }
    pb.finish_and_clear();
    let elapsed = start.elapsed();
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
        let mut v = json_of(&name, &trace, &outcomes, options, elapsed.as_secs_f64());
        if let Some(path) = &a.svg {
            v["svg"] = json!(path.display().to_string());
        }
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        human(&name, &trace, &outcomes, options, elapsed.as_secs_f64())
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
                "failed_operations": o.failures.len(),
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
        "failed_operations": first.failures.len(),
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
    let _ = writeln!(
        s,
        "{}: {} operations on a {} file with {} huge pages ({} strateg{}, {:.2} s)",
        name,
        count(trace.ops.len() as u64),
        bytes(trace.size),
        bytes(4096u64 << trace.order),
        outcomes.len(),
        if outcomes.len() == 1 { "y" } else { "ies" },
        secs
    );
    if outcomes.len() > 1 {
        let rows: Vec<Row> = outcomes.iter().map(|o| row_of(o, options)).collect();
        s.push('\n');
        s.push_str(&compare::render_table(&rows));
        let _ = writeln!(s, "verdict: {}", compare::verdict(&rows));
        for o in outcomes {
            let _ = writeln!(s, "{}: {} operations failed", o.kind, o.failures.len());
        }
        return s;
    }
    let o = &outcomes[0];
    let stats = serde_json::to_value(o.kernel.stats()).unwrap_or_default();
    let _ = writeln!(s, "\nstatistics of {} (SPEC.md section 6):", o.kind);
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
    let _ = writeln!(
        s,
        "  {:<24} {}",
        "violations",
        if f.violations == 0 {
            "none".to_string()
        } else {
            format!("{:?}", f.violations_by_kind)
        }
    );
    let _ = writeln!(
        s,
        "\n{} operations failed (counted; the replay went on)",
        o.failures.len()
    );
    for f in o.failures.iter().take(LISTED_FAILURES) {
        let _ = writeln!(
            s,
            "  line {}: {}: {}",
            f.line,
            hugepunch_model::workload::format_op(&f.op),
            f.error
        );
    }
    if o.failures.len() > LISTED_FAILURES {
        let _ = writeln!(s, "  ... and {} more", o.failures.len() - LISTED_FAILURES);
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
        failed_operations: o.failures.len() as u64,
        violations: model.violations,
        leaked_after_teardown: model.violations_by_kind.contains_key("leak"),
        model,
    }
}
