#!/usr/bin/env bash
# Re-apply one mutant by hand and run the loom models on it: cargo-mutants
# does not run loom (docs/RELIABILITY.md, "Mutation testing").
#
#   ci/loom-mutant.sh DIFF [REV]
#
# DIFF is a diff from cargo-mutants' `mutants.out/diff/` (paths relative
# to the repository root); REV the commit the mutation run used (default
# HEAD). Prints `CAUGHT by loom: <failing tests>` or `MISSED by loom`.
# Builds in target-loom-mutant (a clean clone in a temporary directory).
set -uo pipefail
diff=$(realpath "$1")
rev=${2:-HEAD}
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$top" "$work/src" && git -C "$work/src" checkout -q "$rev"
cd "$work/src" && patch -s -p0 <"$diff" || { echo "does not apply: $diff"; exit 2; }
out=$(LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}" RUSTFLAGS="--cfg hugepunch_loom" \
  cargo test -p loom-tests --release --tests --target-dir "$top/target-loom-mutant" 2>&1)
if grep -q "test result: FAILED" <<<"$out"; then
  echo "CAUGHT by loom: $(grep -E '^test .* FAILED' <<<"$out" | tr '\n' ' ')"
elif grep -q "test result: ok" <<<"$out"; then
  echo "MISSED by loom: $diff"
else
  echo "build failed or timed out: $diff"; tail -5 <<<"$out"; exit 2
fi
