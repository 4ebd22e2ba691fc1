//! `hugepunch_cli::replay_bytes`, as a fuzz target calls it: any bytes give
//! a report or an error, never a panic, and within the limits.

use hugepunch_cli::replay::{self, Limits, ReplayError, ReplayOptions};
use hugepunch_model::StrategyKind;
use hugepunch_workload::{Op, Trace};
use std::time::{Duration, Instant};

/// SplitMix64: a seed gives the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len() as u64) as usize]
    }
}

fn fuzz_opts(strategies: Vec<StrategyKind>, budget: Option<u64>) -> ReplayOptions {
    ReplayOptions {
        strategies,
        budget,
        policy: None,
        limits: Limits::for_fuzzing(),
    }
}

/// A number as a trace may spell it, sometimes badly.
fn number(r: &mut Rng, size: u64) -> String {
    let v = match r.below(6) {
        0 => r.below(size / 4096 + 2) * 4096,
        1 => r.below(size + 8192),
        2 => size,
        3 => u64::MAX - r.below(8192),
        4 => (r.below(4) + 1) << 21,
        _ => r.below(64) * 4096,
    };
    match r.below(1000) {
        0 => format!("+{v}"),
        1 => format!("0x+{v:x}"),
        2 => format!("{v}\u{a0}"),
        3..=200 => format!("{}K", v >> 10),
        201..=300 => format!("{:#X}", v),
        301..=400 => format!("{}M", v >> 20),
        401..=700 => v.to_string(),
        _ => format!("{v:#x}"),
    }
}

/// A trace-like text: headers and operations, mostly well formed.
fn trace_text(r: &mut Rng) -> Vec<u8> {
    let order = [1, 3, 9, 9, 9, 18][r.below(6) as usize];
    let size = match r.below(20) {
        0..=2 => 1u64 << 50,
        3..=9 => (r.below(64) + 1) << (12 + order),
        10..=12 => 1 << 40,
        13 => 3 << 20,
        _ => 8 << 21 << order.min(9),
    };
    let mut t = String::new();
    if r.below(8) != 0 {
        t += &format!("size {size:#x}\norder {order}\n");
    }
    if r.below(3) == 0 {
        t += r.pick(&[
            "start empty\n",
            "start shared\n",
            "start populated\n",
            "start private\n",
        ]);
    }
    for _ in 0..r.below(40) {
        let op = if r.below(1000) == 0 {
            r.pick(&["size", "bogus"])
        } else {
            r.pick(&[
                "punch", "punch", "punch", "populate", "flush", "convert", "teardown",
            ])
        };
        match op {
            "teardown" => t += "teardown\n",
            "convert" => {
                t += &format!(
                    "convert {} {} {}\n",
                    number(r, size),
                    number(r, size),
                    if r.below(50) == 0 {
                        "public"
                    } else {
                        r.pick(&["private", "shared"])
                    }
                )
            }
            _ => t += &format!("{op} {} {}\n", number(r, size), number(r, size)),
        }
        if r.below(20) == 0 {
            t += r.pick(&["# comment\n", "\n", "\r\n", "\t\n"]);
        }
        if r.below(1000) == 0 {
            t += "punch\n";
        }
    }
    let mut bytes = t.into_bytes();
    // Now and then, damage it.
    for _ in 0..r.below(8).saturating_sub(5) {
        if !bytes.is_empty() {
            let i = r.below(bytes.len() as u64) as usize;
            bytes[i] = r.next() as u8;
        }
    }
    bytes
}

#[test]
fn replay_bytes_never_panics_and_stays_within_its_limits() {
    let mut r = Rng(0x5eed);
    let start = Instant::now();
    let (mut ok, mut refused) = (0, 0);
    for i in 0..1500 {
        let input: Vec<u8> = if i % 4 == 0 {
            (0..r.below(300)).map(|_| r.next() as u8).collect()
        } else {
            trace_text(&mut r)
        };
        let (strategies, budget) = match r.below(4) {
            0 => (StrategyKind::ALL.to_vec(), None),
            1 => (vec![StrategyKind::HugePunch], Some(r.below(4) << 20)),
            2 => (vec![StrategyKind::Eager], None),
            _ => (vec![StrategyKind::HugePunch], None),
        };
        let t = Instant::now();
        match replay::replay_bytes(&input, &fuzz_opts(strategies, budget)) {
            Ok(report) => {
                ok += 1;
                for o in &report.outcomes {
                    assert_eq!(o.kernel.figures().violations, 0, "{input:?}");
                }
            }
            Err(e) => {
                refused += 1;
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "one line: {msg:?}");
            }
        }
        // A debug build is slower than the release build the limits are
        // for; this only catches a replay that the estimate let through
        // and that runs away.
        assert!(t.elapsed() < Duration::from_secs(2), "{input:?}");
    }
    assert!(ok > 200 && refused > 200, "ok {ok}, refused {refused}");
    eprintln!("{ok} replayed, {refused} refused in {:?}", start.elapsed());
}

