//! Probes what this machine can do (a KVM that runs a guest, guest_memfd,
//! mounting, hugetlb pages, binutils, and QEMU with hugepunch beside the
//! Debian guest image) for the crate's tests: a test that needs a missing
//! capability is marked `#[ignore = "needs ...: <reason>"]`
//! (hugepunch-probe's `needs!` macro), and one that runs probes again
//! first. Never fails the build; see hugepunch-probe's documentation.
use hugepunch_probe::Probe;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `vmm/qemu/build.sh` and `vmm/qemu/guest/build.sh` leave their
/// results (the same rule as theirs and as `hugepunch qemu`'s).
fn cache() -> PathBuf {
    match std::env::var_os("HUGEPUNCH_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/hugepunch"),
    }
}

/// QEMU with hugepunch (its balloon has the `hugepunch` property), QEMU
/// as it is, and the guest image.
fn qemu_balloon() -> Result<(), String> {
    const HOW: &str = "run vmm/qemu/build.sh and vmm/qemu/guest/build.sh, \
                       then HUGEPUNCH_REPROBE=$(date +%s) cargo test";
    let dir = cache();
    let patched = dir.join("qemu/bin/qemu-system-x86_64");
    let help = Command::new(&patched)
        .args(["-device", "virtio-balloon-pci,help"])
        .output()
        .map_err(|e| {
            format!(
                "no QEMU with hugepunch at {} ({e}): {HOW}",
                patched.display()
            )
        })?;
    if !String::from_utf8_lossy(&help.stdout).contains("hugepunch-budget") {
        return Err(format!(
            "{} has no hugepunch balloon properties: {HOW}",
            patched.display()
        ));
    }
    let stock = Path::new("/usr/bin/qemu-system-x86_64");
    if !stock.exists() {
        return Err(format!("no QEMU as it is at {}: {HOW}", stock.display()));
    }
    for file in ["vmlinuz", "initramfs.cpio.gz", "cmdline"] {
        let path = dir.join("guest").join(file);
        if !path.exists() {
            return Err(format!("no guest image at {}: {HOW}", path.display()));
        }
    }
    Ok(())
}

fn main() {
    // The probe's answer changes when the scripts (re)build; a file that
    // does not exist yet would make cargo rerun this script on every
    // build, so the nearest existing directory stands in for it.
    let dir = cache();
    println!("cargo::rerun-if-env-changed=HUGEPUNCH_CACHE");
    for stamp in [dir.join("qemu/VERSION"), dir.join("guest/MANIFEST")] {
        if let Some(watch) = stamp.ancestors().take(3).find(|p| p.exists()) {
            println!("cargo::rerun-if-changed={}", watch.display());
        }
    }
    hugepunch_probe::build_script_with(&[Probe {
        name: "qemu_balloon",
        needs: "QEMU with hugepunch and the Debian guest image",
        check: qemu_balloon,
    }]);
}
