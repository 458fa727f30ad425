#!/usr/bin/env bash
# Re-measure the headline table in one go: every serving row of bench/README.md's summary (and
# the README's demo line), each ratio the median of REPEATS paired runs (stock and kvsieve in
# alternation), with its range; then render the tables from the result files.
#
#   bash bench/rerun.sh                 # every headline row, 3 repeats (about 2.5 hours on 2 cores)
#   bash bench/rerun.sh demo mixed      # only these rows
#   REPEATS=5 bash bench/rerun.sh long-prompt-qa
#
# Rows: long-prompt-qa mixed long-generation demo-generated demo long-answer multi-turn-cached.
# Run it with nothing else on the machine: a compile beside a benchmark moves its ratios.
# Results: bench/results/<row>.json (+ .png), each with its provenance (commit, command, config
# with its defaults, model checksum, machine, date, repeats).
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS="${REPEATS:-3}"
[ -x .venv/bin/python ] || bash scripts/setup.sh
cargo build --release --quiet
export KVSIEVE_LIB="$PWD/target/release/libkvsieve.so"
py=.venv/bin/python

row() {
  case "$1" in
    long-prompt-qa) $py bench/serve.py --workload long-prompt-qa --budgets 0.1,0.25 --repeats "$REPEATS" ;;
    mixed) $py bench/serve.py --workload mixed --repeats "$REPEATS" ;;
    long-generation) $py bench/serve.py --workload long-generation --repeats "$REPEATS" ;;
    demo-generated) $py bench/serve.py --workload demo-generated --repeats "$REPEATS" ;;
    demo) $py bench/serve.py --workload demo --repeats "$REPEATS" ;;
    long-answer) $py bench/serve.py --workload long-answer --budgets 0.25,0.5 --no-agreement --repeats "$REPEATS" ;;
    multi-turn-cached) $py bench/serve.py --workload multi-turn --budgets 0.25 --no-agreement --kv-requests 6 \
      --name multi-turn-cached --repeats "$REPEATS" ;;
    *) echo "bench/rerun.sh: unknown row '$1' (rows: long-prompt-qa mixed long-generation demo-generated demo" \
         "long-answer multi-turn-cached)" >&2; exit 2 ;;
  esac
}

mkdir -p build
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(long-prompt-qa mixed long-generation demo-generated demo long-answer multi-turn-cached)
for r in "${rows[@]}"; do
  start=$SECONDS
  echo "[rerun] $r: $REPEATS repeats ..." >&2
  row "$r" > "build/rerun-$r.txt"
  echo "[rerun] $r: done in $((SECONDS - start)) s (table: build/rerun-$r.txt)" >&2
done
$py bench/render.py
