#!/usr/bin/env bash
# The engine under the sanitizers, with the exact flags.
#
#   ci/sanitizers.sh          what CI runs: asan, then tsan
#   ci/sanitizers.sh asan     the engine's tests (unit, integration, the
#                             property tests at a reduced case count and
#                             the multi-threaded stress tests) under
#                             AddressSanitizer (and LeakSanitizer)
#   ci/sanitizers.sh tsan     the multi-threaded stress and soundness
#                             tests under ThreadSanitizer
#
# Needs the nightly toolchain and its sanitizer runtimes (`-Zsanitizer` is
# unstable); where there is none, prints why and exits 0. The std that
# rustup ships is not built with the sanitizers and there is no rust-src
# here for -Zbuild-std, hence `-Cunsafe-allow-abi-mismatch=sanitizer`
# (else "mixing -Zsanitizer will cause an ABI mismatch"), and for TSan
# ci/tsan.supp, which suppresses, by name, the reports TSan makes about
# std's own uninstrumented synchronisation (each entry says why).
# Each sanitizer builds in its own target dir (target-asan, target-tsan):
# changing RUSTFLAGS rebuilds everything.
#
# PROPTEST_CASES (default 100 here; 8 for the 1 GiB-page property, whose
# cases each touch 2^18-subpage bitmaps) replaces the property tests'
# case counts (1200, 200, 32 in a normal run).
#
# Measured on this 2-core machine, 2026-11-30, while other builds ran
# (load average about 11): wall time (CPU time user+sys)
#   asan: build ........................................ 70 s
#         tests (the property tests 13 s, stress 6.5 s) . about 25 s
#         the 1 GiB-page property at 8 cases ........... 9 s
#   tsan: build ........................................ 50 s
#         stress tests ................................. 35 s
#   whole script, cold ................................. 188 s (131 s)
#   whole script, warm ................................. 100 s (52 s)
#   warm, TSan also on the soundness tests (load 18) ... 115 s (65 s)
# The TSan report that the suppressions hide: 4 to 11 per run.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64-unknown-linux-gnu
which="${1:-all}"
case "$which" in
  all | asan | tsan) ;;
  *) echo "usage: ci/sanitizers.sh [asan|tsan]" >&2; exit 2 ;;
esac

step() { printf '\n--- sanitizers: %s\n' "$*"; }
start=$SECONDS

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "sanitizers: SKIPPED: no nightly toolchain (\`cargo +nightly\` fails); -Zsanitizer needs one"
  exit 0
fi
rt="$(rustc +nightly --print sysroot)/lib/rustlib/$target/lib"
for s in asan tsan; do
  if [ ! -e "$rt/librustc-nightly_rt.$s.a" ]; then
    echo "sanitizers: SKIPPED: the nightly toolchain has no $s runtime for $target ($rt)"
    exit 0
  fi
done
cargo +nightly --version

flags="-Cunsafe-allow-abi-mismatch=sanitizer"
# The tests' watchdog (hugepunch::testing::watchdog) aborts a test after
# 120 s; instrumented runs are 5-15 times slower (a TSan stress test takes
# 10-40 s here, under load), so give them 600 s.
export HUGEPUNCH_WATCHDOG_SECS="${HUGEPUNCH_WATCHDOG_SECS:-600}"
cases="${PROPTEST_CASES:-100}"

if [ "$which" != tsan ]; then
  step "asan: the engine's tests (PROPTEST_CASES=$cases), the 1 GiB-page property apart"
  PROPTEST_CASES="$cases" RUSTFLAGS="-Zsanitizer=address $flags" \
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" \
    cargo +nightly test -p hugepunch --tests --target "$target" --target-dir target-asan \
    -- --skip order_18_matches_the_model

  step "asan: the 1 GiB-page property (PROPTEST_CASES=8)"
  PROPTEST_CASES=8 RUSTFLAGS="-Zsanitizer=address $flags" \
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}" \
    cargo +nightly test -p hugepunch --test reference_model --target "$target" \
    --target-dir target-asan -- order_18_matches_the_model
fi

if [ "$which" != asan ]; then
  step "tsan: the stress tests and the soundness tests (the lock-free statistics list, panics under races)"
  # A report makes the test binary exit 66 after its tests (TSan's
  # default exitcode), which fails this step.
  RUSTFLAGS="-Zsanitizer=thread $flags" \
    TSAN_OPTIONS="suppressions=$PWD/ci/tsan.supp print_suppressions=1 ${TSAN_OPTIONS:-}" \
    cargo +nightly test -p hugepunch --test stress --test soundness --target "$target" \
    --target-dir target-tsan
fi

step "done in $((SECONDS - start)) s"
