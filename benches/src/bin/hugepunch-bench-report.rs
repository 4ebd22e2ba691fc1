//! Side-by-side report: every pattern, every implementation, one process,
//! one table of throughputs with the ratios engine/baseline, and the
//! tracking memory per huge page, measured with a counting allocator.
//!
//! `cargo run --release -p hugepunch-benches --bin hugepunch-bench-report`
//! (add `-- --short` for the quick version CI runs, `--seed N` for other
//! random patterns: with one thread, pattern P is what `hugepunch gen P
//! --size S --seed N` writes for S = the huge pages per thread × 2 MiB).

use hugepunch_benches::*;
use hugepunch_workload::{Pattern, Target};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

/// Counts live heap bytes, so tracking memory is measured, not computed.
/// A failed allocation (null) counts nothing, and a failed `realloc` leaves
/// the old size counted, as the old block stays allocated.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

fn count(bytes: isize) {
    // ORDERING: Relaxed: a statistic read after the allocations it counts,
    // on the same thread.
    LIVE.fetch_add(bytes, Ordering::Relaxed);
}

// SAFETY: every method forwards its arguments unchanged to the system
// allocator and returns its answer unchanged, so `System`'s implementation
// of the `GlobalAlloc` contract is ours; the counting around it neither
// allocates nor panics (sizes fit `isize`: a `Layout`'s size is at most
// `isize::MAX`).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: our caller upholds `alloc`'s contract, which is `System`'s.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: our caller upholds `dealloc`'s contract: `p` came from this
        // allocator, that is from `System`, with layout `l`.
        unsafe { System.dealloc(p, l) };
        count(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: our caller upholds `realloc`'s contract (`p` from this
        // allocator, that is from `System`, with layout `l`; `new` a valid
        // size for `l`'s alignment), which is `System`'s.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            count(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    // ORDERING: Relaxed: read on the thread that did the allocations.
    LIVE.load(Ordering::Relaxed)
}

