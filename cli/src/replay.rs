//! Replaying a trace (docs/CONTRACT.md §7) on the simulated kernel, within bounds:
//! the input is read one line at a time (a line may not exceed
//! [`MAX_LINE_BYTES`], the trace [`Limits::max_trace_bytes`]), parsed with
//! docs/CONTRACT.md §7's grammar, its cost estimated ([`crate::cost`]) and refused
//! when over the limits, and only then run. No input makes it panic, run
//! without end or allocate without bound: [`replay_bytes`] is what a fuzz
//! target calls.
//!
//! ```
//! use hugepunch_cli::replay::{replay_bytes, ReplayOptions};
//! let report = replay_bytes(b"size 4M\npunch 0 2M\nteardown\n", &ReplayOptions::default()).unwrap();
//! assert_eq!(report.outcomes[0].kernel.stats().huge_frees, 1);
//! assert!(replay_bytes(b"punch +4K 4K\n", &ReplayOptions::default()).is_err());
//! ```

use crate::cost::{estimate_within, Estimate};
use crate::format::{bytes, count};
use hugepunch::Policy;
use hugepunch_model::{Failure, Kernel, ModelConfig, Options, StrategyKind};
use hugepunch_workload::apply;
use hugepunch_workload::trace::{self, ParseError, Parser, Trace, MAX_LINE_BYTES};
use std::io::{BufRead, Read as _};

/// The largest trace read, in bytes.
pub const MAX_TRACE_BYTES: u64 = 128 << 20;
/// The most operations a trace may hold.
pub const MAX_OPERATIONS: usize = 1 << 21;
/// The largest file replayed: 1 PiB.
pub const MAX_SIZE: u64 = 1 << 50;
/// The estimated time a replay may take, in seconds (the rest of the 10
/// seconds a user waits at most is for reading and writing).
pub const MAX_SECONDS: f64 = 6.0;
/// The estimated memory a replay may hold (the rest of 1 GiB is margin).
pub const MAX_MEMORY: u64 = 768 << 20;
/// Failed operations kept in a report (all are counted).
pub const LISTED_FAILURES: usize = 20;

/// What a replay accepts at most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Bytes of trace text.
    pub max_trace_bytes: u64,
    /// Bytes of one line, its line ending excluded.
    pub max_line_bytes: usize,
    /// Operation lines.
    pub max_operations: usize,
    /// File size in the header.
    pub max_size: u64,
    /// Estimated seconds, all strategies together.
    pub max_seconds: f64,
    /// Estimated bytes of memory, all strategies together.
    pub max_memory: u64,
}

impl Limits {
    /// Small limits for a fuzz target, which must run thousands of inputs a
    /// second: a 1 MiB trace, 4,096 operations, about 20 ms and 64 MiB.
    pub fn for_fuzzing() -> Self {
        Limits {
            max_trace_bytes: 1 << 20,
            max_line_bytes: MAX_LINE_BYTES,
            max_operations: 4096,
            max_size: MAX_SIZE,
            max_seconds: 0.02,
            max_memory: 64 << 20,
        }
    }
}

impl Default for Limits {
    /// The command line's limits: any trace is read, run or refused within
    /// about 10 seconds and 1 GiB on the development machine.
    fn default() -> Self {
        Limits {
            max_trace_bytes: MAX_TRACE_BYTES,
            max_line_bytes: MAX_LINE_BYTES,
            max_operations: MAX_OPERATIONS,
            max_size: MAX_SIZE,
            max_seconds: MAX_SECONDS,
            max_memory: MAX_MEMORY,
        }
    }
}

/// How to replay.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayOptions {
    /// The strategies, each on its own simulated kernel, in this order.
    pub strategies: Vec<StrategyKind>,
    /// The engine's pending-bytes budget (engine only).
    pub budget: Option<u64>,
    /// The engine's conversion policy (engine only; default `Reject`).
    pub policy: Option<Policy>,
    /// The limits.
    pub limits: Limits,
}

impl Default for ReplayOptions {
    /// The engine alone, no budget, policy `Reject`, default limits.
    fn default() -> Self {
        ReplayOptions {
            strategies: vec![StrategyKind::HugePunch],
            budget: None,
            policy: None,
            limits: Limits::default(),
        }
    }
}

impl ReplayOptions {
    /// The engine's options.
    pub fn engine_options(&self) -> Options {
        Options {
            budget: self.budget,
            policy: self.policy.unwrap_or_default(),
        }
    }
}

