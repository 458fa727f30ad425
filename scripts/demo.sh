#!/usr/bin/env bash
# The main job: build libkvsieve, set up the Python side, generate a small Llama-shaped model
# (seeded) and serve the same long-context workload on stock vLLM and on vLLM with kvsieve,
# printing a side-by-side table (bench/serve.py; results in bench/results/demo.{json,png}).
#
#   bash scripts/demo.sh                                  # the demo workload, SnapKV at 25%
#   bash scripts/demo.sh --model DIR --config my.toml     # your model and kvsieve config
#   bash scripts/demo.sh --workload long-prompt-qa --requests 8 --kv-blocks 600
#
# Every option of bench/serve.py is accepted (python bench/serve.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release
export KVSIEVE_LIB="$PWD/target/release/libkvsieve.so"
args=("$@")
has_workload=0
for a in "$@"; do [ "$a" = "--workload" ] && has_workload=1; done
[ "$has_workload" = 1 ] || args=(--workload demo "${args[@]}")
exec .venv/bin/python bench/serve.py "${args[@]}"