/// Median throughput (operations per second) of `reps` fresh runs.
fn throughput(
    imp: &str,
    work: &[Vec<hugepunch_workload::Op>],
    file_pages: u64,
    reps: usize,
) -> (f64, u64) {
    let ops: u64 = work.iter().map(|w| w.len() as u64).sum();
    let mut rates = Vec::with_capacity(reps);
    let mut completions = None;
    for _ in 0..reps {
        let t = make(imp, file_pages);
        let d = run(&*t, work);
        rates.push(ops as f64 / d.as_secs_f64());
        let c = t.completions();
        // The single-partial tracker's completions depend on how threads
        // interleave; every other implementation's must not.
        assert!(
            !same_contract(imp) || completions.is_none_or(|p| p == c),
            "{imp}: completions differ between runs"
        );
        completions = Some(c);
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (rates[reps / 2], completions.unwrap_or(0))
}

fn bytes_per_huge_page(order: u8, huge_pages: u64, touch_every: u64) -> f64 {
    use hugepunch::{Config, HugePunch};
    let before = live();
    let size = huge_pages << (12 + order);
    let file = HugePunch::new(
        Config::new(size).order(order),
        std::sync::Arc::new(NullHost),
    )
    .unwrap();
    let touched = (0..huge_pages).step_by(touch_every as usize).count() as f64;
    for h in (0..huge_pages).step_by(touch_every as usize) {
        file.punch(h << (12 + order), 4096).unwrap();
    }
    let bytes = (live() - before) as f64;
    drop(file);
    bytes / touched
}

fn map_bytes_per_huge_page(huge_pages: u64) -> f64 {
    let before = live();
    let map = MutexMap::default();
    for h in 0..huge_pages {
        let _ = map.punch(h << 21, 4096);
    }
    let bytes = (live() - before) as f64;
    drop(map);
    bytes / huge_pages as f64
}

/// Scaling of pure, independent arithmetic on 2 threads: what this machine
/// allows any implementation at best (1.0 when the two vCPUs do not really
/// run in parallel, 2.0 when they do).
fn machine_scaling(reps: usize) -> f64 {
    fn spin(n: u64) -> u64 {
        let mut x = std::hint::black_box(1u64);
        for i in 0..n {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        x
    }
    let n = 20_000_000;
    let mut best = 0.0f64;
    for _ in 0..reps.min(5) {
        let t = std::time::Instant::now();
        spin(n);
        let one = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        std::thread::scope(|s| {
            let a = s.spawn(|| spin(n));
            let b = s.spawn(|| spin(n));
            std::hint::black_box(a.join().unwrap() ^ b.join().unwrap());
        });
        best = best.max(2.0 * one / t.elapsed().as_secs_f64());
    }
    best
}

/// The instruction counts of the report: each implementation runs one
/// pattern once, one thread, in a child process of this binary under
/// callgrind, which counts only inside `hugepunch_benches::run` (or
/// `run_batches`); the count divided by the operations is the cost of one
/// operation, everything the implementation executes included (the null
/// host's callbacks for the engine). Instruction counts repeat exactly on
/// a noisy machine, where timings do not.
mod instructions {
    use hugepunch_benches::*;
    use std::process::Command;

    /// Huge pages per pattern for the counts (the cost per operation does
    /// not depend on it beyond the first touch of a chunk).
    pub const PAGES: u64 = 16;

    /// Is valgrind here?
    pub fn available() -> bool {
        Command::new("valgrind")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The child's side: run `imp` on `pattern` once (`batch`: the engine's
    /// batch call on the balloon batches). Returns the operations run.
    pub fn child(args: &[String]) {
        let (pat, imp) = (&args[0], &args[1]);
        if imp == "batch" {
            let batches = balloon_batches(PAGES, 256, SEED);
            let e = Engine::new(PAGES);
            run_batches(&e, &batches);
            return;
        }
        let pat: hugepunch_workload::Pattern = pat.parse().expect("a pattern");
        let work = workload(pat, PAGES, 1, Sharing::Disjoint, SEED);
        let t = make(imp, PAGES);
        run(&*t, &work);
    }

    /// Instructions per operation of `imp` on `pattern` (`None` if the
    /// child failed).
    pub fn per_op(pattern: &str, imp: &str) -> Option<f64> {
        let ops = if imp == "batch" {
            (PAGES * 512) as f64
        } else {
            let pat: hugepunch_workload::Pattern = pattern.parse().ok()?;
            workload(pat, PAGES, 1, Sharing::Disjoint, SEED)[0].len() as f64
        };
        let out = std::env::temp_dir().join(format!(
            "hugepunch-report-cg.{}.{pattern}.{imp}",
            std::process::id()
        ));
        let toggle = if imp == "batch" {
            "hugepunch_benches::run_batches"
        } else {
            "hugepunch_benches::run"
        };
        let status = Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(format!("--toggle-collect={toggle}"))
            .arg(std::env::current_exe().ok()?)
            .args(["--instructions-child", pattern, imp])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        let text = std::fs::read_to_string(&out).ok();
        let _ = std::fs::remove_file(&out);
        if !status.success() {
            return None;
        }
        let total: f64 = text?
            .lines()
            .find_map(|l| l.strip_prefix("summary:"))?
            .trim()
            .parse()
            .ok()?;
        Some(total / ops)
    }
}

fn print_instructions() {
    use hugepunch_workload::Pattern;
    if !instructions::available() {
        println!("instructions per operation: SKIPPED: valgrind is not installed here (callgrind counts them)");
        println!();
        return;
    }
    let imps: Vec<&str> = std::iter::once("hugepunch")
        .chain(std::iter::once("hugepunch-private"))
        .chain(IMPLEMENTATIONS.iter().copied().skip(1))
        .collect();
    let mut jobs: Vec<(String, String)> = Vec::new();
    for pat in PATTERNS {
        for imp in &imps {
            jobs.push((pat.name().to_string(), imp.to_string()));
        }
    }
    jobs.push(("balloon".into(), "batch".into()));
    // Two children at a time (valgrind runs one thread each).
    let results: Vec<Option<f64>> = {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let slots: Vec<std::sync::Mutex<Option<f64>>> =
            jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| loop {
                    // ORDERING: Relaxed: a work counter; the scope's join
                    // publishes the results.
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((p, imp)) = jobs.get(i) else { break };
                    *slots[i].lock().unwrap() = instructions::per_op(p, imp);
                });
            }
        });
        slots.into_iter().map(|m| m.into_inner().unwrap()).collect()
    };
    let get = |p: &str, imp: &str| {
        jobs.iter()
            .position(|(jp, ji)| jp == p && ji == imp)
            .and_then(|i| results[i])
    };
    println!(
        "instructions per operation (callgrind, 1 thread, {} huge pages; hugepunch-private: every subpage private, the immediate invalidation path):",
        instructions::PAGES
    );
    print!("{:<16}", "pattern");
    for imp in &imps {
        print!(" {:>14}", imp);
    }
    println!("  {:>9} {:>9}", "vs mutex", "vs dash");
    for pat in PATTERNS {
        print!("{:<16}", pat.name());
        for imp in &imps {
            match get(pat.name(), imp) {
                Some(v) => print!(" {v:>14.1}"),
                None => print!(" {:>14}", "-"),
            }
        }
        let ratio = |b: &str| match (get(pat.name(), "hugepunch"), get(pat.name(), b)) {
            (Some(e), Some(b)) => format!("{:>8.2}x", b / e),
            _ => format!("{:>9}", "-"),
        };
        println!("  {} {}", ratio("mutex-map"), ratio("dashmap"));
    }
    match get("balloon", "batch") {
        Some(v) => println!(
            "hugepunch punch_many, batches of 256 scattered 4 KiB subpages of one huge page: {v:.1} instructions per subpage"
        ),
        None => println!("hugepunch punch_many: the count failed"),
    }
    let _ = Pattern::Ascending;
    println!("locked read-modify-writes per deferred 4 KiB punch: hugepunch 3 (entry CAS, bitmap fetch_or, exit CAS; the global pending count once per 64 punches without a budget; counted by engine/tests/rmw_count.rs); by construction: mutex-map 2 (lock, unlock), rwlock-map 2, dashmap 2 (its shard's write lock and unlock), atomic-bitmap 1 + the full check, counter-only 1");
    println!();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--instructions-child") {
        instructions::child(&args[i + 1..]);
        return;
    }
    let short = args.iter().any(|a| a == "--short");
    let seed = args.iter().position(|a| a == "--seed").map_or(SEED, |i| {
        args.get(i + 1)
            .and_then(|s| s.parse().ok())
            .expect("--seed takes a number")
    });
    let (pages, reps) = if short { (8, 3) } else { (256, 11) };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut configs = vec![
        (1, Sharing::Disjoint),
        (2, Sharing::Disjoint),
        (2, Sharing::Same),
    ];
    if cores > 2 {
        configs.push((cores, Sharing::Disjoint));
        configs.push((cores, Sharing::Same));
    }
    println!("hugepunch side-by-side report: {pages} huge pages of 2 MiB per thread, median of {reps} runs, {cores} cores, pattern seed {seed}");
    let control = machine_scaling(reps);
    println!(
        "machine control: 2 threads of independent arithmetic run {control:.2}x as fast as 1 (best of 5): the ceiling for every 2-thread ratio below",
    );
    println!("throughput in million operations per second (a conversion-churn operation is one convert, punch or populate)");
    println!("atomic-bitmap (vm-memory style, one fetch_or(SeqCst) per page + the full check) and counter-only (one fetch_add per subpage, no bitmap: the floor) do not keep the contract; their completions are in the last column");
    println!();
    print!("{:<16} {:<13}", "pattern", "threads");
    for imp in IMPLEMENTATIONS {
        print!(" {imp:>14}");
    }
    println!(
        "  {:>9} {:>9} {:>9}  completions: single-partial, atomic-bitmap, counter-only of the engine's",
        "vs mutex", "vs rwlock", "vs dash"
    );
    let mut single_thread = std::collections::HashMap::new();
    for pat in PATTERNS {
        for &(threads, sharing) in &configs {
            let work = workload(pat, pages, threads, sharing, seed);
            let file_pages = file_huge_pages(pages, threads, sharing);
            let mut rates = Vec::new();
            let mut engine_completions = 0;
            let mut partial_completions = Vec::new();
            for imp in IMPLEMENTATIONS {
                let (rate, completions) = throughput(imp, &work, file_pages, reps);
                if *imp == "hugepunch" {
                    engine_completions = completions;
                } else if same_contract(imp) {
                    assert_eq!(
                        completions, engine_completions,
                        "{pat}/{threads}: {imp} did different work from the engine"
                    );
                } else {
                    partial_completions.push(completions.to_string());
                }
                rates.push(rate);
            }
            let label = format!(
                "{threads} {}",
                if sharing == Sharing::Same {
                    "same"
                } else {
                    "disjoint"
                }
            );
            print!("{:<16} {label:<13}", pat.name());
            for r in &rates {
                print!(" {:>14.2}", r / 1e6);
            }
            println!(
                "  {:>8.2}x {:>8.2}x {:>8.2}x  {} of {engine_completions}",
                rates[0] / rates[1],
                rates[0] / rates[2],
                rates[0] / rates[3],
                partial_completions.join(", ")
            );
            if threads == 1 {
                single_thread.insert(pat, rates[0]);
            } else if threads == 2 && sharing == Sharing::Disjoint {
                println!(
                    "{:<30} hugepunch 2 threads disjoint / 1 thread: {:.2}x (machine control {control:.2}x; target 1.8x when the control is 1.9x or more)",
                    "",
                    rates[0] / single_thread[&pat]
                );
            }
        }
    }
    println!();
    println!("hot path, 1 thread (ns per operation, median): ");
    for pat in [Pattern::Ascending, Pattern::ConversionChurn] {
        let work = workload(pat, pages, 1, Sharing::Disjoint, seed);
        let (rate, _) = throughput("hugepunch", &work, pages, reps);
        println!("  {:<16} {:>6.1} ns", pat.name(), 1e9 / rate);
    }
    let floor = (0..reps)
        .map(|_| protocol_floor(1 << 20).as_secs_f64() * 1e9 / (1u64 << 20) as f64)
        .fold(f64::MAX, f64::min);
    println!("  the punch protocol's 3 read-modify-writes alone: {floor:>6.1} ns");
    println!();
    print_instructions();
    println!("tracking memory, measured with a counting allocator (bytes per huge page):");
    println!(
        "  hugepunch dense index, 2 MiB huge pages, every one touched : {:>9.1}",
        bytes_per_huge_page(9, 4096, 1)
    );
    println!(
        "  hugepunch dense index, 1 GiB huge pages, every one touched : {:>9.1}",
        bytes_per_huge_page(18, 16, 1)
    );
    println!(
        "  hugepunch lazy index, 2 MiB, 1 in 1024 touched (1 TiB file): {:>9.1}",
        bytes_per_huge_page(9, 1 << 19, 1024)
    );
    println!(
        "  mutex-map HashMap<u64, BitVec>, 2 MiB, every one pending  : {:>9.1}",
        map_bytes_per_huge_page(4096)
    );
}
