#!/usr/bin/env bash
# Set up and run every test: formatting, lints (with and without the cuda feature), unit,
# property, ABI, header-drift and C-integration tests, and with --features cuda the NVRTC
# compilation of every kernel and the GPU parity tests (which skip, saying why, without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() { echo "== $*"; "$@" 2>&1 | tee -a "$log"; }

run cargo fmt --all --check
run cargo clippy --all-targets -- -D warnings
run cargo clippy --all-targets --features cuda -- -D warnings
run cargo test --all-targets
run cargo test --features cuda --test cuda_compile --test abi_kernels
run cargo test --features cuda --test cuda_parity -- --nocapture

# One closing line over every cargo test run above.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "kvsieve: %d passed, %d failed\n", p, f }' "$log"
