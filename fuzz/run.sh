#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each (default 300) with libFuzzer through cargo-fuzz.
#   cargo install cargo-fuzz            # once
#   fuzz/run.sh [SECONDS] [TARGET...]
# Stable Rust works through RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only -Z flags). No sanitizer: the targets
# are safe Rust, and cargo-fuzz builds with debug assertions, so overflows and panics are what it catches.
# New inputs go to target/fuzz-corpus/<target> (seeded from the committed fuzz/corpus/<target>); a crash lands in
# fuzz/artifacts/<target>/: minimise it (cargo fuzz tmin), copy it to fuzz/corpus/<target>/crash-<what>, fix, and
# tests/fuzz_corpus.rs keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pdu x_matrix ids sync_token filter multipart)
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none --fuzz-dir fuzz
for t in "${targets[@]}"; do
    mkdir -p "target/fuzz-corpus/$t"
    echo "== $t for ${secs}s"
    cargo fuzz run -s none --fuzz-dir fuzz "$t" "target/fuzz-corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 25
done
