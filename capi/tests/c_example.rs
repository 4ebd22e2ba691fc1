//! `examples/qemu_discard.c`, compiled with the system C compiler against
//! the checked-in header and the static library cargo built for this test,
//! then run on a memfd and on a KVM guest_memfd: QEMU's discard path
//! (`kvm_convert_memory` -> `ram_block_discard_guest_memfd_range`) routed
//! through hugepunch. The program checks what the kernel released itself
//! (st_blocks, mincore) and exits non-zero when a check fails.
//!
//! The guest_memfd run is ignored, with the probe's reason, where this KVM
//! offers no mmap()able guest_memfd (capi/build.rs, hugepunch-probe's
//! `needs!`); where the probe found it, the example skipping its run (exit
//! status 77) is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

hugepunch_probe::include_needs!();

const SKIP: i32 = 77;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The static library of this crate, built by cargo beside this test's
/// own executable (`<target dir>/<profile>/deps/`), whatever
/// `CARGO_TARGET_DIR` is.
fn static_library() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let deps = exe.parent().expect("the test lives in a directory");
    let candidates = [
        deps.join("libhugepunch_capi.a"),
        deps.parent()
            .map_or_else(PathBuf::new, |p| p.join("libhugepunch_capi.a")),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "libhugepunch_capi.a is not beside the test ({}): cargo builds the staticlib \
                 crate type with the test; was crate-type changed in capi/Cargo.toml?",
                deps.display()
            )
        })
}

/// `cc`, or `None` (with the reason) when the machine has no C compiler.
fn c_compiler() -> Result<String, String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    match Command::new(&cc).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(cc),
        Ok(out) => Err(format!("`{cc} --version` failed: {}", out.status)),
        Err(e) => Err(format!("no C compiler `{cc}`: {e}")),
    }
}

fn build(cc: &str, out: &Path) {
    let lib = static_library();
    let status = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(crate_dir().join("include"))
        .arg(crate_dir().join("examples/qemu_discard.c"))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(out)
        .status()
        .expect("run the C compiler");
    assert!(
        status.success(),
        "compiling examples/qemu_discard.c against {} failed",
        lib.display()
    );
}

fn run(exe: &Path, backend: &str) -> Option<String> {
    let out = Command::new(exe)
        .arg(backend)
        .output()
        .expect("run the C example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if out.status.code() == Some(SKIP) {
        println!("skipped the {backend} run: {}", stdout.trim());
        return None;
    }
    assert!(
        out.status.success(),
        "qemu_discard {backend} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Some(stdout)
}

/// The figures the program prints must be those of the run it made: 16
/// huge pages converted whole, each freed with one 2 MiB fallocate, the
/// kernel agreeing, nothing left after teardown.
fn check_report(backend: &str, stdout: &str) {
    for line in [
        "  huge_frees               16",
        "  free_calls               16",
        "  invalidations_immediate  0",
        "  conversions_rejected     1",
        "fallocate(PUNCH_HOLE) calls: 16 of 2 MiB, 0 of 4 KiB runs",
        "released (kernel): 33554432 bytes = 16 huge pages;",
        "the kernel holds 0 bytes",
    ] {
        assert!(
            stdout.contains(line),
            "{backend}: the report lacks {line:?}:\n{stdout}"
        );
    }
    assert!(stdout.contains(&format!("qemu_discard ({backend}): every check passed")));
}

fn built() -> PathBuf {
    // Rust links with the C compiler: where the tests link, there is one.
    let cc = c_compiler().expect("a C compiler (the linker of these tests)");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "qemu_discard-{}",
        std::thread::current()
            .name()
            .unwrap_or("main")
            .replace("::", "-")
    ));
    build(&cc, &exe);
    exe
}

#[test]
fn the_qemu_discard_example_builds_and_runs_on_a_memfd() {
    let memfd = run(&built(), "memfd").expect("a memfd is always available");
    check_report("memfd", &memfd);
}

needs! { guest_memfd;
    #[test]
    fn the_qemu_discard_example_builds_and_runs_on_guest_memfd() {
        let gmem = run(&built(), "guest_memfd").expect(
            "the build-time probe found guest_memfd, but the example skipped its run (exit 77)",
        );
        check_report("guest_memfd", &gmem);
    }
}
