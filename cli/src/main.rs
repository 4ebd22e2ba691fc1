//! `hugepunch`: the demo (no arguments), `replay`, `gen`, `real`.
//!
//! Every user error is one line on stderr and a non-zero exit status.

mod compare;
mod demo;
#[cfg(target_os = "linux")]
mod memory_args;
mod progress;
#[cfg(target_os = "linux")]
mod qemu;
#[cfg(target_os = "linux")]
mod real;
mod report;
mod stream;
mod svg;
#[cfg(target_os = "linux")]
mod vm;

use anyhow::Context as _;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use hugepunch::Policy;
use hugepunch_model::StrategyKind;
use hugepunch_workload::Pattern;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hugepunch",
    version,
    about = "Deferred hole-punch coalescing for huge-page-backed confidential-VM guest memory",
    long_about = "Deferred hole-punch coalescing for huge-page-backed confidential-VM guest memory.\n\n\
                  With no arguments, runs the demo: a simulated 4 GiB confidential guest, adversarial \
                  workloads, and a side-by-side table of hugepunch and what hosts do today."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The demo (what `hugepunch` with no arguments runs).
    Demo(demo::Args),
    /// Replay a trace (docs/CONTRACT.md §7) on the simulated kernel.
    #[command(after_help = TRACE_FORMAT)]
    Replay(ReplayArgs),
    /// Write an adversarial trace to stdout (or --output).
    Gen(GenArgs),
    /// The conversion stream of a confidential guest (SWIOTLB, virtio
    /// rings, coherent DMA, balloon, free page reporting) handled as VMMs do
    /// today and through hugepunch, on the kernel model and, with
    /// --backend, on real memory.
    Stream(stream::Args),
    /// Run a pattern on real kernel memory (memfd or KVM guest_memfd), once
    /// punching 4 KiB directly as VMMs do today and once through the engine,
    /// and compare.
    #[cfg(target_os = "linux")]
    Real(real::Args),
    /// Run a real guest (vCPUs at CPL3) on KVM guest_memfd or on ordinary
    /// guest memory (THP, memfd, a file) that gives memory back; release it
    /// 4 KiB at a time as VMMs do today, then through the engine, and
    /// compare (needs /dev/kvm).
    #[cfg(target_os = "linux")]
    Vm(vm::Args),
    /// A Debian guest kernel's virtio-balloon on QEMU as it is and on QEMU
    /// with hugepunch (vmm/qemu/), side by side, on guest RAM in real
    /// transparent huge pages (root).
    #[cfg(target_os = "linux")]
    Qemu(qemu::Args),
}

/// The trace format in brief, after `replay --help` (docs/CONTRACT.md §7
/// has it whole).
const TRACE_FORMAT: &str = "\
Trace format (docs/CONTRACT.md §7), one line each; # starts a comment:
  header lines, before the first operation [default]:
    size N                    file size, a multiple of the huge page size [1G]
    order N                   huge page order, 1 to 18 (9: 2 MiB huge pages) [9]
    start populated|empty     every huge page starts allocated, or absent [populated]
    start private|shared      every subpage's attribute at the start [private]
  operations (offsets and lengths in bytes, multiples of 4 KiB):
    punch OFFSET LEN
    convert OFFSET LEN private|shared
    populate OFFSET LEN
    flush OFFSET LEN
    teardown
  numbers: decimal digits, or 0x and hex digits, then an optional K, M or G (times 1024,
    1024^2, 1024^3); no sign, no spaces, no B: 4096, 4K, 0x1000, 2M, 1G.
A malformed line stops the replay before it starts (`line N: what is wrong`); an operation
that fails (a bad range, a refused conversion) is counted and the replay goes on.";

/// A mistake in the arguments of a subcommand: the message, and where
/// that subcommand's help is.
#[derive(Debug, thiserror::Error)]
#[error("{message} (see 'hugepunch {command} --help')")]
struct ArgError {
    command: &'static str,
    message: String,
}

/// An [`ArgError`] of `command` (`demo`, `replay`, `gen`, `real`).
fn arg_error(command: &'static str, message: impl Into<String>) -> anyhow::Error {
    ArgError {
        command,
        message: message.into(),
    }
    .into()
}

