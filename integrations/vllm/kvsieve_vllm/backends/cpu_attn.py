"""vLLM's CPU attention backend (CPU_ATTN): the kvsieve descriptor of a layer's KV tensor and the
hook in `CPUAttentionBackendImpl.forward` that records SnapKV window queries and hands the layer
its Quest selection (`selection`: the block table and sequence lengths decode rows read).

The tensor is `[num_blocks, kv_heads, block_size, 2 * head_dim]` per layer with an ISA-dependent
packing, probed at start-up (`checks.check_runner` -> `layout.verify_layout`)."""

from __future__ import annotations

import logging

import dataclasses

from .. import capture, selection
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


def selection_state(impl, layer, md, seq_lens, dtype):
    """The scheduler metadata (per-request KV split ranges) CPU_ATTN needs for `seq_lens`, built
    as its metadata builder builds it; once per step, shared by every selected layer."""
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size, seq_lens=seq_lens, dtype=dtype, query_start_loc=md.query_start_loc,
        causal=md.causal, sliding_window_size=-1, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=md.dynamic_causal, kv_cache_dtype=impl.kv_cache_dtype)


def with_selection(md, block_table, seq_lens, state):
    """A copy of the step's metadata that reads `block_table` for `seq_lens` (vLLM's object,
    shared by every layer, is left as it is)."""
    return dataclasses.replace(md, block_table=block_table, seq_lens=seq_lens, scheduler_metadata=state)


# impl.forward(layer, query, key, value, kv_cache, attn_metadata, output, ...)
_METADATA_ARG = 3  # attn_metadata's index in *args after query


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
        selector = selection.ACTIVE
        if selector is not None:
            if "attn_metadata" in kwargs:
                kwargs["attn_metadata"] = selector.metadata_for(layer.layer_name, self, layer, query,
                                                                kwargs["attn_metadata"])
            elif len(args) > _METADATA_ARG:
                args = list(args)
                args[_METADATA_ARG] = selector.metadata_for(layer.layer_name, self, layer, query,
                                                            args[_METADATA_ARG])
        return orig(self, layer, query, *args, **kwargs)

    return forward
