//! The checked-in header, `include/hugepunch.h`, is what cbindgen makes of
//! `src/lib.rs` with `cbindgen.toml`: this test regenerates it in memory
//! and fails when the two differ (the ABI drifted from the header C VMMs
//! compile against). `HUGEPUNCH_BLESS=1` rewrites the header instead.

use std::path::{Path, PathBuf};

const REGENERATE: &str = "HUGEPUNCH_BLESS=1 cargo test -p hugepunch-capi --test header";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What cbindgen generates from `src` with the crate's configuration.
fn generate(src: &Path) -> String {
    let config = cbindgen::Config::from_file(crate_dir().join("cbindgen.toml"))
        .expect("capi/cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(src)
        .generate()
        .expect("cbindgen generates the header from capi/src/lib.rs");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

/// `None` when equal, else the first differing line of each.
fn first_difference(expected: &str, actual: &str) -> Option<String> {
    if expected == actual {
        return None;
    }
    let mut e = expected.lines();
    let mut a = actual.lines();
    let mut n = 1;
    loop {
        match (e.next(), a.next()) {
            (Some(x), Some(y)) if x == y => n += 1,
            (x, y) => {
                return Some(format!(
                    "first difference at line {n}:\n  checked in: {}\n  generated:  {}",
                    x.unwrap_or("<end of file>"),
                    y.unwrap_or("<end of file>")
                ))
            }
        }
    }
}

#[test]
fn the_checked_in_header_matches_the_code() {
    let header = crate_dir().join("include/hugepunch.h");
    let generated = generate(&crate_dir().join("src/lib.rs"));
    if std::env::var_os("HUGEPUNCH_BLESS").is_some() {
        std::fs::write(&header, &generated).expect("write include/hugepunch.h");
        eprintln!("wrote {}", header.display());
        return;
    }
    let checked_in = std::fs::read_to_string(&header).unwrap_or_default();
    if let Some(diff) = first_difference(&checked_in, &generated) {
        panic!(
            "capi/include/hugepunch.h does not match capi/src/lib.rs (the C ABI changed and \
             the header was not regenerated);\n{diff}\nregenerate it with:\n  {REGENERATE}\n\
             and commit the new header"
        );
    }
}

/// The check can fail: a new entry point added to the source is a
/// difference from the checked-in header.
#[test]
fn a_drifted_abi_is_caught() {
    let src = std::fs::read_to_string(crate_dir().join("src/lib.rs")).unwrap();
    let drifted = format!(
        "{src}\n/// Added after the header was generated.\n#[no_mangle]\n\
         pub extern \"C\" fn hugepunch_drifted(x: u32) -> u32 {{ x }}\n"
    );
    let dir = std::env::temp_dir().join(format!("hugepunch-capi-drift-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lib.rs");
    std::fs::write(&path, drifted).unwrap();
    let generated = generate(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    let checked_in = std::fs::read_to_string(crate_dir().join("include/hugepunch.h")).unwrap();
    let diff = first_difference(&checked_in, &generated).expect("the drift is a difference");
    assert!(
        generated.contains("uint32_t hugepunch_drifted(uint32_t x);"),
        "{diff}"
    );
}
