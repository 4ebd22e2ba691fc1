#!/usr/bin/env bash
# Fuzzing: cargo-fuzz (libFuzzer, built with
# AddressSanitizer) on each target for a bounded time, from its seeds.
#
#   ci/fuzz.sh                    what CI runs: every target for
#                                 FUZZ_SECONDS (default 30) each
#   ci/fuzz.sh TARGET [SECONDS]   one target (trace_parse, differential,
#                                 replay)
#
# The targets (fuzz/fuzz_targets/, their own workspace: fuzz/Cargo.toml):
#   trace_parse   the trace parser: no panic, memory proportional to the
#                 input, every accepted trace survives write-then-parse
#   differential  the engine against the sequential reference model
#                 (hugepunch::testing), compared after every step
#   replay        the tool's replay (hugepunch_cli::replay_bytes) on
#                 arbitrary bytes: no panic, one-line errors, no violation
# Seeds: fuzz/seeds/TARGET (committed; fuzz/make-seeds.sh writes them).
# What a run finds goes to fuzz/corpus/TARGET (the first corpus dir, not
# committed); a crash to fuzz/artifacts/TARGET/, and this script fails.
# For a long run, see docs/RELIABILITY.md.
#
# Needs the nightly toolchain (cargo-fuzz's sanitizer flags are unstable);
# where there is none, prints why and exits 0. Installs cargo-fuzz from
# crates.io when `cargo fuzz` is missing (about 30-100 s here).
#
# Measured on this 2-core machine, 2026-11-30, while other builds ran
# (load average 8 to 12): wall time (CPU time user+sys)
#   install cargo-fuzz 0.13.2 ............................ 99 s (63 s)
#   build of the three targets, cold (shared deps) ....... 285 s
#   runs, 3 x 30 s ........................................ about 95 s
#   whole script, cold (cargo-fuzz installed) ............ 389 s (196 s)
#   whole script, warm ................................... 100-129 s (58-78 s)
#   executions per second (one core, shared): trace_parse 20,000-38,000,
#   differential 530-760, replay 1,800-4,300
set -euo pipefail
cd "$(dirname "$0")/.."

all_targets="trace_parse differential replay"
seconds="${FUZZ_SECONDS:-30}"
case "${1:-}" in
  "") targets="$all_targets" ;;
  trace_parse | differential | replay) targets="$1"; seconds="${2:-$seconds}" ;;
  *) echo "usage: ci/fuzz.sh [TARGET [SECONDS]]; targets: $all_targets" >&2; exit 2 ;;
esac

step() { printf '\n--- fuzz: %s\n' "$*"; }
start=$SECONDS

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: SKIPPED: no nightly toolchain (\`cargo +nightly\` fails); cargo-fuzz needs one"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  step "installing cargo-fuzz (crates.io)"
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version

# Per target: libFuzzer's limits. -timeout: the tool promises any input
# done within 10 s; -rss_limit_mb/-malloc_limit_mb: a run (or one
# allocation) beyond them is a crash ("never allocates without bound").
options() {
  case "$1" in
    trace_parse) echo "-max_len=4096 -rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=10" ;;
    differential) echo "-max_len=290 -rss_limit_mb=1024 -timeout=10" ;;
    replay) echo "-max_len=4096 -rss_limit_mb=2048 -timeout=10" ;;
  esac
}

cd fuzz
for t in $targets; do
  step "$t: build"
  cargo +nightly fuzz build "$t"
done
for t in $targets; do
  step "$t: $seconds s"
  mkdir -p "corpus/$t"
  log=$(mktemp)
  # shellcheck disable=SC2046 # the options are words
  if ! cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 $(options "$t") >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $t FAILED: the input is in fuzz/artifacts/$t/ (reproduce: cd fuzz && cargo +nightly fuzz run $t ARTIFACT)" >&2
    rm -f "$log"
    exit 1
  fi
  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$log" || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
  rm -f "$log"
done

step "done in $((SECONDS - start)) s"
