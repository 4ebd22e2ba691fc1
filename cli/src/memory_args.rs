//! The arguments the commands on real memory share: which memory
//! (`--backend`, `--path`: `real`, `vm`, `stream`) and which patterns on it
//! (`--pattern`, `--seed`, `--json`: `real`, `vm`). Each command states its
//! own default backend in its help (`mut_arg` on its `Args`).

use hugepunch_linux::{Backend, SetupError};
use std::path::PathBuf;

/// `--backend` and `--path`.
#[derive(clap::Args)]
pub struct MemoryArgs {
    /// memfd, guest-memfd, thp (a private huge=always tmpfs mounted for the
    /// run: real transparent huge pages, root only, nothing left behind) or
    /// file (a file in --path, as QEMU's mem-path=)
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Backend::NAMES))]
    backend: Option<String>,
    /// The directory of --backend file: a tmpfs mounted with -o huge=,
    /// hugetlbfs, or any other filesystem; the huge page size is read from
    /// it [default: none; --backend file needs it]
    #[arg(long, value_name = "DIR")]
    path: Option<PathBuf>,
}

impl MemoryArgs {
    /// The backend asked for (`None`: the command's default), checking
    /// `--backend` and `--path` together: `file` needs a directory, and
    /// only `file` takes one.
    pub fn asked(&self, command: &'static str) -> anyhow::Result<Option<Backend>> {
        match (self.backend.as_deref(), self.path.as_deref()) {
            (Some("file"), Some(dir)) => Ok(Some(Backend::File(dir.to_path_buf()))),
            (Some("file"), None) => Err(crate::arg_error(
                command,
                "--backend file needs --path DIR: the directory to make the file in (a tmpfs \
                 mounted with -o huge=always, or hugetlbfs)"
                    .to_string(),
            )),
            (name, Some(_)) => Err(crate::arg_error(
                command,
                format!(
                    "--path is for --backend file, not {}",
                    name.unwrap_or("the default backend")
                ),
            )),
            (Some(name), None) => {
                Ok(Some(name.parse().map_err(|e: SetupError| {
                    crate::arg_error(command, e.to_string())
                })?))
            }
            (None, None) => Ok(None),
        }
    }
}

/// `arg` (`--backend`) with the command's `default` after the shared help.
pub fn with_default(arg: clap::Arg, default: &str) -> clap::Arg {
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    arg.help(format!("{help} [default: {default}]"))
}

/// `--pattern`, `--seed` and `--json`.
#[derive(clap::Args)]
pub struct PatternArgs {
    /// The pattern, or all of them one after the other.
    #[arg(long, default_value = "ascending", value_parser = crate::patterns_arg())]
    pub pattern: crate::Patterns,
    /// Seed of the random patterns (the same operations as `gen` writes
    /// for the same pattern, size and seed).
    #[arg(long, default_value_t = hugepunch_workload::DEFAULT_SEED)]
    pub seed: u64,
    /// One JSON object per pattern.
    #[arg(long)]
    pub json: bool,
}
