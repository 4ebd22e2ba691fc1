#!/usr/bin/env bash
# Loom model checking of the engine, with the exact flags.
#
#   ci/loom.sh          what CI runs: every model except the three-thread
#                       ones, then the four planted bugs (each must be
#                       caught by loom, or this script fails)
#   ci/loom.sh --full   the same, plus the three-thread models (at
#                       LOOM_FULL_PREEMPTIONS, default 1)
#
# The engine is built with `--cfg hugepunch_loom` (its `sync` module is then
# loom's), in its own target dir: changing RUSTFLAGS rebuilds everything.
# LOOM_MAX_PREEMPTIONS bounds the preemptions per execution (default 2; see
# docs/RELIABILITY.md for what that bound leaves out).
#
# Measured on this 2-core machine (shared with other builds), 2026-11-25:
#   cold build, one per target dir (x4) ................... 45-77 s each
#   models, LOOM_MAX_PREEMPTIONS=2 ......................... about 30 s
#   each planted bug caught in ............................. 0.2-1.5 s
#   whole script, cold ..................................... 222 s
#   --full, warm ........................................... 626 s; its
#     three-thread models at bound 1: three overlapping punches 20 s,
#     failed completion with flush in its own thread 296 s, teardown
#     against punch and populate 260 s
set -euo pipefail
cd "$(dirname "$0")/.."

export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
# The three-thread models of --full: bound 1 by default (bound 2 measured:
# three overlapping punches about 600-650 s, teardown against punch and
# populate still running after 28 minutes).
full_preemptions="${LOOM_FULL_PREEMPTIONS:-1}"
full=false
case "${1:-}" in
  --full) full=true ;;
  "") ;;
  *) echo "usage: ci/loom.sh [--full]" >&2; exit 2 ;;
esac

step() { printf '\n--- loom: %s\n' "$*"; }
start=$SECONDS

# The sync door: under the loom cfg every atomic, lock and fence of the
# engine must come through engine/src/sync.rs (ci/sync-door/clippy.toml).
step "sync door (clippy, loom cfg)"
CLIPPY_CONF_DIR="$PWD/ci/sync-door" RUSTFLAGS="--cfg hugepunch_loom" \
  cargo clippy -p hugepunch --lib --target-dir target-loom -- -D warnings

step "models (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS)"
RUSTFLAGS="--cfg hugepunch_loom" \
  cargo test -p loom-tests --release --tests --target-dir target-loom

if $full; then
  # The #[ignore]d models are the three-thread ones.
  step "three-thread models (LOOM_MAX_PREEMPTIONS=$full_preemptions)"
  LOOM_MAX_PREEMPTIONS="$full_preemptions" RUSTFLAGS="--cfg hugepunch_loom" \
    cargo test -p loom-tests --release --tests --target-dir target-loom -- --ignored
fi

# Each planted bug (a test-only cfg of the engine) must make its model
# fail: the `broken_*` test is #[should_panic(expected = "invariant...")].
# variant:test file (the model that must catch it).
# variant:test file[:test name] (default name broken_<variant>_is_caught);
# the batch models catch three of them again through
# punch_many and the 4 KiB fast path (the same builds, one more test run).
for planted in completion:completion conversion:conversion unpunch:unpunch mark:conversion \
  completion:batch:broken_completion_batch_is_caught \
  conversion:batch:broken_conversion_batch_is_caught \
  unpunch:batch:broken_unpunch_batch_is_caught; do
  variant=${planted%%:*} rest=${planted#*:}
  model=${rest%%:*} name=broken_${variant}_is_caught
  [[ $rest == *:* ]] && name=${rest#*:}
  step "planted bug hugepunch_broken=\"$variant\": loom must catch it ($model: $name)"
  out=$(RUSTFLAGS="--cfg hugepunch_loom --cfg hugepunch_broken=\"$variant\"" \
    cargo test -p loom-tests --release --target-dir "target-loom/broken-$variant" \
    --test "$model" -- "$name" --exact 2>&1) || {
    echo "$out"
    echo "loom did NOT catch the planted bug \"$variant\" ($name)" >&2
    exit 1
  }
  grep -E '^test ' <<<"$out"
  if ! grep -q "^test $name - should panic ... ok" <<<"$out"; then
    echo "$out"
    echo "the planted-bug test $name for \"$variant\" did not run" >&2
    exit 1
  fi
done

step "done in $((SECONDS - start)) s"
