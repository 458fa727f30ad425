#!/usr/bin/env bash
# Set up and run every test: formatting, lints (with and without the cuda feature), unit,
# property, ABI, header-drift and C-integration tests, and with --features cuda the NVRTC
# compilation of every kernel and the GPU parity tests (which skip, saying why, without a GPU;
# scripts/cuda-emulated.sh then runs them on the emulation, labelled emulated).
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
steps=$(mktemp)
trap 'rm -f "$log" "$steps"' EXIT
start=$SECONDS
# Each step prints its command, then its wall time and the total so far (CI has 45 minutes).
run() {
  local t=$SECONDS
  echo "== $*"
  "$@" 2>&1 | tee -a "$log"
  printf '%s\t%s\n' "$(( SECONDS - t ))" "$*" >> "$steps"
  echo "== $(( SECONDS - t )) s ($(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s in all)"
}

run bash scripts/setup.sh
source scripts/env.sh
run cargo fmt --all --check
run cargo clippy --all-targets -- -D warnings
run cargo clippy --all-targets --features cuda -- -D warnings
# `cargo test` builds only the rlib; the C and Python tests link target/debug/libkvsieve.{so,a}.
run cargo build
run cargo test --all-targets
run cargo test --features cuda --test cuda_compile --test abi_kernels
# The GPU parity tests are #[ignore]d (reported as skipped) unless a GPU is here to run them.
gpu_tests=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  gpu_tests=(--include-ignored)
fi
run cargo test --features cuda --test cuda_parity -- --nocapture "${gpu_tests[@]}"
# The same parity tests with no GPU: EMULATED (a fake libcuda running the kernels compiled for
# the host, in two thread orders and under AddressSanitizer; counted on their own line).
run bash scripts/cuda-emulated.sh
# Rebuild the default-feature library for the Python tests (the cuda runs above replaced it).
run cargo build

# The Python side against the library just built (debug profile, from `cargo test`).
export KVSIEVE_LIB="$PWD/target/debug/libkvsieve.so"
# One module at a time: the engine tests keep both cores busy already (engines two at a time),
# and several share in-process state (the plugin registers once per process).
run .venv/bin/python -m pytest integrations/vllm/tests -q -p no:cacheprovider --durations 15
# The benchmark and demo code (bench/): figures, config errors, quality harness vs kvpress, a
# small stock-vs-kvsieve serving run.
run .venv/bin/python -m pytest bench/tests -q -p no:cacheprovider --durations 10

# One closing line over every cargo and pytest run above (cargo's ignored tests are skipped).
awk '!/^\[emulated\]/ && (/^test result:/ || / (passed|skipped).* in [0-9.]+s/) {
       for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^(skipped|ignored)/) s += $i }
     }
     END { printf "kvsieve: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
grep '^cuda-emulated:' "$log" || true
# The counts and times, with provenance: CI's run writes bench/results/ci-run.json (what the README
# quotes, committed from a clean clone's CI=true run); other runs build/test-run.json.
record="${KVSIEVE_TEST_RECORD:-$([ "${CI:-}" = true ] && echo bench/results/ci-run.json || echo build/test-run.json)}"
mkdir -p "$(dirname "$record")"
.venv/bin/python bench/test_record.py "$log" "$steps" "$(( SECONDS - start ))" "$record"
