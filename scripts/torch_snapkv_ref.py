"""SnapKV window scoring in plain PyTorch on the GPU, timed on the shapes of examples/cuda_bench.rs
(8 KV heads, head_dim 128, 32 query heads, window 32, bf16 keys), as the outside reference for
kvsieve's CUDA scoring time. Prints one JSON object. Used by scripts/gpu-check.sh."""
import json
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print(json.dumps({"error": "torch is not installed"}))
    sys.exit(0)

if not torch.cuda.is_available():
    print(json.dumps({"error": "torch sees no GPU"}))
    sys.exit(0)

HEADS, DIM, Q_HEADS, WINDOW, POOL = 8, 128, 32, 32, 7


def snapkv_scores(q, k):
    """q: [W, Hq, D] f32, k: [H, C, D] bf16 -> [H, C] scores (pooled before the window)."""
    w, hq, d = q.shape
    h, c, _ = k.shape
    g = hq // h
    kf = k.float().repeat_interleave(g, dim=0)  # [Hq, C, D]
    logits = torch.einsum("whd,hcd->hwc", q, kf) / d**0.5
    pos = torch.arange(c, device=q.device)
    limit = c - w + torch.arange(w, device=q.device)
    logits = logits.masked_fill(pos[None, None, :] > limit[None, :, None], float("-inf"))
    probs = logits.softmax(-1).sum(1).view(h, g, c).sum(1)  # [H, C]
    n = c - w
    pooled = F.max_pool1d(probs[None, :, :n], POOL, stride=1, padding=POOL // 2)[0]
    return torch.cat([pooled, probs[:, n:]], dim=1)


def main():
    runs = []
    for c in (4096, 16384, 32768):
        q = torch.randn(WINDOW, Q_HEADS, DIM, device="cuda")
        k = torch.randn(HEADS, c, DIM, device="cuda", dtype=torch.bfloat16)
        snapkv_scores(q, k)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            snapkv_scores(q, k)
        end.record()
        torch.cuda.synchronize()
        runs.append({"tokens": c, "torch_snapkv_ms": start.elapsed_time(end) / 20})
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "runs": runs}))


if __name__ == "__main__":
    main()
