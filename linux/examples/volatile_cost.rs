//! What the volatile guest-memory accesses of `sys::Mapping` cost, beside
//! the plain `ptr::write_bytes` / `ptr::copy_nonoverlapping` they replaced:
//!
//! ```sh
//! cargo run --release -p hugepunch-linux --example volatile_cost -- [--size 1G] [--rounds 5]
//! ```
//!
//! One memfd of `--size` bytes, fully allocated and faulted in through the
//! mapping before any clock starts (so no run pays page faults), then, each
//! `--rounds` times (the median is printed): a fill of the whole mapping in
//! one call, a fill as 4 KiB calls (the engine zeroes subpage by subpage),
//! and a read of the whole mapping into a buffer — each volatile (the
//! crate's code) and plain (the baseline, written here).

use hugepunch::ByteRange;
use hugepunch_linux::sys::{self, Mapping};
use std::time::{Duration, Instant};

fn size(s: &str) -> u64 {
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("a size like 1G or 64M") * mul
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut bytes = 1u64 << 30;
    let mut rounds = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => bytes = size(&args.next().expect("--size N")),
            "--rounds" => rounds = args.next().expect("--rounds N").parse().expect("a count"),
            other => panic!("unknown argument {other}"),
        }
    }
    let fd = sys::memfd("volatile-cost", bytes, false).expect("memfd_create");
    sys::allocate(&fd, 0, bytes).expect("fallocate");
    // SAFETY: our own memfd of `bytes` bytes, never truncated.
    let map = unsafe { Mapping::new(&fd, bytes as usize) }.expect("mmap");
    map.touch(ByteRange::new(0, bytes));
    let base = map.addr() as *mut u8;
    let len = bytes as usize;
    let mut buf = vec![0u8; len];
    let page = 4096usize;

    let time = |f: &mut dyn FnMut()| {
        f(); // warm up: every page mapped writable
        median(
            (0..rounds)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .collect(),
        )
    };
    let mut rows: Vec<(&str, Duration, Duration)> = Vec::new();
    let whole = ByteRange::new(0, bytes);
    rows.push((
        "fill, one call",
        time(&mut || map.fill(whole, 0xa5)),
        // SAFETY: `base .. base + len` is the live mapping `map`, which no
        // reference points into; this is the plain baseline being measured.
        time(&mut || unsafe { std::ptr::write_bytes(base, 0xa5, len) }),
    ));
    rows.push((
        "zero, 4 KiB calls",
        time(&mut || {
            for off in (0..bytes).step_by(page) {
                map.zero(ByteRange::new(off, page as u64));
            }
        }),
        time(&mut || {
            for off in (0..len).step_by(page) {
                // SAFETY: as above, one 4 KiB page of it.
                unsafe { std::ptr::write_bytes(base.add(off), 0, page) }
            }
        }),
    ));
    let volatile_read = time(&mut || map.read(0, &mut buf));
    // SAFETY: as above; `buf` is a distinct Rust allocation of `len` bytes.
    let plain_read =
        time(&mut || unsafe { std::ptr::copy_nonoverlapping(base, buf.as_mut_ptr(), len) });
    rows.push(("read into a buffer", volatile_read, plain_read));
    std::hint::black_box(&buf);

    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "{} KiB memfd, median of {rounds} rounds, milliseconds (and GiB/s)",
        bytes >> 10
    );
    println!(
        "{:<20} {:>18} {:>18} {:>7}",
        "", "volatile", "plain", "ratio"
    );
    for (what, v, p) in rows {
        println!(
            "{what:<20} {:>9.3} ({:>5.1}) {:>9.3} ({:>5.1}) {:>6.2}x",
            v.as_secs_f64() * 1e3,
            gib / v.as_secs_f64(),
            p.as_secs_f64() * 1e3,
            gib / p.as_secs_f64(),
            v.as_secs_f64() / p.as_secs_f64()
        );
    }
}
