//! The engine on the model with real threads: a vCPU faulting, writing and
//! reading while the VMM punches the same huge pages to completion, over
//! and over. The host checks that nothing is freed or zeroed while mapped
//! and that no access goes to freed memory (invariant 4), which holds only
//! if completions and faults follow the retry protocol.

mod common;

use common::watchdog::Watchdog;
use hugepunch::Attribute;
use hugepunch_model::{Kernel, ModelConfig, Options, StrategyKind};
use hugepunch_workload::Rng;
use std::sync::{Arc, Barrier, Mutex};

const K: u64 = 4096;

fn kernel(kind: StrategyKind, order: u8, pages: u64, budget: Option<u64>) -> Arc<Kernel> {
    let cfg = ModelConfig {
        size: pages * (K << order),
        order,
        populated: true,
        start: Attribute::Private,
        options: Options {
            budget,
            ..Options::default()
        },
    };
    Arc::new(Kernel::new(cfg, kind).unwrap().concurrent())
}

/// Per subpage: punches started and finished (a mutex, not atomics: the
/// test wants simple, obviously ordered bookkeeping).
struct Punches(Mutex<Vec<(u64, u64)>>);

impl Punches {
    fn get(&self, s: u64) -> (u64, u64) {
        self.0.lock().unwrap()[s as usize]
    }
}

/// Returns the completions that happened (the race needs some).
fn race(k: Arc<Kernel>, rounds: u64, seed: u64) -> u64 {
    let geo = k.geometry();
    let subs = geo.subpages();
    let punches = Punches(Mutex::new(vec![(0, 0); subs as usize]));
    let mut checked = 0;
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let b = &barrier;
        let (kp, pp) = (k.clone(), &punches);
        s.spawn(move || {
            b.wait();
            let mut rng = Rng::new(seed);
            for _ in 0..rounds {
                let mut order: Vec<u64> = (0..subs).collect();
                rng.shuffle(&mut order);
                for sub in order {
                    pp.0.lock().unwrap()[sub as usize].0 += 1;
                    kp.punch(sub * K, K).unwrap();
                    pp.0.lock().unwrap()[sub as usize].1 += 1;
                }
            }
        });
        let kv = k.clone();
        let checked = &mut checked;
        let pv = &punches;
        s.spawn(move || {
            b.wait();
            let mut rng = Rng::new(seed ^ 0xfeed);
            for _ in 0..rounds * subs / 16 {
                std::thread::yield_now();
                let sub = rng.below(subs);
                let (started, done) = pv.get(sub);
                let token = kv.guest_write(sub * K).unwrap();
                let got = kv.guest_read(sub * K).unwrap();
                let (started_after, _) = pv.get(sub);
                if started == done && started_after == started {
                    // No punch of this subpage overlapped the write and the
                    // read: the write must be there (invariant 4), whatever
                    // completions of the huge page raced with the fault.
                    assert_eq!(got, token, "write to subpage {sub} lost");
                    *checked += 1;
                } else {
                    // A punch of it came in between: our write, or zeros
                    // (invariant 5); never another write, never freed memory.
                    assert!(
                        got == token || got == 0,
                        "read {got:#x} after writing {token:#x}"
                    );
                }
            }
        });
    });
    assert!(checked > 0, "no write was checked strictly");
    let v = k.violations();
    assert!(v.is_empty(), "{v:?}");
    k.stats().huge_frees
}

#[test]
fn vcpu_races_completing_punches_engine() {
    let _watchdog = Watchdog::arm("vcpu_races_completing_punches_engine");
    let completions: u64 = (0..4)
        .map(|seed| race(kernel(StrategyKind::HugePunch, 3, 8, None), 300, seed))
        .sum();
    assert!(completions > 0, "no completion raced with the vCPU");
}

#[test]
fn vcpu_races_completing_punches_with_a_budget() {
    let _watchdog = Watchdog::arm("vcpu_races_completing_punches_with_a_budget");
    for seed in 0..4 {
        race(
            kernel(StrategyKind::HugePunch, 3, 2, Some(2 * K)),
            200,
            seed,
        );
    }
}

#[test]
fn vcpu_races_punches_on_every_baseline() {
    let _watchdog = Watchdog::arm("vcpu_races_punches_on_every_baseline");
    for kind in [
        StrategyKind::Eager,
        StrategyKind::ZeroOnly,
        StrategyKind::SinglePartial,
    ] {
        race(kernel(kind, 3, 8, None), 100, 1);
    }
}
