//! The demo: a simulated confidential guest (all private, populated with
//! 2 MiB huge pages) running every adversarial pattern over a window of
//! its memory, with the guest writing and reading around them; per
//! workload, a side-by-side table of the strategies and a verdict.

use crate::compare::{self, Contender, Row};
use crate::{number, progress, svg, write_stdout};
use anyhow::{bail, Context as _};
use hugepunch::Attribute;
use hugepunch_cli::format::{bytes, count};
use hugepunch_model::workload::{demo_workloads, run_step};
use hugepunch_model::{Geometry, Kernel, ModelConfig, Options, Pattern, StrategyKind};
use serde_json::json;
use std::fmt::Write as _;
use std::time::Instant;

/// The demo's options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Guest memory size.
    #[arg(long, default_value = "4G", value_parser = number)]
    size: u64,
    /// The part of guest memory each workload punches.
    #[arg(long, default_value = "512M", value_parser = number)]
    window: u64,
    /// The budget of the extra hugepunch row (0 leaves the row out).
    #[arg(long, default_value = "64M", value_parser = number)]
    budget: u64,
    /// Seed of the random patterns.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only these patterns (comma separated).
    #[arg(long, value_delimiter = ',', value_parser = crate::pattern_arg)]
    only: Vec<Pattern>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Write pictures of each strategy's guest memory after one workload
    /// (the first of --only, or strided).
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            size: 4 << 30,
            window: 512 << 20,
            budget: 64 << 20,
            seed: 1,
            only: Vec::new(),
            json: false,
            svg: None,
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let geo = Geometry {
        size: a.size,
        order: 9,
    };
    if a.size < 4 * geo.huge_page_size() || !a.size.is_multiple_of(geo.huge_page_size()) {
        bail!("--size must be a multiple of 2 MiB and at least 8 MiB");
    }
    let cfg = ModelConfig {
        size: a.size,
        order: 9,
        populated: true,
        start: Attribute::Private,
        options: Options::default(),
    };
    let mut contenders = vec![Contender {
        kind: StrategyKind::HugePunch,
        options: Options::default(),
    }];
    if a.budget > 0 {
        contenders.push(Contender {
            kind: StrategyKind::HugePunch,
            options: Options {
                budget: Some(a.budget),
                ..Options::default()
            },
        });
    }
    contenders.extend(
        [
            StrategyKind::Eager,
            StrategyKind::ZeroOnly,
            StrategyKind::SinglePartial,
        ]
        .map(|kind| Contender {
            kind,
            options: Options::default(),
        }),
    );
    let mut workloads = demo_workloads(geo, a.window, a.seed);
    if !a.only.is_empty() {
        workloads.retain(|w| a.only.contains(&w.pattern));
    }
    let total: u64 =
        workloads.iter().map(|w| w.steps.len() as u64).sum::<u64>() * contenders.len() as u64;
    let pb = progress::bar(total, !a.json, "demo");
    let start = Instant::now();
    let mut out = String::new();
    let window = workloads.first().map_or(a.window, |w| w.window);
    if !a.json {
        let _ = writeln!(
            out,
            "hugepunch demo: a {} confidential guest (all private, populated with 2 MiB huge pages).\n\
             Each workload punches a {} window of it (the guest first writes one subpage of every huge page\n\
             there, so it is mapped), then every written subpage is read back. Strategies:",
            bytes(a.size),
            bytes(window)
        );
        for c in &contenders {
            let about = if c.options.budget.is_some() {
                "the engine with a pending-bytes budget"
            } else {
                c.kind.describes()
            };
            let _ = writeln!(out, "  {:<24} {}", c.label(), about);
        }
        write_stdout(&std::mem::take(&mut out))?;
    }
    let mut results = Vec::new();
    for w in &workloads {
        pb.set_message(w.pattern.name().to_string());
        let rows = compare::run_all(cfg, &contenders, &w.steps, &pb)?;
        if !a.json {
            let punches = w
                .steps
                .iter()
                .filter(|s| {
                    matches!(
                        s,
                        hugepunch_model::Step::Op(hugepunch::trace::Op::Punch { .. })
                    )
                })
                .count();
            let _ = writeln!(
                out,
                "\n== {}: {} ({} punches)",
                w.pattern.name(),
                w.pattern.describes(),
                count(punches as u64)
            );
            out.push_str(&compare::render_table(&rows));
            let _ = writeln!(out, "verdict: {}", compare::verdict(&rows));
            // Each table as soon as it is ready, above the progress bar.
            let text = std::mem::take(&mut out);
            pb.suspend(|| write_stdout(&text))?;
        }
        results.push((w.pattern, rows));
    }
    pb.finish_and_clear();
    if let Some(path) = &a.svg {
        let pattern = a.only.first().copied().unwrap_or(Pattern::Strided);
        let w = workloads
            .iter()
            .find(|w| w.pattern == pattern)
            .map(|w| w.steps.clone())
            .unwrap_or_default();
        let mut panels = Vec::new();
        for c in &contenders {
            let kernel = Kernel::new(cfg.options(c.options), c.kind)?;
            for step in &w {
                let _ = run_step(&kernel, step);
            }
            panels.push(svg::panel(
                &kernel,
                format!("{} after {}", c.label(), pattern.name()),
            ));
        }
        let caption = format!(
            "{} guest, {} window punched: {}",
            bytes(a.size),
            bytes(window),
            pattern.name()
        );
        std::fs::write(path, svg::render(&panels, &caption))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let v = json!({
            "size": a.size,
            "window": window,
            "workloads": results.iter().map(|(p, rows)| json!({"pattern": p.name(), "about": p.describes(), "rows": rows, "verdict": compare::verdict(rows)})).collect::<Vec<_>>(),
            "elapsed_seconds": secs,
        });
        return write_stdout(&(serde_json::to_string_pretty(&v)? + "\n"));
    }
    let all: Vec<&Row> = results.iter().flat_map(|(_, r)| r.iter()).collect();
    let lost: u64 = all.iter().map(|r| r.verification.lost_writes).sum();
    let leaks = all.iter().filter(|r| r.leaked_after_teardown).count();
    let _ = writeln!(
        out,
        "\nfreed (net): bytes returned to the host and not allocated again. never split: huge pages whose folio was\n\
         never broken into 4 KiB pages. stale: a punched subpage that still reads its old content instead of zeros\n\
         (SPEC.md invariant 5; the balloon forgets the page it drops without freeing or zeroing it).\n\
         after each workload every strategy tore the guest down: {}; writes lost: {}. ({:.1} s)",
        if leaks == 0 { "nothing leaked".to_string() } else { format!("{leaks} runs leaked memory") },
        lost,
        secs
    );
    write_stdout(&out)
}
