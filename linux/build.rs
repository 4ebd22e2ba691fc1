//! Probes what this machine can do (a KVM that runs a guest, guest_memfd,
//! mounting, hugetlb pages, binutils) for the crate's tests: a test that
//! needs a missing capability is marked `#[ignore = "needs ...: <reason>"]`
//! (hugepunch-probe's `needs!` macro), and one that runs probes again
//! first. Never fails the build; see hugepunch-probe's documentation.
fn main() {
    hugepunch_probe::build_script();
}
