#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build with the cuda feature (or take build/gpu/ from
# scripts/gpu-build.sh where no cargo exists), run the CUDA parity tests against the CPU
# reference and the kernel benchmarks (compaction GB/s against the device copy bandwidth of the
# same run, SnapKV scoring time against a PyTorch reference), the vLLM GPU-layout adapter and the
# plugin's worker event path on CUDA tensors (scripts/torch_adapter_check.py; PyTorch needed, vLLM
# not), and write a JSON report to
# ${OUT:-build/gpu-report}/gpu-report.json. Takes a few minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu-report}"
mkdir -p "$out"

# kvsieve is built against CUDA 12 (cudarc cuda-12090): it loads libnvrtc.so.12. Take it from
# KVSIEVE_NVRTC_DIR, the project venv, or wheels carried in .whl/.
nvrtc_dir="${KVSIEVE_NVRTC_DIR:-}"
for cand in .venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib /tmp/kvsieve-nvrtc/nvidia/cuda_nvrtc/lib; do
  [ -z "$nvrtc_dir" ] && [ -e "$cand/libnvrtc.so.12" ] && nvrtc_dir="$cand"
done
if [ -z "$nvrtc_dir" ] && ls .whl/nvidia_cuda_nvrtc_cu12-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/kvsieve-nvrtc .whl/nvidia_cuda_nvrtc_cu12-*.whl
  nvrtc_dir=/tmp/kvsieve-nvrtc/nvidia/cuda_nvrtc/lib
fi
[ -n "$nvrtc_dir" ] && export LD_LIBRARY_PATH="$nvrtc_dir:${LD_LIBRARY_PATH:-}"

if command -v cargo >/dev/null 2>&1; then
  bash scripts/gpu-build.sh
fi
[ -x build/gpu/cuda_parity ] || { echo "error: build/gpu/ missing; run scripts/gpu-build.sh where cargo exists and carry build/gpu" >&2; exit 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt" 2>&1 || true
set +e
build/gpu/cuda_parity --include-ignored --nocapture --test-threads=1 > "$out/parity.log" 2>&1
parity_rc=$?
build/gpu/cuda_bench > "$out/bench.json" 2> "$out/bench.err"
bench_rc=$?
python3 scripts/torch_snapkv_ref.py > "$out/torch.json" 2> "$out/torch.err"
KVSIEVE_LIB="$PWD/build/gpu/libkvsieve.so" python3 scripts/torch_adapter_check.py > "$out/adapters.json" 2> "$out/adapters.err"
adapters_rc=$?
set -e
python3 - "$out" "$parity_rc" "$bench_rc" "$adapters_rc" <<'PY'
import json, sys, pathlib
out, parity_rc, bench_rc, adapters_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as e:
        return {"error": f"{name}: {e}"}
log = (out / "parity.log").read_text()
report = {
    "device": (out / "device.txt").read_text().strip(),
    "parity": {"exit_code": parity_rc,
               "summary": [l for l in log.splitlines() if l.startswith("test result")]},
    "kernels": load("bench.json") if bench_rc == 0 else {"error": (out / "bench.err").read_text()[-2000:]},
    "torch_reference": load("torch.json"),
    "vllm_gpu_layout_adapter": {"exit_code": adapters_rc, **load("adapters.json")},
}
(out / "gpu-report.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
PY
[ "$parity_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$adapters_rc" -eq 0 ]
