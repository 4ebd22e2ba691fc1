//! `hugepunch real`: the same pattern on real kernel memory, punched
//! directly and through the engine (hugepunch-linux does the work).

use anyhow::Context as _;
use hugepunch_linux::pattern::PATTERNS;
use hugepunch_linux::Backend;

#[derive(clap::Args)]
pub struct Args {
    /// memfd or guest-memfd (default: guest-memfd where /dev/kvm offers it,
    /// else memfd).
    #[arg(long, value_parser = backend)]
    backend: Option<Backend>,
    /// File size (a multiple of 2 MiB).
    #[arg(long, default_value = "1G", value_parser = crate::number)]
    size: u64,
    /// ascending, descending, random, strided, round-robin, pin, churn,
    /// straddling, or all.
    #[arg(long, default_value = "ascending")]
    pattern: String,
    /// One JSON object per pattern.
    #[arg(long)]
    json: bool,
}

fn backend(s: &str) -> Result<Backend, String> {
    s.parse::<Backend>().map_err(|e| e.to_string())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let backend = a.backend.unwrap_or_else(Backend::default_here);
    let patterns: Vec<&str> = if a.pattern == "all" {
        PATTERNS.to_vec()
    } else {
        vec![a.pattern.as_str()]
    };
    for p in patterns {
        let spinner = crate::progress::spinner(!a.json, &format!("real {p} on {backend}"));
        let report = hugepunch_linux::real::run(backend, a.size, p)
            .with_context(|| format!("real {p} on {backend}"))?;
        spinner.finish_and_clear();
        if a.json {
            crate::write_stdout(&format!("{}\n", serde_json::to_string(&report)?))?;
        } else {
            crate::write_stdout(&format!("{}\n", report.table()))?;
        }
    }
    Ok(())
}
