//! docs/DESIGN.md's module map names every source module of the workspace,
//! and nothing that is not one: a module added, moved or removed without
//! the map fails here.

use std::collections::{BTreeMap, BTreeSet};
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

/// A module's path inside its crate (`["vm", "side"]` for
/// `linux/src/vm/side.rs`; empty for the crate root), from a
/// `crate-dir/src/...rs` path.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file.split('/').skip(2).map(str::to_string).collect();
    let last = parts.pop().expect("a file name");
    if !matches!(last.as_str(), "lib.rs" | "main.rs" | "mod.rs") {
        parts.push(last.trim_end_matches(".rs").to_string());
    }
    parts
}

/// The source outside tests and comments: what a module imports.
fn code(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .expect("split yields one part");
    text.lines()
        .map(|l| l.split("//").next().expect("split yields one part"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules of the crate in `dir` that `module` names in its code: every
/// `crate::a::b` and `super::a` path resolved to the longest module it
/// starts with, and, for a directory's module, its submodules named as
/// `child::`. A submodule's use of its ancestors (the types a parent
/// declares for its submodules, the crate root's re-exports) is not
/// counted: the parent declares the child, and that is no circle.
fn imports(
    module: &[String],
    text: &str,
    modules: &BTreeSet<Vec<String>>,
) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let code = code(text);
    let resolve = |base: Vec<String>, rest: &[&str]| {
        let mut target = base;
        for seg in rest {
            let mut next = target.clone();
            next.push(seg.to_string());
            if !modules.contains(&next) {
                break;
            }
            target = next;
        }
        target
    };
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.contains("::"))
        .collect();
    for word in words {
        let segs: Vec<&str> = word.split("::").filter(|s| !s.is_empty()).collect();
        let target = match segs.first() {
            Some(&"crate") => resolve(Vec::new(), &segs[1..]),
            Some(&"super") => {
                let mut base = module.to_vec();
                let mut rest = &segs[..];
                while rest.first() == Some(&"super") {
                    base.pop();
                    rest = &rest[1..];
                }
                resolve(base, rest)
            }
            Some(first) => {
                let mut child = module.to_vec();
                child.push(first.to_string());
                if !modules.contains(&child) {
                    continue;
                }
                resolve(child, &segs[1..])
            }
            None => continue,
        };
        let ancestor = target.len() < module.len() && module.starts_with(&target);
        if target != module && !ancestor {
            out.insert(target);
        }
    }
    out
}

/// Within every crate, no two modules import each other, directly or round
/// a longer circle (the module map's claim).
#[test]
fn no_module_imports_another_that_imports_it_back() {
    let sources = sources();
    let root = root();
    let mut crates: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &sources {
        if file.contains("/src/bin/") {
            continue;
        }
        let krate = file
            .split('/')
            .next()
            .expect("a crate directory")
            .to_string();
        crates.entry(krate).or_default().push(file.clone());
    }
    let mut circles = Vec::new();
    for (krate, files) in &crates {
        let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(f)).collect();
        let graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(root.join(f)).expect("a source file");
                let m = module_of(f);
                let edges = imports(&m, &text, &modules);
                (m, edges)
            })
            .collect();
        // Depth-first search: an edge back to a module on the stack closes
        // a circle.
        fn visit(
            m: &Vec<String>,
            graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
            stack: &mut Vec<Vec<String>>,
            done: &mut BTreeSet<Vec<String>>,
            found: &mut Vec<String>,
        ) {
            stack.push(m.clone());
            for next in graph.get(m).into_iter().flatten() {
                if let Some(at) = stack.iter().position(|s| s == next) {
                    let names: Vec<String> = stack[at..]
                        .iter()
                        .chain([next])
                        .map(|p| {
                            if p.is_empty() {
                                "crate".into()
                            } else {
                                p.join("::")
                            }
                        })
                        .collect();
                    found.push(names.join(" -> "));
                } else if !done.contains(next) {
                    visit(next, graph, stack, done, found);
                }
            }
            stack.pop();
            done.insert(m.clone());
        }
        let mut done = BTreeSet::new();
        let mut found = Vec::new();
        for m in graph.keys() {
            if !done.contains(m) {
                visit(m, &graph, &mut Vec::new(), &mut done, &mut found);
            }
        }
        circles.extend(found.into_iter().map(|c| format!("{krate}: {c}")));
    }
    assert!(
        circles.is_empty(),
        "modules that import each other: {circles:#?}"
    );
}
