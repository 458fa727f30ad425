#!/usr/bin/env bash
# Build, on a machine with cargo, the x86-64 binaries that scripts/gpu-check.sh runs on a GPU
# machine (which may have no Rust): the CUDA parity test binary, the CUDA kernel benchmark and
# the library with the CUDA backend (for the adapter check), copied to build/gpu/. The GPU
# itself is not needed to build them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/gpu
cargo build --release --features cuda --example cuda_bench
cp target/release/examples/cuda_bench build/gpu/
cargo build --release --features cuda --lib
cp target/release/libkvsieve.so build/gpu/
exe=$(cargo test --release --features cuda --test cuda_parity --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda_parity" and m.get("executable"):
        print(m["executable"])')
cp "$exe" build/gpu/cuda_parity
echo "built build/gpu/{cuda_bench,cuda_parity,libkvsieve.so}"
