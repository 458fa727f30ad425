"""The GPU backends' KV layout adapter (`kvsieve_vllm.backends.flash_layout`) on CUDA tensors,
with the CUDA kernels (a library built with `--features cuda`, KVSIEVE_LIB or build/gpu/): the
start-up self-check in every layout, knorm selection and compaction (in place and into fresh
blocks) against a torch reference, bitwise, the worker's own event path (`worker.run_events`: one
synchronize per event and phase, a bad row failed on the device without touching anything; SnapKV
from the windows the forward hook recorded, against a float64 torch reference) and
the SnapKV window hook on device. The same checks
as integrations/vllm/tests/test_gpu_layouts.py (gpu_layout_cases.py), without pytest or vLLM
(then the layouts are FlashInfer's NHD and HND and the write is reshape_and_cache_flash's
indexing in torch). Prints one JSON object; exit 1 if any check failed. Used by
scripts/gpu-check.sh. `--device cpu` runs the same checks with the CPU kernels."""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "integrations" / "vllm"), str(ROOT / "integrations" / "vllm" / "tests")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print(json.dumps({"error": "torch is not installed"}))
        return 1
    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no GPU"}))
        return 1
    import gpu_layout_cases as cases

    results, failed = [], 0

    def run(name, fn, *args):
        nonlocal failed
        t0 = time.time()
        try:
            extra = fn(*args)
            results.append({"check": name, "ok": True, "s": round(time.time() - t0, 3), **({"note": extra} if extra else {})})
        except Exception as e:
            failed += 1
            results.append({"check": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                            "trace": traceback.format_exc()[-1500:]})

    for layout in cases.layouts():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            run(f"self-check {layout} {dtype}", cases.check_self_check, layout, dtype, a.device)
        for into in (False, True):
            run(f"knorm compaction {layout} {'into fresh blocks' if into else 'in place'}",
                cases.check_knorm_compaction, layout, into, a.device)
        for into in (False, True):
            run(f"worker events {layout} {'into fresh blocks' if into else 'in place'}",
                cases.check_worker_events, layout, into, a.device)
        run(f"worker snapkv {layout}", cases.check_worker_snapkv, layout, a.device)
        run(f"block selection {layout}", cases.check_selection, layout, a.device)
    run("window hook", cases.check_window_hook, a.device)
    device = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(json.dumps({"device": device, "checks": len(results), "failed": failed, "results": results}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