/// The pattern names (`all` too when `all`), each with what it does, for
/// `--help` and the checking of a value.
fn pattern_values(all: bool) -> Vec<PossibleValue> {
    let mut v: Vec<PossibleValue> = Pattern::ALL
        .iter()
        .map(|p| PossibleValue::new(p.name()).help(p.describes()))
        .collect();
    if all {
        v.push(PossibleValue::new("all").help("every pattern, one after the other"));
    }
    v
}

/// The patterns a `--pattern` of `real` and `vm` names: one, or `all` of
/// them.
#[derive(Debug, Clone)]
struct Patterns(Vec<Pattern>);

/// A pattern name or `all` (listed in `--help`).
fn patterns_arg() -> impl TypedValueParser<Value = Patterns> {
    PossibleValuesParser::new(pattern_values(true)).map(|s| match s.as_str() {
        "all" => Patterns(Pattern::ALL.to_vec()),
        s => Patterns(vec![s
            .parse()
            .unwrap_or_else(|_| unreachable!("{s} is a listed name"))]),
    })
}

/// A pattern name (listed in `--help`).
fn pattern_arg() -> impl TypedValueParser<Value = Pattern> {
    PossibleValuesParser::new(pattern_values(false)).map(|s| {
        s.parse::<Pattern>()
            .unwrap_or_else(|_| unreachable!("{s} is a listed name"))
    })
}

/// The conversion policy, as flags spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PolicyArg {
    /// Refuse a conversion to private over a pending punch (EAGAIN).
    Reject,
    /// Un-punch (zero) pending subpages, then convert.
    CancelAndZero,
}

impl From<PolicyArg> for Policy {
    fn from(p: PolicyArg) -> Policy {
        match p {
            PolicyArg::Reject => Policy::Reject,
            PolicyArg::CancelAndZero => Policy::CancelAndZero,
        }
    }
}

/// `--strategy`: one strategy, or all of them side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrategyArg {
    One(StrategyKind),
    All,
}

/// A strategy name or `all` (listed in `--help`).
fn strategy_arg() -> impl TypedValueParser<Value = StrategyArg> {
    let mut names: Vec<PossibleValue> = StrategyKind::ALL
        .iter()
        .map(|k| PossibleValue::new(k.name()).help(k.describes()))
        .collect();
    names.push(PossibleValue::new("all").help("every strategy, side by side"));
    PossibleValuesParser::new(names).map(|s| match s.as_str() {
        "all" => StrategyArg::All,
        s => StrategyArg::One(
            s.parse()
                .unwrap_or_else(|_| unreachable!("{s} is a listed name")),
        ),
    })
}