#[test]
fn errors_name_the_line_and_the_problem() {
    let opts = ReplayOptions::default();
    let err = |text: &[u8]| replay::replay_bytes(text, &opts).err().unwrap().to_string();
    assert_eq!(
        err(b"size 4M\npunch +4K 4K\n"),
        "line 2: bad number \"+4K\": '+' is not a decimal digit"
    );
    assert!(err(&vec![b'#'; 5000]).starts_with("line 1: longer than 4096 bytes"));
    let e = err(b"size 0x4000000000000\nteardown\n");
    assert!(
        e.starts_with("line 2: replaying this trace would take about"),
        "{e}"
    );
    let e = err(b"size 0x8000000000000\n");
    assert_eq!(
        e,
        "line 1: a 2 PiB file is larger than this tool replays (1 PiB at most)"
    );
    let limits = Limits {
        max_trace_bytes: 100,
        ..Limits::default()
    };
    let e = replay::read_trace(&b"# 0123456789\n".repeat(20)[..], &limits)
        .err()
        .unwrap();
    assert!(matches!(e, ReplayError::TooLong { line: 8, .. }), "{e}");
    let opts = ReplayOptions {
        strategies: vec![StrategyKind::Eager],
        budget: Some(0),
        ..ReplayOptions::default()
    };
    let e = replay::replay_bytes(b"punch 0 4K\n", &opts).err().unwrap();
    assert!(
        e.to_string().contains("only to the hugepunch strategy"),
        "{e}"
    );
}

/// The estimate is an upper bound of what the model and the engine hold
/// (their own accounts of it), whatever the shape of the trace.
#[test]
fn the_memory_estimate_bounds_what_the_model_holds() {
    let shapes = [
        "size 1G\nstart empty\npopulate 0 1G\n",
        "size 64G\npunch 0 64G\n",
        "size 4G\norder 18\npunch 4K 1G\nflush 0 4G\npopulate 0 4G\n",
        "size 0x4000000000000\nstart empty\npopulate 0 4K\npopulate 0x20000000 4K\npopulate 0x3fffffffff000 4K\n",
        "size 1G\nconvert 0 4K shared\nconvert 8K 4K shared\nconvert 16K 4K shared\npunch 0 1G\n",
    ];
    for text in shapes {
        let mut t = String::from(text);
        // And every subpage of a huge page punched in part, one by one.
        for s in 1..512u64 {
            t += &format!("punch {:#x} 4K\n", (1 << 21) + s * 4096);
        }
        let report = replay::replay_bytes(
            t.as_bytes(),
            &ReplayOptions {
                strategies: StrategyKind::ALL.to_vec(),
                ..ReplayOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("{text}: {e}"));
        let held: u64 = report
            .outcomes
            .iter()
            .map(|o| {
                let f = o.kernel.figures();
                (f.model_bytes + f.tracking_bytes) as u64
            })
            .sum();
        assert!(
            report.estimate.bytes >= held,
            "{text}: estimate {} < {held}",
            report.estimate.bytes
        );
        assert!(report.estimate.seconds > 0.0);
    }
}

#[test]
fn the_costliest_line_is_named() {
    let t = Trace::parse("size 1024G\npunch 0 4K\npunch 0 1024G\npunch 8K 4K\n").unwrap();
    let e = hugepunch_cli::cost::estimate(&t, &[StrategyKind::HugePunch], false);
    let c = e.costliest.unwrap();
    assert_eq!(c.line, 3);
    assert_eq!(c.what, "punch of 524,288 huge pages");
    // Four strategies cost four times what one does, and more than one.
    let all = hugepunch_cli::cost::estimate(&t, &StrategyKind::ALL, false);
    assert!(
        all.seconds > 3.9 * e.seconds,
        "{} vs {}",
        all.seconds,
        e.seconds
    );
    // The estimate grows with what a trace touches, not with the file.
    let small = Trace::parse("size 1024G\npunch 0 4K\n").unwrap();
    let e = hugepunch_cli::cost::estimate(&small, &[StrategyKind::HugePunch], false);
    assert!(e.seconds < 1e-3 && e.bytes < 32 << 20, "{e:?}");
    // A trace written back reads the same.
    let again = Trace::parse(&t.to_text()).unwrap();
    let ops = |t: &Trace| t.ops.iter().map(|&(_, op)| op).collect::<Vec<Op>>();
    assert_eq!(ops(&again), ops(&t));
}
