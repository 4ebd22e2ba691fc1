//! Probes of what the host can do, for tests that need it: decided by
//! trying the real capability (create a VM and run a guest, create a
//! guest_memfd and map it, mount a tmpfs and allocate in it), at build time
//! by the crate's build script, and again when the test runs.
//!
//! # How a test uses it
//!
//! The crate's `build.rs` runs the probes ([`build_script`]) and writes a
//! macro, `needs!`, into `OUT_DIR`; a test file includes it
//! ([`include_needs!`]) and wraps each test that needs a capability:
//!
//! ```text
//! hugepunch_probe::include_needs!();
//!
//! needs! { kvm_guest, mount;
//!     /// A real guest on THP memory.
//!     #[test]
//!     fn thp_guest() { /* ... */ }
//! }
//! ```
//!
//! Where a probe failed at build time the test gets
//! `#[ignore = "needs <what>: <the probe's reason>"]`, so `cargo test` lists
//! it as `ignored, needs ...` and counts it among the ignored tests; it never
//! passes having checked nothing. Where every probe passed, the test runs,
//! and its first act is to run its probes again ([`require`]): if the
//! capability has gone since the build, it **fails**, naming it (it never
//! passes silently). `cargo test -- --include-ignored` runs the ignored
//! ones too; they fail the same way if the capability is still missing.
//! A name `needs!` does not know is a compile error.
//!
//! # Adding a probe
//!
//! A probe is data ([`Probe`]): a name (an identifier: the test's
//! `needs! { name; ... }` and the cfg `hugepunch_has_<name>`), what it
//! stands for, and a function that tries it. A built-in one is added to
//! [`BUILTIN`] (three lines, and the cfg to the workspace's
//! `unexpected_cfgs` list); a crate's build script may also pass probes of
//! its own to [`build_script_with`] (those are re-checked by the test
//! itself, not by [`require`]).
//!
//! # Staleness, and builds elsewhere
//!
//! The build script runs again when `/dev/kvm` changes, when the probes
//! change, and when `HUGEPUNCH_REPROBE` changes: after changing the machine
//! (loading KVM, reserving hugetlb pages), run
//! `HUGEPUNCH_REPROBE=$(date +%s) cargo test`. A capability that has gone
//! fails its tests (above); one that has appeared leaves them ignored until
//! then. The probes never fail a build: each runs on its own thread, a
//! panic or a probe still running after 30 s counts as "missing", and
//! nothing is probed (every such test ignored, saying so) on docs.rs
//! (`DOCS_RS`), where `HUGEPUNCH_NO_PROBE` is set, or where the crate is
//! not built inside the hugepunch workspace (`cargo package`'s
//! verification, a registry download): the probes create and destroy a
//! VM and mount and unmount a detached tmpfs, harmless but nothing a
//! dependent's build should do.
#![deny(missing_docs)]

#[cfg(all(feature = "builtin", target_os = "linux"))]
mod builtin;

use std::fmt::Write as _;
use std::time::Duration;

/// One capability a test may need.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// An identifier: what `needs!` takes, and the cfg
    /// `hugepunch_has_<name>` set where the probe passed.
    pub name: &'static str,
    /// What the capability is, for people ("a KVM that runs a guest").
    pub needs: &'static str,
    /// Try it: `Err` says why it is missing (a step and its errno).
    pub check: fn() -> Result<(), String>,
}

/// The built-in probes (empty without the `builtin` feature).
#[cfg(all(feature = "builtin", target_os = "linux"))]
pub const BUILTIN: &[Probe] = builtin::PROBES;
/// The built-in probes (empty without the `builtin` feature).
#[cfg(not(all(feature = "builtin", target_os = "linux")))]
pub const BUILTIN: &[Probe] = &[];

/// How long a probe may take before it counts as missing.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Run one probe on a thread of its own: a panic, or no answer within the
/// timeout, is a reason too.
pub fn run(probe: &Probe) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let check = probe.check;
    let spawned = std::thread::Builder::new()
        .name(format!("probe-{}", probe.name))
        .spawn(move || {
            let result = std::panic::catch_unwind(check)
                .unwrap_or_else(|_| Err("the probe panicked".to_string()));
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        return Err(format!("could not start the probe: {e}"));
    }
    rx.recv_timeout(TIMEOUT)
        .unwrap_or_else(|_| Err(format!("the probe gave no answer in {TIMEOUT:?}")))
}

/// Why nothing is probed in this build, if so (see the crate
/// documentation).
fn not_probed() -> Option<String> {
    if std::env::var_os("DOCS_RS").is_some() {
        return Some("not probed: a docs.rs build".into());
    }
    if std::env::var_os("HUGEPUNCH_NO_PROBE").is_some() {
        return Some("not probed: HUGEPUNCH_NO_PROBE is set".into());
    }
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let root = dir.parent()?.join("Cargo.toml");
    let workspace = std::fs::read_to_string(root).unwrap_or_default();
    if !workspace.contains("[workspace]") {
        return Some(
            "not probed: the crate is built outside the hugepunch workspace (cargo package, \
             a registry download)"
                .into(),
        );
    }
    None
}

/// The build script's whole job: [`build_script_with`] the built-in probes.
pub fn build_script() {
    build_script_with(&[]);
}

