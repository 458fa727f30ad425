#!/usr/bin/env bash
# The main job: build libkvsieve, set up the Python side (which fetches and converts
# SmolLM2-135M-Instruct, a real pretrained Llama) and serve the same workload on stock vLLM and on
# vLLM with kvsieve: questions over 2k-4k-token prompts and continuations of 2k-4k-token passages.
# Prints a side-by-side table, the share of answers each run found, and a few questions with
# stock's and kvsieve's answers (bench/serve.py; results in bench/results/demo.{json,png}).
# Progress lines ("[bench] ...") say what runs, how far along it is and the time left.
#
#   bash scripts/demo.sh                                  # SmolLM2, SnapKV at 25%
#   bash scripts/demo.sh --quick                          # a generated model, random tokens (~2.5 min)
#   bash scripts/demo.sh --model DIR --config my.toml     # your model and kvsieve config
#   bash scripts/demo.sh --workload long-answer --requests 8 --kv-blocks 600
#
# Every option of bench/serve.py is accepted (python bench/serve.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release
export KVSIEVE_LIB="$PWD/target/release/libkvsieve.so"
args=()
workload=demo
for a in "$@"; do
  case "$a" in
    --quick) workload=demo-generated ;;
    --workload) workload="" ; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done
[ -z "$workload" ] || args=(--workload "$workload" "${args[@]}")
exec .venv/bin/python bench/serve.py "${args[@]}"
