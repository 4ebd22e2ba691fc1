//! What this machine offers the tests: every built-in probe and its answer
//! (`cargo run -p hugepunch-probe --example probes`).
fn main() {
    for p in hugepunch_probe::BUILTIN {
        println!("{}: {:?}", p.name, hugepunch_probe::run(p));
    }
}