/// A number in the trace syntax (docs/CONTRACT.md §7.2): decimal digits, or 0x and
/// hex digits, then an optional K, M or G; no sign, nothing else.
fn number(s: &str) -> Result<u64, String> {
    hugepunch_workload::number(s).map_err(|e| {
        format!("bad number {s:?}: {e} (decimal or 0x hex digits, then an optional K, M or G)")
    })
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The trace file (- for standard input).
    trace: PathBuf,
    /// The strategy, or all of them side by side.
    #[arg(long, default_value = "hugepunch", value_parser = strategy_arg())]
    strategy: StrategyArg,
    /// Conversion policy of the engine [default: reject]
    #[arg(long, value_enum)]
    policy: Option<PolicyArg>,
    /// Pending-bytes budget of the engine (e.g. 2M; 0 is a real budget)
    /// [default: none, no budget]
    #[arg(long, value_parser = number)]
    budget: Option<u64>,
    /// Print one JSON object (statistics under "stats").
    #[arg(long)]
    json: bool,
    /// Write a picture of the file at the end [default: no picture]
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

#[derive(clap::Args)]
struct GenArgs {
    /// The pattern.
    #[arg(value_parser = pattern_arg())]
    pattern: Pattern,
    /// File size (a multiple of the huge page size).
    #[arg(long, default_value = "64M", value_parser = number)]
    size: u64,
    /// Huge page order (9 = 2 MiB, 18 = 1 GiB).
    #[arg(long, default_value_t = 9)]
    order: u8,
    /// Seed of the random patterns.
    #[arg(long, default_value_t = hugepunch_workload::DEFAULT_SEED)]
    seed: u64,
    /// Write here instead of stdout [default: stdout]
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

fn gen(a: GenArgs) -> anyhow::Result<()> {
    if !(1..=hugepunch::MAX_ORDER).contains(&a.order) {
        return Err(arg_error(
            "gen",
            format!(
                "--order must be between 1 and {}, got {}",
                hugepunch::MAX_ORDER,
                a.order
            ),
        ));
    }
    let huge_page = 4096u64 << a.order;
    if a.size == 0 || !a.size.is_multiple_of(huge_page) {
        return Err(arg_error(
            "gen",
            format!(
                "--size must be a positive multiple of the huge page size ({} bytes at order {})",
                huge_page, a.order
            ),
        ));
    }
    let geo = hugepunch::Geometry::new(a.size, a.order)?;
    // What `replay` reads: a trace it would refuse is not worth writing.
    let ops = a.pattern.operations(geo, a.size);
    let max = hugepunch_cli::replay::MAX_OPERATIONS as u64;
    if ops > max {
        return Err(arg_error(
            "gen",
            format!(
                "--size {} would make a trace of {} operations, more than replay reads ({}); use a smaller --size",
                format_size(a.size),
                hugepunch_cli::format::count(ops),
                hugepunch_cli::format::count(max)
            ),
        ));
    }
    let text = format!(
        "# hugepunch gen {} --size {} --order {} --seed {}\n# {}\n{}",
        a.pattern,
        a.size,
        a.order,
        a.seed,
        a.pattern.describes(),
        a.pattern.trace(geo, a.seed).to_text()
    );
    match a.output {
        Some(path) => std::fs::write(&path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => write_stdout(&text)?,
    }
    Ok(())
}

/// A size as the user may have written it: `16 GiB (0x400000000)`.
fn format_size(n: u64) -> String {
    format!("{} ({n:#x})", hugepunch_cli::format::bytes(n))
}

/// Write to stdout; a closed pipe (`| head`) ends quietly.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => r.context("cannot write to stdout"),
    }
}

/// Clap's whole message on one line: what is wrong (with what clap names:
/// the missing argument, the bad value, a tip), then the usage and where
/// the help of `subcommand` (the first argument, if it names one) is.
fn one_line(rendered: &str, subcommand: Option<&str>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut usage: Vec<String> = Vec::new();
    let mut in_usage = false;
    let mut list = false;
    for line in rendered.lines() {
        let l = line.trim();
        if l.is_empty() {
            in_usage = false;
            list = false;
            continue;
        }
        if l.starts_with("For more information") {
            continue;
        }
        if let Some(u) = l.strip_prefix("Usage:") {
            in_usage = true;
            usage.push(u.trim().to_string());
            continue;
        }
        if in_usage {
            usage.push(l.to_string());
            continue;
        }
        let l = l.trim_start_matches("error:").trim();
        // The lines after one that ends with ':' are its list (the
        // missing arguments).
        match parts.last_mut() {
            Some(p) if list => {
                p.push_str(if p.ends_with(':') { " " } else { ", " });
                p.push_str(l);
            }
            _ => {
                parts.push(l.to_string());
                list = l.ends_with(':');
            }
        }
    }
    let mut msg = if parts.is_empty() {
        "invalid arguments".to_string()
    } else {
        parts.join("; ")
    };
    // The help of the subcommand the arguments are for, else the tool's.
    let help = match subcommand {
        Some(sub) if Cli::command().find_subcommand(sub).is_some() => {
            format!("see 'hugepunch {sub} --help'")
        }
        _ => "see 'hugepunch --help'".to_string(),
    };
    if !usage.is_empty() {
        let _ = write!(msg, " (usage: {}; {help})", usage.join(" | "));
    } else {
        let _ = write!(msg, " ({help})");
    }
    msg
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            let sub = std::env::args().nth(1);
            eprintln!(
                "hugepunch: error: {}",
                one_line(&e.render().to_string(), sub.as_deref())
            );
            std::process::exit(2);
        }
    };
    let res = match cli.command {
        None => demo::run(demo::Args::default()),
        Some(Command::Demo(a)) => demo::run(a),
        Some(Command::Replay(a)) => report::run(a),
        Some(Command::Gen(a)) => gen(a),
        Some(Command::Stream(a)) => stream::run(a),
        #[cfg(target_os = "linux")]
        Some(Command::Real(a)) => real::run(a),
        #[cfg(target_os = "linux")]
        Some(Command::Vm(a)) => vm::run(a),
        #[cfg(target_os = "linux")]
        Some(Command::Qemu(a)) => qemu::run(a),
    };
    if let Err(e) = res {
        eprintln!("hugepunch: error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
