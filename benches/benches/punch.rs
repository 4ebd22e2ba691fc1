//! Criterion benchmarks: every adversarial pattern, every implementation,
//! side by side in one group per (pattern, threads, sharing), throughput in
//! operations per second; plus the hot-path cost of punch, convert and
//! populate on the engine. Each group first checks that the engine and the
//! three map baselines report the same completions, so no group compares
//! different work.
//!
//! `cargo bench -p hugepunch-benches --bench punch`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hugepunch::Attribute;
use hugepunch_benches::*;
use std::time::{Duration, Instant};

const PAGES: u64 = 64;

fn patterns(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut configs = vec![
        (1, Sharing::Disjoint),
        (2, Sharing::Disjoint),
        (2, Sharing::Same),
    ];
    if cores > 2 {
        configs.extend([(cores, Sharing::Disjoint), (cores, Sharing::Same)]);
    }
    for pat in PATTERNS {
        for &(threads, sharing) in &configs {
            let work = workload(pat, PAGES, threads, sharing, SEED);
            let pages = file_huge_pages(PAGES, threads, sharing);
            // Same work: the engine and the map baselines agree on completions.
            let expect = {
                let t = make("hugepunch", pages);
                run(&*t, &work);
                t.completions()
            };
            for imp in IMPLEMENTATIONS.iter().filter(|i| same_contract(i)) {
                let t = make(imp, pages);
                run(&*t, &work);
                assert_eq!(t.completions(), expect, "{pat}: {imp} did different work");
            }
            let ops: u64 = work.iter().map(|w| w.len() as u64).sum();
            let name = format!(
                "{pat}/{threads}-{}",
                if sharing == Sharing::Same {
                    "same"
                } else {
                    "disjoint"
                }
            );
            let mut g = c.benchmark_group(name);
            g.throughput(Throughput::Elements(ops));
            g.sample_size(20)
                .measurement_time(Duration::from_secs(2))
                .warm_up_time(Duration::from_millis(300));
            for imp in IMPLEMENTATIONS {
                g.bench_function(BenchmarkId::from_parameter(imp), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let t = make(imp, pages);
                            total += run(&*t, &work);
                        }
                        total
                    })
                });
            }
            g.finish();
        }
    }
}

/// The engine's hot path, one operation at a time.
fn hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot-path");
    g.throughput(Throughput::Elements(1));
    // A deferred 4 KiB punch (never completing: subpage 511 is left).
    g.bench_function("punch-4k-deferred", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let e = Engine::new(PAGES);
                let n = (iters - done).min(PAGES * 511);
                let start = Instant::now();
                for i in 0..n {
                    let (h, s) = (i / 511, i % 511);
                    e.0.punch((h * 512 + s) * SUB, SUB).unwrap();
                }
                total += start.elapsed();
                done += n;
            }
            total
        })
    });
    // The floor: the punch protocol's four read-modify-writes alone.
    g.bench_function("protocol-floor-4-rmw", |b| b.iter_custom(protocol_floor));
    // A conversion to private over nothing pending (the check passes).
    g.bench_function("convert-private-4k", |b| {
        let e = Engine::new(PAGES);
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 1) % (PAGES * 512);
            e.0.convert(i * SUB, SUB, Attribute::Private).unwrap();
        })
    });
    // A populate that un-punches one subpage (after a punch, untimed cost
    // included: the pair is what a guest's discard-then-reuse costs).
    g.bench_function("punch-then-populate-4k", |b| {
        let e = Engine::new(PAGES);
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 1) % (PAGES * 512);
            e.0.punch(i * SUB, SUB).unwrap();
            e.0.populate(i * SUB, SUB).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, patterns, hot_path);
criterion_main!(benches);
