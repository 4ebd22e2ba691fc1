//! Development aid: run one implementation on one pattern many times (for
//! `perf record` or callgrind): `cargo run --release -p hugepunch-benches
//! --example profile -- PATTERN IMPLEMENTATION REPS`. It prints the number
//! of operations it ran (`ops N`), so that an instruction count divides.
//!
//! Implementation `hugepunch-batch` (the pattern is then ignored) punches
//! every subpage of 64 huge pages through `punch_many`, in batches of 256
//! scattered subpages of one huge page (a virtio-balloon request), in a
//! seeded random order: the batch call's cost per 4 KiB subpage.
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
    if imp == "hugepunch-batch" {
        let batches = balloon_batches(64, 256, SEED);
        let n: usize = batches.iter().map(Vec::len).sum();
        println!("ops {}", n * reps);
        let mut best = f64::MAX;
        for _ in 0..reps {
            let e = Engine::new(64);
            let t = std::time::Instant::now();
            for b in &batches {
                e.0.punch_many(b).unwrap();
            }
            best = best.min(t.elapsed().as_secs_f64() * 1e9 / n as f64);
            assert_eq!(e.0.stats().huge_frees, 64);
        }
        println!("batch {imp}: best {best:.1} ns/subpage");
        return;
    }
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