/// Why a trace was not replayed. Each message is one line; those about
/// the trace's text start with `line N:`.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading failed.
    #[error("{0}")]
    Read(#[from] std::io::Error),
    /// More text than [`Limits::max_trace_bytes`].
    #[error("line {line}: the trace is larger than {} (this tool reads at most that much)", bytes(*limit))]
    TooLong {
        /// The line being read when the limit was reached.
        line: usize,
        /// The limit.
        limit: u64,
    },
    /// A malformed line.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The file is larger than [`Limits::max_size`].
    #[error("line {line}: a {} file is larger than this tool replays ({} at most)", bytes(*size), bytes(*limit))]
    FileTooLarge {
        /// The `size` line.
        line: usize,
        /// The size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Options that do not go together.
    #[error("{0}")]
    Options(String),
    /// The estimate is over the limits.
    #[error("{}", refusal(.estimate, .limits))]
    TooCostly {
        /// The estimate.
        estimate: Box<Estimate>,
        /// The limits it is over.
        limits: Limits,
    },
    /// The simulated kernel refused the file (not expected once the
    /// trace is checked).
    #[error("{0}")]
    Kernel(hugepunch::Error),
}

fn duration(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.0} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.0} ms", secs * 1e3)
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else if secs < 3600.0 {
        format!("{:.0} min", secs / 60.0)
    } else if secs < 86400.0 * 3.0 {
        format!("{:.0} hours", secs / 3600.0)
    } else {
        format!("{:.0} days", secs / 86400.0)
    }
}

fn refusal(e: &Estimate, l: &Limits) -> String {
    // Memory first: it is what a host runs out of.
    let time = e.bytes <= l.max_memory;
    let culprit = if time { &e.costliest } else { &e.largest };
    let amount = |c: &crate::cost::Cost| {
        if time {
            duration(c.amount)
        } else {
            bytes(c.amount as u64)
        }
    };
    let at = e.over_limits_at.or(culprit.as_ref().map(|c| c.line));
    let why = match culprit {
        // One line is the trouble.
        Some(c) if Some(c.line) == at => {
            format!("; this line alone: {}, about {}", c.what, amount(c))
        }
        // Many are: say where the trace passes the limit, and which line
        // costs the most.
        Some(c) => format!(
            "; the trace passes that here (the costliest line, {}, is {}, about {})",
            c.line,
            c.what,
            amount(c)
        ),
        None => String::new(),
    };
    format!(
        "{}replaying this trace would take about {} and {} of memory on the simulated kernel, more than this tool allows (about {} and {}){why}",
        at.map(|l| format!("line {l}: ")).unwrap_or_default(),
        duration(e.seconds),
        bytes(e.bytes),
        duration(l.max_seconds),
        bytes(l.max_memory),
    )
}

/// A trace read and checked, with where its `size` was given.
#[derive(Debug, Clone)]
pub struct CheckedTrace {
    /// The trace.
    pub trace: Trace,
    /// The line of its `size` header (1 if none: the default size).
    pub size_line: usize,
}

