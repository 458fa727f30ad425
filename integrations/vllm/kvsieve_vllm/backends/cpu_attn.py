"""vLLM's CPU attention backend (CPU_ATTN): the kvsieve descriptor of a layer's KV tensor and the
hook that records SnapKV window queries from `CPUAttentionBackendImpl.forward`.

The tensor is `[num_blocks, kv_heads, block_size, 2 * head_dim]` per layer with an ISA-dependent
packing, probed at start-up (`checks.check_runner` -> `layout.verify_layout`)."""

from __future__ import annotations

import logging

from .. import capture
from ..lib import DEVICE, DTYPE, LAYOUT, KvCache

logger = logging.getLogger("vllm.kvsieve")

PATCH = ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "forward")


def describe(tensor, head_size: int | None = None) -> KvCache:
    """kvsieve's descriptor of one layer's CPU_ATTN cache tensor (`head_size` is its last axis
    halved; taken for the adapters' common signature)."""
    from ..layout import kvsieve_layout_for, vllm_isa

    nb, heads, bs, two_d = tensor.shape
    layout = kvsieve_layout_for(vllm_isa(tensor.dtype, bs, two_d // 2), tensor.dtype)
    return KvCache(k=tensor.data_ptr(), v=None, dtype=DTYPE[str(tensor.dtype).removeprefix("torch.")],
                   layout=LAYOUT[layout], device=DEVICE["cpu"], num_blocks=nb, block_size=bs, num_kv_heads=heads,
                   head_dim=two_d // 2, block_stride=0, token_stride=0, head_stride=0)


def wrap_forward(orig):
    def forward(self, layer, query, *args, **kwargs):
        windows = capture.ACTIVE
        if windows is not None and windows.rows:
            try:
                windows.record(layer.layer_name, query)
            except Exception as e:  # never break the forward; the window's event fails instead
                logger.warning("kvsieve: recording SnapKV window queries failed (%s); those requests stay "
                               "uncompressed", e)
                windows.fail_step(f"recording failed: {e}")
        return orig(self, layer, query, *args, **kwargs)

    return forward
