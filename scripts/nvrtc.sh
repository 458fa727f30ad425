#!/usr/bin/env bash
# NVRTC (the nvidia-cuda-nvrtc-cu12 wheel) in .venv, creating .venv if missing: the CUDA
# kernels compile with it, GPU or not. The one place it is installed: scripts/setup.sh and
# scripts/cuda-emulated.sh call it; scripts/env.sh puts it on the library path.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 >/dev/null 2>&1; then
  exit 0
fi
command -v python3 >/dev/null 2>&1 || { echo "error: python3 not found; it is needed for the NVRTC wheel" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  python3 -m venv .venv
fi
echo "installing NVRTC (nvidia-cuda-nvrtc-cu12) into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check "nvidia-cuda-nvrtc-cu12>=12.4,<13"
