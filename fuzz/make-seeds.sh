#!/usr/bin/env bash
# Writes the seed corpora under fuzz/seeds/ (committed; they are small).
# Run from anywhere after changing the worked examples, the patterns or the
# differential encoding; ci/fuzz.sh does not run it.
#
#   seeds/trace_parse, seeds/replay: the worked examples of docs/CONTRACT.md
#     (engine/tests/examples, copied from ../shared/examples) and the
#     patterns of `hugepunch gen` at order 3 (128 KiB: 4 huge pages of 8
#     subpages), order 2 and order 9 (4 MiB)
#   seeds/differential: the small-order patterns in the differential
#     encoding (fuzz/src/lib.rs), each with no budget, budget 0, and a
#     3-subpage budget under cancel-and-zero
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cargo build --release -q -p hugepunch-cli
gen="$CARGO_TARGET_DIR/release/hugepunch gen"
patterns="ascending descending random strided round-robin pin conversion-churn straddling"
for p in $patterns; do
  $gen "$p" --order 3 --size 128K --seed 7 -o "$tmp/$p-o3.trace"
  $gen "$p" --order 2 --size 48K --seed 7 -o "$tmp/$p-o2.trace"
done
for p in random straddling; do
  $gen "$p" --order 9 --size 4M --seed 7 -o "$tmp/$p-o9.trace"
done
$gen pin --order 1 --size 24K -o "$tmp/pin-o1.trace"

for t in trace_parse replay; do
  rm -rf "fuzz/seeds/$t"
  mkdir -p "fuzz/seeds/$t"
  cp engine/tests/examples/*.trace "$tmp"/*.trace "fuzz/seeds/$t/"
done

rm -rf fuzz/seeds/differential
(cd fuzz && cargo run --release -q --bin seeds -- seeds/differential \
  "$tmp"/*-o[123].trace)
du -sh fuzz/seeds/*
