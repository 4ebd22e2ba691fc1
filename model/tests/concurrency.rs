//! The engine on the model with real threads: a vCPU faulting, writing and
//! reading while the VMM punches the same huge pages to completion, over
//! and over. The host checks that nothing is freed or zeroed while mapped
//! and that no access goes to freed memory (invariant 4), which holds only
//! if completions and faults follow the retry protocol.

use hugepunch::Attribute;
use hugepunch_model::workload::Rng;
use hugepunch_model::{Kernel, ModelConfig, Options, StrategyKind};
use std::sync::Arc;

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

fn race(k: Arc<Kernel>, rounds: u64, seed: u64) {
    let geo = k.geometry();
    let subs = geo.subpages();
    std::thread::scope(|s| {
        let kp = k.clone();
        s.spawn(move || {
            let mut rng = Rng::new(seed);
            for _ in 0..rounds {
                let mut order: Vec<u64> = (0..subs).collect();
                rng.shuffle(&mut order);
                for sub in order {
                    kp.punch(sub * K, K).unwrap();
                }
            }
        });
        let kv = k.clone();
        s.spawn(move || {
            let mut rng = Rng::new(seed ^ 0xfeed);
            for _ in 0..rounds * subs {
                let off = rng.below(subs) * K;
                let token = kv.guest_write(off).unwrap();
                let got = kv.guest_read(off).unwrap();
                // Either our write, or zeros if a punch came in between;
                // never another write's token or freed memory.
                assert!(
                    got == token || got == 0,
                    "read {got:#x} after writing {token:#x}"
                );
            }
        });
    });
    let v = k.violations();
    assert!(v.is_empty(), "{v:?}");
}

#[test]
fn vcpu_races_completing_punches_engine() {
    for seed in 0..4 {
        race(kernel(StrategyKind::HugePunch, 3, 2, None), 200, seed);
    }
}

#[test]
fn vcpu_races_completing_punches_with_a_budget() {
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
    for kind in [
        StrategyKind::Eager,
        StrategyKind::ZeroOnly,
        StrategyKind::SinglePartial,
    ] {
        race(kernel(kind, 3, 2, None), 100, 1);
    }
}
