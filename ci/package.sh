#!/usr/bin/env bash
# Packaging check, without publishing anything:
#  - the crates meant for crates.io carry their metadata (description,
#    keywords, categories, documentation, readme, license, repository), a
#    README and a CHANGELOG, and their path dependencies carry versions;
#  - every other workspace member is `publish = false`;
#  - `cargo package` packages them together and builds each from its
#    tarball (the local ones resolved from a temporary registry);
#  - `cargo doc` of the workspace has no warnings.
# Run it from anywhere: ci/package.sh. About 1 minute cold.
set -euo pipefail
cd "$(dirname "$0")/.."

PUBLISHED=(hugepunch hugepunch-workload hugepunch-probe hugepunch-linux hugepunch-capi)

echo "--- metadata"
cargo metadata --format-version 1 --no-deps | python3 -c '
import json, os, sys
published = set(sys.argv[1:])
meta = json.load(sys.stdin)
bad = []
for p in meta["packages"]:
    name, root = p["name"], os.path.dirname(p["manifest_path"])
    before = len(bad)
    if name not in published:
        if p["publish"] != []:
            bad.append(f"{name}: not meant for crates.io, so it needs publish = false")
        continue
    for field in ("description", "documentation", "readme", "license", "repository"):
        if not p.get(field):
            bad.append(f"{name}: no `{field}`")
    for field in ("keywords", "categories"):
        if not p.get(field):
            bad.append(f"{name}: no `{field}`")
    if len(p.get("keywords") or []) > 5:
        bad.append(f"{name}: more than 5 keywords (crates.io refuses them)")
    for f in ("README.md", "CHANGELOG.md"):
        if not os.path.isfile(os.path.join(root, f)):
            bad.append(f"{name}: no {f} beside its Cargo.toml")
    for d in p["dependencies"]:
        # A path dependency needs a version to be published; a path-only
        # dev-dependency is dropped from the published manifest.
        if d.get("path") and d["req"] == "*" and d["kind"] != "dev":
            bad.append(f"{name}: path dependency {d['name']} has no version")
    if len(bad) == before:
        print(f"{name}: metadata, README.md, CHANGELOG.md ok")
for b in bad:
    print("error:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
' "${PUBLISHED[@]}"

echo "--- cargo package (and build each from its tarball)"
args=()
for p in "${PUBLISHED[@]}"; do args+=(-p "$p"); done
cargo package "${args[@]}" --allow-dirty

echo "--- cargo doc (no warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --features hugepunch-linux/vm-memory

echo "package check passed: ${PUBLISHED[*]}"
