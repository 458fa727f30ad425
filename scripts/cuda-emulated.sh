#!/usr/bin/env bash
# Run kvsieve's CUDA kernels and its Rust CUDA host code without a GPU: EMULATED, not a GPU.
#
# tests/cuda_emu/ builds a fake libcuda.so that runs kernels/kvsieve.cu compiled for the host
# (each block's threads as fibers, barriers and warp shuffles enforced), under the unchanged
# Rust backend and cudarc; NVRTC still compiles the real kernels, and a kernel is launched only
# if the image NVRTC built contains it. The CUDA parity tests (tests/cuda_parity.rs) run in
# forward and reverse thread orders, then under AddressSanitizer in a shuffled order; then the
# start-up self-check is shown to refuse a deliberately broken kernel (tests/cuda_emulated.rs).
# `scripts/gpu-check.sh` on a real GPU stays the real gate.
#
# Needs a C++ compiler, a Rust toolchain and the NVRTC wheel (installed into .venv if missing);
# not the vLLM environment. Ends with "cuda-emulated: N passed, 0 failed (emulated)".
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/cuda-emu

cxx=${CXX:-}
if [ -z "$cxx" ]; then
  for c in g++ c++ clang++; do command -v "$c" >/dev/null 2>&1 && cxx=$c && break; done
fi
if [ -z "$cxx" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing a C++ compiler (g++) for the emulated CUDA runs"
  apt-get update -qq && apt-get install -y -qq g++ >/dev/null && cxx=g++
fi
[ -n "$cxx" ] || { echo "error: no C++ compiler (g++ or clang++); install one, or set CXX" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 || { echo "error: cargo not found; scripts/setup.sh installs the toolchain" >&2; exit 1; }
bash scripts/nvrtc.sh
source scripts/env.sh

# The fake driver, plain and with AddressSanitizer. Kernel names come from the source itself.
mkdir -p "$out/plain" "$out/asan"
grep -o 'extern "C" __global__ void [a-z_0-9]*' kernels/kvsieve.cu | awk '{print "KVS_EMU_KERNEL(" $5 ")"}' \
  > "$out/kernels.inc"
build() {  # build DIR FLAGS...
  local dir=$1
  shift
  "$cxx" -std=c++20 -O1 -g -fPIC -shared -fvisibility=hidden -Wall -Werror -Itests/cuda_emu -I"$out" \
    -DKVS_EMU_KERNEL_SOURCE="\"$PWD/kernels/kvsieve.cu\"" "$@" tests/cuda_emu/driver.cpp -o "$dir/libcuda.so"
}
build "$out/plain"
build "$out/asan" -fsanitize=address -fno-omit-frame-pointer
asan_rt=$("$cxx" -print-file-name=libasan.so)
[ -f "$asan_rt" ] || asan_rt=$("$cxx" -print-file-name=libclang_rt.asan-x86_64.so)
[ -f "$asan_rt" ] || { echo "error: $cxx has no AddressSanitizer runtime (libasan); install it or set CXX" >&2; exit 1; }

# The test binaries (#[ignore]d in a plain `cargo test`: they need a device): the parity tests,
# and the self-check's refusal of a broken kernel (emulated only: the driver breaks it on request).
test_bin() {
  local b
  b=$(cargo test --features cuda --test "$1" --no-run --message-format=json 2>/dev/null \
    | sed -n "s/.*\"executable\":\"\([^\"]*$1-[^\"]*\)\".*/\1/p" | tail -1)
  [ -x "$b" ] || { echo "error: building tests/$1.rs failed" >&2; cargo test --features cuda --test "$1" --no-run; exit 1; }
  echo "$b"
}
parity=$(test_bin cuda_parity)
emulated_only=$(test_bin cuda_emulated)

passed=0
failed=0
runs=0
emulate() {  # emulate BINARY LABEL DRIVER_DIR [ENV...]: one run of a test binary's every test
  local bin=$1 label=$2 dir=$3
  shift 3
  local log
  log=$(mktemp)
  echo "== [emulated] $(basename "${bin%-*}"), $label"
  set +e
  env "$@" LD_LIBRARY_PATH="$PWD/$dir:${LD_LIBRARY_PATH:-}" "$bin" --include-ignored --test-threads 2 >"$log" 2>&1
  local rc=$?
  set -e
  sed 's/^/[emulated] /' "$log" | grep -v '^\[emulated\] *$' || true
  local p f
  p=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$log" | tail -1)
  f=$(sed -n 's/^test result: .* \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$log" | tail -1)
  runs=$((runs + 1))
  if [ -z "$p" ] || [ "$rc" -ne 0 ] && [ "${f:-0}" -eq 0 ]; then
    f=$(( ${f:-0} + 1 ))  # a crash (or an ASan report) before the summary counts as a failure
  fi
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0}))
  rm -f "$log"
}
# KVSIEVE_EMU_FAIL_FAST=1 (scripts/cuda-mutants.sh): stop at the first run that fails.
for order in forward reverse; do
  emulate "$parity" "threads in $order order" "$out/plain" KVSIEVE_EMU_ORDER=$order
  [ "$failed" -gt 0 ] && [ -n "${KVSIEVE_EMU_FAIL_FAST:-}" ] && break
done
if [ "$failed" -eq 0 ] || [ -z "${KVSIEVE_EMU_FAIL_FAST:-}" ]; then
  emulate "$parity" "AddressSanitizer, threads in shuffled order" "$out/asan" KVSIEVE_EMU_ORDER=shuffled \
    LD_PRELOAD="$asan_rt" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:exitcode=66
fi
if [ "$failed" -eq 0 ] || [ -z "${KVSIEVE_EMU_FAIL_FAST:-}" ]; then
  emulate "$emulated_only" "threads in forward order" "$out/plain"
fi
echo "cuda-emulated: $passed passed, $failed failed (emulated, $runs runs: tests/cuda_parity.rs, tests/cuda_emulated.rs)"
[ "$failed" -eq 0 ]