/// Read a trace, one line at a time: never more than
/// [`Limits::max_line_bytes`] of a line is held, and reading stops at
/// [`Limits::max_trace_bytes`] (so `/dev/zero` is refused at once).
pub fn read_trace(mut input: impl BufRead, limits: &Limits) -> Result<CheckedTrace, ReplayError> {
    let mut parser = Parser::new(trace::Limits {
        max_line_bytes: limits.max_line_bytes,
        max_operations: limits.max_operations,
    });
    let mut line = Vec::new();
    let mut total: u64 = 0;
    // A line, its CR and its LF; anything longer is refused by the parser.
    let chunk = limits.max_line_bytes as u64 + 2;
    loop {
        line.clear();
        let n = (&mut input).take(chunk).read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limits.max_trace_bytes {
            return Err(ReplayError::TooLong {
                line: parser.lines() + 1,
                limit: limits.max_trace_bytes,
            });
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        parser.line(&line)?;
    }
    let size_line = parser.size_line().unwrap_or(1);
    let trace = parser.finish()?;
    Ok(CheckedTrace { trace, size_line })
}

/// Check a trace against the options and the limits: the size, the
/// options, the estimated cost. Returns the estimate.
pub fn check(t: &CheckedTrace, opts: &ReplayOptions) -> Result<Estimate, ReplayError> {
    let trace = &t.trace;
    if opts.strategies.is_empty() {
        return Err(ReplayError::Options("no strategy to replay with".into()));
    }
    let engine_flags = opts.budget.is_some() || opts.policy.is_some();
    if engine_flags && !opts.strategies.contains(&StrategyKind::HugePunch) {
        return Err(ReplayError::Options(format!(
            "--budget and --policy apply only to the hugepunch strategy, not {}",
            opts.strategies[0]
        )));
    }
    // Trace::parse refuses these; a trace built by hand may not.
    if !(1..=hugepunch::MAX_ORDER).contains(&trace.order) {
        return Err(ReplayError::Options(format!(
            "order must be between 1 and {}, got {}",
            hugepunch::MAX_ORDER,
            trace.order
        )));
    }
    let huge_page = 4096u64 << trace.order;
    if trace.size == 0 || !trace.size.is_multiple_of(huge_page) {
        return Err(ReplayError::Parse(ParseError {
            line: t.size_line,
            message: format!(
                "size {:#x} is not a positive multiple of the huge page size at order {}",
                trace.size, trace.order
            ),
        }));
    }
    if trace.size > opts.limits.max_size {
        return Err(ReplayError::FileTooLarge {
            line: t.size_line,
            size: trace.size,
            limit: opts.limits.max_size,
        });
    }
    if trace.ops.len() > opts.limits.max_operations {
        return Err(ReplayError::Options(format!(
            "more than {} operations",
            count(opts.limits.max_operations as u64)
        )));
    }
    let e = estimate_within(
        trace,
        &opts.strategies,
        opts.budget.is_some(),
        opts.limits.max_seconds,
        opts.limits.max_memory,
    );
    if e.seconds > opts.limits.max_seconds || e.bytes > opts.limits.max_memory {
        return Err(ReplayError::TooCostly {
            estimate: Box::new(e),
            limits: opts.limits,
        });
    }
    Ok(e)
}

/// What one strategy did.
pub struct Outcome {
    /// The strategy.
    pub kind: StrategyKind,
    /// Its simulated kernel after the trace.
    pub kernel: Kernel,
    /// The first [`LISTED_FAILURES`] operations that returned an error.
    pub failures: Vec<Failure>,
    /// How many did.
    pub failed_operations: u64,
}

/// What a replay did.
pub struct ReplayReport {
    /// The trace.
    pub trace: Trace,
    /// The engine's options.
    pub options: Options,
    /// One per strategy, in the order asked.
    pub outcomes: Vec<Outcome>,
    /// What it was estimated to cost.
    pub estimate: Estimate,
}

/// Replay a checked trace (see [`check`]); `progress` is told the number
/// of operations done so far, all strategies together, now and then.
pub fn run(
    t: CheckedTrace,
    opts: &ReplayOptions,
    estimate: Estimate,
    mut progress: impl FnMut(u64),
) -> Result<ReplayReport, ReplayError> {
    let trace = t.trace;
    let cfg = ModelConfig::from_trace(&trace);
    let n = trace.ops.len() as u64;
    let mut outcomes = Vec::new();
    for (i, &kind) in opts.strategies.iter().enumerate() {
        let options = if kind == StrategyKind::HugePunch {
            opts.engine_options()
        } else {
            Options::default()
        };
        let kernel = Kernel::new(cfg.options(options), kind).map_err(ReplayError::Kernel)?;
        let mut failures = Vec::new();
        let mut failed = 0;
        for (j, &(line, op)) in trace.ops.iter().enumerate() {
            if let Err(error) = apply(&kernel, &op) {
                failed += 1;
                if failures.len() < LISTED_FAILURES {
                    failures.push(Failure { line, op, error });
                }
            }
            if j % 1024 == 1023 {
                progress(i as u64 * n + j as u64 + 1);
            }
        }
        progress((i as u64 + 1) * n);
        outcomes.push(Outcome {
            kind,
            kernel,
            failures,
            failed_operations: failed,
        });
    }
    Ok(ReplayReport {
        trace,
        options: opts.engine_options(),
        outcomes,
        estimate,
    })
}

/// Read, check and replay a trace from `input`.
pub fn replay_reader(
    input: impl BufRead,
    opts: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let t = read_trace(input, &opts.limits)?;
    let e = check(&t, opts)?;
    run(t, opts, e, |_| {})
}

/// Replay arbitrary bytes as a trace: an error for anything that is not a
/// trace within `opts.limits`, never a panic, and no more time or memory
/// than the limits allow (about; see [`crate::cost`]).
pub fn replay_bytes(input: &[u8], opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    replay_reader(input, opts)
}
