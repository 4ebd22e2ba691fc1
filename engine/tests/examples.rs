//! The worked examples of CONTRACT.md (copied from ../shared/examples) replay
//! through the engine to exactly their figures.

mod common;

use hugepunch_workload::Trace;
use std::path::Path;

#[test]
fn worked_examples_give_their_figures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let Some(stem) = name.strip_suffix(".expected.json") else {
            continue;
        };
        let trace =
            Trace::parse(&std::fs::read_to_string(dir.join(format!("{stem}.trace"))).unwrap())
                .unwrap();
        let expected: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (key, want) in expected {
            let (budget, policy) = common::flags(&key);
            let (engine, _host, _) = common::replay(&trace, budget, policy);
            let got = serde_json::to_value(engine.stats()).unwrap();
            for (stat, value) in want.as_object().unwrap() {
                assert_eq!(got.get(stat), Some(value), "{stem} [{key}]: {stat}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} example runs found");
}

/// The seed's example gives exactly three invalidations, each the part of
/// the range inside one huge page, with that huge page's hint (CONTRACT.md §3).
#[test]
fn seed_example_invalidations_are_split_per_huge_page() {
    use common::Event::*;
    use hugepunch::{ByteRange, Hint};
    let trace = Trace::parse("size 8M\nstart private\npunch 0x1000 0x401000\n").unwrap();
    let (_, host, _) = common::replay(&trace, None, hugepunch::Policy::Reject);
    let inval: Vec<_> = host
        .events()
        .into_iter()
        .filter(|e| matches!(e, InvalidateBegin(..)))
        .collect();
    let h = |i| Hint {
        huge_page: i,
        order: 9,
    };
    assert_eq!(
        inval,
        vec![
            InvalidateBegin(ByteRange::new(0x1000, 0x1ff000), h(0)),
            InvalidateBegin(ByteRange::new(0x200000, 0x200000), h(1)),
            InvalidateBegin(ByteRange::new(0x400000, 0x2000), h(2)),
        ]
    );
}
