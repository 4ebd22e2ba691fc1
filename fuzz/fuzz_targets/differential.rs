//! The engine against its sequential reference model: the fuzzer's bytes
//! decode to a small file (orders 1 to 3, 1 to 6 huge pages, either
//! policy, budgets 0 included, populated or empty, private or shared) and
//! up to 96 steps (every operation and query, invalid ranges, failing
//! frees, policy changes, teardown and what follows it; see
//! `hugepunch_fuzz`'s encoding), which run on the engine with a recording
//! host and on `hugepunch::testing::Model`. After every step the result,
//! the host events, the whole statistics snapshot and every subpage's
//! state, residency and attribute must agree (`testing::run_case`, the
//! property tests' own comparison); the host panics on a double free.
#![no_main]

use hugepunch::testing::run_case;
use hugepunch_fuzz::decode_case;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (setup, ops) = decode_case(data);
    if let Err(mismatch) = run_case(&setup, &ops) {
        panic!("the engine differs from the model\n{setup:?}\n{ops:?}\n{mismatch}");
    }
});
