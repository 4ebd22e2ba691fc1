//! `hugepunch real` without the CLI:
//!
//! ```sh
//! cargo run --release -p hugepunch-linux --example real -- \
//!     [--backend memfd|guest-memfd] [--size 1G] [--pattern P|all] [--json]
//! ```

use hugepunch_linux::pattern::PATTERNS;
use hugepunch_linux::real::run;
use hugepunch_linux::Backend;

fn size(s: &str) -> u64 {
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("a size like 1G or 64M") * mul
}

fn main() {
    let mut backend = Backend::default_here();
    let mut bytes = 1u64 << 30;
    let mut pattern = "ascending".to_string();
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backend" => {
                backend = args
                    .next()
                    .expect("a backend")
                    .parse()
                    .expect("memfd or guest-memfd")
            }
            "--size" => bytes = size(&args.next().expect("a size")),
            "--pattern" => pattern = args.next().expect("a pattern"),
            "--json" => json = true,
            other => panic!("unknown argument {other}"),
        }
    }
    let patterns: Vec<&str> = if pattern == "all" {
        PATTERNS.to_vec()
    } else {
        vec![pattern.as_str()]
    };
    for p in patterns {
        match run(backend, bytes, p) {
            Ok(r) if json => println!("{}", serde_json::to_string(&r).expect("serialise")),
            Ok(r) => println!("{}", r.table()),
            Err(e) => {
                eprintln!("hugepunch real: {e}");
                std::process::exit(1);
            }
        }
    }
}
