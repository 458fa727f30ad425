#!/usr/bin/env bash
# Seeded bugs the emulated CUDA suite (scripts/cuda-emulated.sh) must catch: each mutation is
# applied to a copy of the sources (kernels/kvsieve.cu or src/cuda/ops.rs) and the suite runs on
# the copy; the script fails if any mutant survives. Emulated, like the suite it checks.
#   bash scripts/cuda-mutants.sh            # every mutant (a few minutes)
#   bash scripts/cuda-mutants.sh barrier    # the mutants whose name contains "barrier"
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=target/cuda-emu/mutants
mkdir -p "$work"

# name | file | text to replace (first occurrence) | replacement
MUTANTS=(
  "removed_barrier|kernels/kvsieve.cu|  if (lane == 31) sh[warp] = x;
  __syncthreads();|  if (lane == 31) sh[warp] = x;"
  "divergent_barrier|kernels/kvsieve.cu|    if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();|    if (threadIdx.x < s) {
      sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
      __syncthreads();
    }"
  "shifted_index|kernels/kvsieve.cu|ss = src % g.block_size;|ss = (src + 1) % g.block_size;"
  "swapped_launch_arguments|src/cuda/ops.rs|                &w32,
                &hq32,
                &logits,|                &hq32,
                &w32,
                &logits,"
  "short_workspace|src/cuda/ops.rs|+ heads * cached_len * 4
}|+ heads * cached_len * 4 - 4
}"
  "quest_empty_range_not_copied|kernels/kvsieve.cu|        block_min[at] = block_min[at - g.heads * g.dim];|        block_min[at] = KVS_INF;"
  "quest_ranges_ignored|kernels/kvsieve.cu|    for (u64 r = 0; r < ranges; r++) {
      for (u64 qh = 0; qh < q_heads; qh++) {|    for (u64 r = 0; r < 1; r++) {
      for (u64 qh = 0; qh < q_heads; qh++) {"
)

survived=()
caught=0
for m in "${MUTANTS[@]}"; do
  name=${m%%|*}
  rest=${m#*|}
  file=${rest%%|*}
  rest=${rest#*|}
  from=${rest%%|*}
  to=${rest#*|}
  [ -n "${1:-}" ] && [[ "$name" != *"$1"* ]] && continue
  copy="$work/$name"
  rm -rf "$copy"
  mkdir -p "$copy"
  cp -r Cargo.toml Cargo.lock cbindgen.toml src kernels tests include scripts benches examples "$copy"/
  ln -s "$root/.venv" "$copy/.venv"
  FROM="$from" TO="$to" python3 - "$copy/$file" <<'PY'
import os, sys
path = sys.argv[1]
text = open(path).read()
old, new = os.environ["FROM"], os.environ["TO"]
assert old in text, f"mutation text not found in {path}: {old!r}"
open(path, "w").write(text.replace(old, new, 1))
PY
  echo "== mutant $name ($file)"
  (cd "$copy" && CARGO_TARGET_DIR="$root/$work/target" KVSIEVE_EMU_FAIL_FAST=1 \
     bash scripts/cuda-emulated.sh >"$root/$work/$name.log" 2>&1) || true
  # Caught only when the suite ran and a test failed: a mutant that does not build (or a
  # missing tool) proves nothing.
  if grep -qE '^cuda-emulated: [0-9]+ passed, [1-9][0-9]* failed' "$work/$name.log"; then
    echo "   caught: $(grep -m1 -E 'panicked|ERROR: AddressSanitizer|emulated CUDA:|Segmentation fault' "$work/$name.log" | cut -c1-160)"
    caught=$((caught + 1))
  else
    echo "   SURVIVED (or the suite did not run): $(tail -1 "$work/$name.log" | cut -c1-160) (log: $work/$name.log)"
    survived+=("$name")
  fi
done
echo "cuda-mutants: $caught caught, ${#survived[@]} survived (emulated)"
[ "${#survived[@]}" -eq 0 ]
