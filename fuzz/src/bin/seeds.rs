//! `seeds OUT_DIR TRACE...`: write each trace that fits the differential
//! encoding (orders 1 to 3, at most 6 huge pages, valid subpage ranges) as
//! a differential seed, under a few budgets and both policies. See
//! `fuzz/make-seeds.sh`.

use hugepunch::{Policy, SUBPAGE_SIZE};
use hugepunch_fuzz::case_of_trace;
use hugepunch_workload::Trace;
use std::path::Path;

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args.next().expect("usage: seeds OUT_DIR TRACE...");
    std::fs::create_dir_all(&out).expect("create the output directory");
    let mut written = 0;
    for path in args {
        let text = std::fs::read_to_string(&path).expect("read a trace");
        let trace = Trace::parse(&text).expect("a valid trace");
        let stem = Path::new(&path)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let variants = [
            ("defaults", None, Policy::Reject),
            ("budget-0", Some(0), Policy::Reject),
            (
                "budget-3-cancel",
                Some(3 * SUBPAGE_SIZE),
                Policy::CancelAndZero,
            ),
        ];
        for (name, budget, policy) in variants {
            match case_of_trace(&trace, budget, policy) {
                Some(bytes) => {
                    std::fs::write(Path::new(&out).join(format!("{stem}.{name}.bin")), bytes)
                        .expect("write a seed");
                    written += 1;
                }
                None => eprintln!("{path}: does not fit the differential encoding, skipped"),
            }
        }
    }
    println!("{written} differential seeds in {out}");
}
