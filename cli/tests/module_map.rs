//! docs/DESIGN.md's module map names every source module of the workspace,
//! and nothing that is not one: a module added, moved or removed without
//! the map fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace's source files, as `crate-dir/src/...rs` paths.
fn sources() -> BTreeSet<String> {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(base).expect("under the root");
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    let root = root();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .split("members = [")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .expect("the workspace's members");
    let mut out = BTreeSet::new();
    for member in members.split(',').map(|m| m.trim().trim_matches('"')) {
        if member.is_empty() {
            continue;
        }
        let src = root.join(member).join("src");
        if src.is_dir() {
            walk(&src, &root, &mut out);
        }
    }
    out
}

/// The paths the map's tables name.
fn mapped() -> BTreeSet<String> {
    let design = std::fs::read_to_string(root().join("docs/DESIGN.md")).expect("DESIGN.md");
    let map = design
        .split("## Module map")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("DESIGN.md has a '## Module map' section");
    map.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|p| p.ends_with(".rs"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_module_map_names_every_source_module_and_no_other() {
    let sources = sources();
    let mapped = mapped();
    assert!(
        sources.len() > 50,
        "found only {} source files",
        sources.len()
    );
    let missing: Vec<_> = sources.difference(&mapped).collect();
    let stale: Vec<_> = mapped.difference(&sources).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/DESIGN.md's module map: missing {missing:?}; names no file: {stale:?}"
    );
}
