//! Running one workload (a trace, or a demo workload) on several
//! strategies, side by side: the rows of the comparison table and its
//! verdict.

use hugepunch::Stats;
use hugepunch_cli::format::{bytes, count, paragraph, table};
use hugepunch_model::{Figures, Kernel, ModelConfig, Options, StrategyKind, Verification};
use hugepunch_workload::{run_step, Step};
use indicatif::ProgressBar;
use serde::Serialize;

/// One strategy (with its options) to run.
#[derive(Debug, Clone, Copy)]
pub struct Contender {
    /// The strategy.
    pub kind: StrategyKind,
    /// Engine options.
    pub options: Options,
}

impl Contender {
    /// Its label in tables.
    pub fn label(&self) -> String {
        match self.options.budget {
            Some(b) if self.kind == StrategyKind::HugePunch => {
                format!("hugepunch, budget {}", bytes(b))
            }
            _ => self.kind.name().to_string(),
        }
    }
}

/// What one strategy did on one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Label in the table.
    pub label: String,
    /// The strategy.
    pub strategy: StrategyKind,
    /// Its budget, if any.
    pub budget: Option<u64>,
    /// Its statistics (docs/CONTRACT.md §6).
    pub stats: Stats,
    /// The model's figures at the end of the workload (before teardown).
    pub model: Figures,
    /// Every written subpage read back.
    pub verification: Verification,
    /// Operations (or guest accesses) that returned an error.
    pub failed_operations: u64,
    /// Violations the model caught, teardown included.
    pub violations: u64,
    /// Bytes left allocated after teardown that should not be.
    pub leaked_after_teardown: bool,
}

/// Run `steps` on a fresh model of `cfg` with `c`; tear down at the end.
pub fn run(
    cfg: ModelConfig,
    c: Contender,
    steps: &[Step],
    pb: &ProgressBar,
) -> anyhow::Result<Row> {
    let kernel = Kernel::new(cfg.options(c.options), c.kind)?;
    let mut failed = 0;
    for (i, step) in steps.iter().enumerate() {
        if run_step(&kernel, step).is_err() {
            failed += 1;
        }
        if i % 4096 == 4095 {
            pb.inc(4096);
        }
    }
    pb.inc((steps.len() % 4096) as u64);
    let verification = kernel.verify();
    let stats = kernel.stats();
    let model = kernel.figures();
    kernel.teardown();
    let after = kernel.figures();
    Ok(Row {
        label: c.label(),
        strategy: c.kind,
        budget: c.options.budget,
        stats,
        model,
        verification,
        failed_operations: failed,
        violations: after.violations,
        leaked_after_teardown: after.violations_by_kind.contains_key("leak"),
    })
}

/// Run several contenders on the same steps, on up to `threads` threads.
pub fn run_all(
    cfg: ModelConfig,
    contenders: &[Contender],
    steps: &[Step],
    pb: &ProgressBar,
) -> anyhow::Result<Vec<Row>> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, contenders.len().max(1));
    let next = std::sync::Mutex::new(0usize);
    let results: std::sync::Mutex<Vec<Option<anyhow::Result<Row>>>> =
        std::sync::Mutex::new(contenders.iter().map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(&c) = contenders.get(i) else { break };
                let row = run(cfg, c, steps, pb);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(row);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every contender ran"))
        .collect()
}

fn data_cell(r: &Row) -> String {
    let v = &r.verification;
    let mut bad = Vec::new();
    if v.lost_writes > 0 {
        bad.push(format!("{} lost", count(v.lost_writes)));
    }
    if v.stale_reads > 0 || r.model.violations_by_kind.contains_key("stale_read") {
        let n = r
            .model
            .violations_by_kind
            .get("stale_read")
            .copied()
            .unwrap_or(0)
            .max(v.stale_reads);
        bad.push(format!("{} stale", count(n)));
    }
    let other = r.violations.saturating_sub(
        r.model
            .violations_by_kind
            .get("stale_read")
            .copied()
            .unwrap_or(0)
            + r.model
                .violations_by_kind
                .get("lost_write")
                .copied()
                .unwrap_or(0),
    );
    if other > 0 {
        bad.push(format!("{} violations", count(other)));
    }
    if bad.is_empty() {
        "ok".to_string()
    } else {
        bad.join(", ")
    }
}

