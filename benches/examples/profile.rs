//! Development aid: run one implementation on one pattern many times (for
//! `perf record`): `cargo run --release -p hugepunch-benches --example
//! profile -- PATTERN IMPLEMENTATION REPS`.
fn main() {
    use hugepunch_benches::*;
    let args: Vec<String> = std::env::args().collect();
    let pat: hugepunch_workload::Pattern = args
        .get(1)
        .map_or("ascending", |s| s.as_str())
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let imp = args.get(2).map_or("hugepunch", |s| s.as_str());
    let reps: usize = args.get(3).map_or(200, |s| s.parse().unwrap());
    let work = workload(pat, 64, 1, Sharing::Disjoint, SEED);
    let n = work[0].len() as f64;
    println!("ops {}", work[0].len() * reps);
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = make(imp, 64);
        let d = run(&*t, &work);
        best = best.min(d.as_secs_f64() * 1e9 / n);
    }
    println!("{pat} {imp}: best {best:.1} ns/op");
}
