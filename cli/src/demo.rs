//! The demo: a simulated confidential guest (all private, populated with
//! 2 MiB huge pages) running every adversarial pattern over a window of
//! its memory, with the guest writing and reading around them; per
//! workload, a side-by-side table of the strategies and a verdict.

use crate::compare::{self, Contender, Row};
use crate::{number, progress, svg, write_stdout};
use anyhow::Context as _;
use hugepunch::Attribute;
use hugepunch::Geometry;
use hugepunch_cli::format::{bytes, count, paragraph};
use hugepunch_model::{Kernel, ModelConfig, Options, StrategyKind};
use hugepunch_workload::{demo_window, demo_workloads, run_step, Op, Pattern, Step};
use serde_json::json;
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
    #[arg(long, default_value_t = hugepunch_workload::DEFAULT_SEED)]
    seed: u64,
    /// Only these patterns, comma separated [default: all of them]
    #[arg(long, value_delimiter = ',', value_parser = crate::pattern_arg())]
    only: Vec<Pattern>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Write pictures of each strategy's guest memory after one workload
    /// (the first of --only, or strided) [default: no pictures]
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            size: 4 << 30,
            window: 512 << 20,
            budget: 64 << 20,
            seed: hugepunch_workload::DEFAULT_SEED,
            only: Vec::new(),
            json: false,
            svg: None,
        }
    }
}

/// The largest guest the demo simulates (its cost grows with the guest:
/// each run tears the whole guest down).
const MAX_SIZE: u64 = 1 << 40;
/// Wall seconds per subpage of the window, every pattern and strategy
/// together, on the 2 cores of the development machine (the demo runs two
/// strategies at a time), rounded up from measurements.
const SECONDS_PER_WINDOW_SUBPAGE: f64 = 30e-6;
/// Wall seconds per huge page of the guest (every run tears it down).
const SECONDS_PER_HUGE_PAGE: f64 = 20e-6;
/// Bytes per subpage of the window (every workload's steps are made
/// first).
const BYTES_PER_WINDOW_SUBPAGE: u64 = 400;
/// The demo runs, or is refused, within about 10 seconds and 1 GiB.
const MAX_SECONDS: f64 = 8.0;
const MAX_MEMORY: u64 = 768 << 20;

/// What a demo costs: wall seconds and bytes (an upper estimate).
fn estimate(
    geo: Geometry,
    window: u64,
    contenders: usize,
    patterns: usize,
    svg: bool,
) -> (f64, u64) {
    let subpages = (demo_window(geo, window) / 4096) as f64;
    let share = (contenders as f64 / 5.0) * (patterns as f64 / 8.0);
    let mut secs = (subpages * SECONDS_PER_WINDOW_SUBPAGE
        + geo.huge_pages() as f64 * SECONDS_PER_HUGE_PAGE)
        * share;
    if svg {
        // One more run of one workload per strategy, and a picture each.
        secs += subpages * SECONDS_PER_WINDOW_SUBPAGE / 8.0
            + geo.huge_pages() as f64 * contenders as f64 * 1e-6;
    }
    let mem = (16 << 20) + (subpages as u64 * BYTES_PER_WINDOW_SUBPAGE) * patterns as u64 / 8;
    (secs, mem)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let huge_page: u64 = 2 << 20;
    if a.size < 4 * huge_page || !a.size.is_multiple_of(huge_page) {
        return Err(crate::arg_error(
            "demo",
            "--size must be a multiple of 2 MiB and at least 8 MiB",
        ));
    }
    if a.size > MAX_SIZE {
        return Err(crate::arg_error(
            "demo",
            format!(
                "--size {} is larger than the demo runs ({} at most)",
                bytes(a.size),
                bytes(MAX_SIZE)
            ),
        ));
    }
    let geo = Geometry::new(a.size, 9)?;
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
    let patterns = if a.only.is_empty() {
        Pattern::ALL.len()
    } else {
        Pattern::ALL.iter().filter(|p| a.only.contains(p)).count()
    };
    let (secs, mem) = estimate(geo, a.window, contenders.len(), patterns, a.svg.is_some());
    if secs > MAX_SECONDS || mem > MAX_MEMORY {
        return Err(crate::arg_error(
            "demo",
            format!(
                "a demo of a {} window of a {} guest would take about {:.0} s and {} of memory, more than this tool allows (about {:.0} s and {}); use a smaller --window or --size, or --only some patterns",
                bytes(demo_window(geo, a.window)),
                bytes(a.size),
                secs,
                bytes(mem),
                MAX_SECONDS,
                bytes(MAX_MEMORY)
            ),
        ));
    }
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
        out.push_str(&paragraph(
            &format!(
                "hugepunch demo: a {} confidential guest (all private, populated with 2 MiB huge \
                 pages). Each workload punches a {} window of it (the guest first writes one \
                 subpage of every huge page there, so it is mapped), then every written subpage \
                 is read back. Strategies:",
                bytes(a.size),
                bytes(window)
            ),
            0,
        ));
        let label_width = contenders
            .iter()
            .map(|c| c.label().len())
            .max()
            .unwrap_or(0);
        for c in &contenders {
            let about = if c.options.budget.is_some() {
                "the engine with a pending-bytes budget"
            } else {
                c.kind.describes()
            };
            out.push_str(&paragraph(
                &format!("  {:<label_width$}  {}", c.label(), about),
                label_width + 4,
            ));
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
                .filter(|s| matches!(s, Step::Op(Op::Punch { .. })))
                .count();
            out.push('\n');
            out.push_str(&paragraph(
                &format!(
                    "== {}: {} ({} punches)",
                    w.pattern.name(),
                    w.pattern.describes(),
                    count(punches as u64)
                ),
                3,
            ));
            out.push_str(&compare::render_table(&rows));
            out.push_str(&compare::verdict_lines(&rows));
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
    out.push('\n');
    out.push_str(&paragraph(
        "freed (net): bytes returned to the host and not allocated again. never split: huge \
         pages whose folio was never broken into 4 KiB pages. stale: a punched subpage that \
         still reads its old content instead of zeros (docs/CONTRACT.md §4, invariant 5; the \
         balloon forgets the page it drops without freeing or zeroing it). Sizes: 2 MiB is \
         exactly 2 MiB, 2.0 MiB is not (one decimal, rounded).",
        0,
    ));
    out.push_str(&paragraph(
        &format!(
            "after each workload every strategy tore the guest down: {}; writes lost: {}. ({:.1} s)",
            if leaks == 0 {
                "nothing leaked".to_string()
            } else {
                format!("{leaks} runs leaked memory")
            },
            lost,
            secs
        ),
        0,
    ));
    write_stdout(&out)
}