/// The side-by-side table.
pub fn render_table(rows: &[Row]) -> String {
    let header = [
        "strategy",
        "freed (net)",
        "huge pages never split",
        "direct map intact",
        "free calls",
        "invalidations",
        "pending peak",
        "data",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let m = &r.model.memory;
            vec![
                r.label.clone(),
                bytes(r.model.bytes_freed_net),
                format!("{} / {}", count(m.huge_pages_intact), count(m.huge_pages)),
                format!(
                    "{} / {}",
                    count(m.direct_map_intact),
                    count(m.direct_map_entries)
                ),
                count(r.stats.free_calls),
                count(r.stats.invalidations),
                bytes(r.stats.pending_bytes_peak),
                data_cell(r),
            ]
        })
        .collect();
    table(&header, &body)
}

/// `verdict: ...`, wrapped to the output's width.
pub fn verdict_lines(rows: &[Row]) -> String {
    paragraph(&format!("verdict: {}", verdict(rows)), 2)
}

/// What the table shows, in one sentence (for people, [`verdict_lines`]):
/// every figure in it is one of the table's.
pub fn verdict(rows: &[Row]) -> String {
    let find = |k: StrategyKind, budget: bool| {
        rows.iter()
            .find(|r| r.strategy == k && r.budget.is_some() == budget)
    };
    let mut parts: Vec<String> = Vec::new();
    let split = |r: &Row| r.model.memory.huge_pages_ever_split;
    let dm_split = |r: &Row| r.model.memory.direct_map_entries - r.model.memory.direct_map_intact;
    let hp = find(StrategyKind::HugePunch, false).or_else(|| find(StrategyKind::HugePunch, true));
    if let (Some(hp), Some(eager)) = (hp, find(StrategyKind::Eager, false)) {
        if hp.model.bytes_freed_net >= eager.model.bytes_freed_net
            && eager.model.bytes_freed_net > 0
        {
            // The free calls are the table's column, for both.
            parts.push(format!(
                "{} frees what eager frees ({}) in {} free calls and splits {} huge pages, where eager splits {} with {} free calls and leaves {} direct-map entries split",
                hp.label,
                bytes(hp.model.bytes_freed_net),
                count(hp.stats.free_calls),
                count(split(hp)),
                count(split(eager)),
                count(eager.stats.free_calls),
                count(dm_split(eager)),
            ));
        } else if eager.model.bytes_freed_net > 0 {
            parts.push(format!(
                "{} frees {} and keeps {} pending (what is never wholly punched stays), where eager frees {} by splitting {} huge pages",
                hp.label,
                bytes(hp.model.bytes_freed_net),
                bytes(hp.stats.pending_subpages * 4096),
                bytes(eager.model.bytes_freed_net),
                count(split(eager)),
            ));
            if let Some(b) = find(StrategyKind::HugePunch, true).filter(|b| b.label != hp.label) {
                parts.push(format!(
                    "{} frees {} and splits {}",
                    b.label,
                    bytes(b.model.bytes_freed_net),
                    count(split(b))
                ));
            }
        } else {
            parts.push(format!(
                "hugepunch frees {}, eager {}",
                bytes(hp.model.bytes_freed_net),
                bytes(eager.model.bytes_freed_net)
            ));
        }
    }
    let others: Vec<String> = [StrategyKind::ZeroOnly, StrategyKind::SinglePartial]
        .into_iter()
        .filter_map(|k| find(k, false))
        .map(|r| format!("{} {}", r.label, bytes(r.model.bytes_freed_net)))
        .collect();
    if !others.is_empty() {
        parts.push(format!("frees: {}", others.join(", ")));
    }
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| data_cell(r) != "ok")
        .map(|r| format!("{}: {}", r.label, data_cell(r)))
        .collect();
    if bad.is_empty() {
        parts.push("no data lost or stale anywhere".to_string());
    } else {
        parts.push(format!("data: {}", bad.join("; ")));
    }
    parts.join("; ")
}
