//! Probes, where the tests are built, whether /dev/kvm can be opened: if
//! not, the guest_memfd tests are marked `#[ignore = "..."]` through the
//! cfg `hugepunch_no_kvm`, so `cargo test` lists them as ignored with the
//! reason instead of passing them silently. (A test still skips at run
//! time, printing why, when /dev/kvm opens but guest_memfd is refused.)
fn main() {
    println!("cargo::rustc-check-cfg=cfg(hugepunch_no_kvm)");
    println!("cargo::rerun-if-changed=/dev/kvm");
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        println!("cargo::rustc-cfg=hugepunch_no_kvm");
    }
}