/// Run the built-in probes and `extra` (a crate's own, which replace
/// built-in ones of the same name), and tell cargo:
/// for each probe the cfg `hugepunch_has_<name>` where it passed (declared
/// with `cargo::rustc-check-cfg`), and the macro `needs!` in
/// `$OUT_DIR/hugepunch_needs.rs` (see the crate documentation). Never
/// fails: a probe that cannot run is a missing capability with a reason.
pub fn build_script_with(extra: &[Probe]) {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=/dev/kvm");
    for var in ["HUGEPUNCH_REPROBE", "HUGEPUNCH_NO_PROBE", "DOCS_RS"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let skip = not_probed();
    // A crate's own probe replaces a built-in one of the same name (cargo
    // may unify the `builtin` feature into a crate that asked without it).
    let probes: Vec<&Probe> = BUILTIN
        .iter()
        .filter(|b| extra.iter().all(|e| e.name != b.name))
        .chain(extra)
        .collect();
    let mut results = Vec::new();
    for p in &probes {
        println!("cargo::rustc-check-cfg=cfg(hugepunch_has_{})", p.name);
        let result = match &skip {
            Some(why) => Err(why.clone()),
            None => run(p),
        };
        if result.is_ok() {
            println!("cargo::rustc-cfg=hugepunch_has_{}", p.name);
        }
        results.push((*p, result));
    }
    let out = std::env::var_os("OUT_DIR").map(std::path::PathBuf::from);
    if let Some(out) = out {
        let _ = std::fs::write(out.join("hugepunch_needs.rs"), needs_macro(&results));
    }
}

/// The text of the `needs!` macro for these probe results.
pub fn needs_macro(results: &[(&Probe, Result<(), String>)]) -> String {
    let mut m = String::from(
        "// Written by hugepunch_probe::build_script: the probes' results on the machine that\n\
         // built this crate. See hugepunch_probe's documentation.\n\
         #[allow(unused_macros)]\nmacro_rules! needs {\n",
    );
    let item = "$(#[$m:meta])* fn $n:ident() $b:block";
    for (p, result) in results {
        let name = p.name;
        let next = format!("$(#[$m])* fn $n() {{ ::hugepunch_probe::require({name:?}); $b }}");
        match result {
            Ok(()) => {
                let _ = writeln!(
                    m,
                    "    (@go [{name} $(, $rest:ident)*] [$($ign:tt)*] {item}) => {{\n        \
                     needs!(@go [$($rest),*] [$($ign)*] {next});\n    }};"
                );
            }
            Err(why) => {
                let reason = format!("needs {}: {}", p.needs, why.replace('\n', " "));
                let _ = writeln!(
                    m,
                    "    (@go [{name} $(, $rest:ident)*] [] {item}) => {{\n        \
                     needs!(@go [$($rest),*] [#[ignore = {reason:?}]] {next});\n    }};\n    \
                     (@go [{name} $(, $rest:ident)*] [$($ign:tt)+] {item}) => {{\n        \
                     needs!(@go [$($rest),*] [$($ign)+] {next});\n    }};"
                );
            }
        }
    }
    let _ = writeln!(
        m,
        "    (@go [] [$($ign:tt)*] {item}) => {{ $(#[$m])* $($ign)* fn $n() $b }};\n    \
         ($($p:ident),+; $($item:tt)*) => {{ needs!(@go [$($p),+] [] $($item)*); }};\n}}"
    );
    m
}

/// Bring the `needs!` macro the crate's build script wrote into scope (at
/// the top of a test file or module, before the tests that use it).
#[macro_export]
macro_rules! include_needs {
    () => {
        include!(concat!(env!("OUT_DIR"), "/hugepunch_needs.rs"));
    };
}

/// At the start of a test that needs `name`: run the built-in probe of that
/// name again and panic, naming the capability and the reason, if it is
/// missing now. Probes a build script defined itself are not known here:
/// their tests re-check themselves.
pub fn require(name: &str) {
    let Some(probe) = BUILTIN.iter().find(|p| p.name == name) else {
        return;
    };
    if let Err(why) = run(probe) {
        panic!(
            "this test needs {} and the probe `{name}` says it is missing now: {why}. (A test \
             runs only where the build-time probe found it, or under --include-ignored; if \
             this machine changed since the build, rebuild with \
             HUGEPUNCH_REPROBE=$(date +%s).)",
            probe.needs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yes() -> Result<(), String> {
        Ok(())
    }
    fn no() -> Result<(), String> {
        Err("EPERM \"quoted\"".into())
    }
    fn boom() -> Result<(), String> {
        panic!("inside a probe")
    }

    #[test]
    fn a_panicking_probe_is_a_missing_capability() {
        let p = Probe {
            name: "boom",
            needs: "nothing",
            check: boom,
        };
        assert_eq!(run(&p), Err("the probe panicked".into()));
    }

    #[test]
    fn the_macro_ignores_with_the_reason_only_where_a_probe_failed() {
        let a = Probe {
            name: "a",
            needs: "A",
            check: yes,
        };
        let b = Probe {
            name: "b",
            needs: "B",
            check: no,
        };
        let m = needs_macro(&[(&a, Ok(())), (&b, no())]);
        assert!(
            m.contains(r#"#[ignore = "needs B: EPERM \"quoted\""]"#),
            "{m}"
        );
        assert_eq!(m.matches("#[ignore").count(), 1, "{m}");
        assert!(m.contains(r#"::hugepunch_probe::require("a")"#), "{m}");
    }
}
