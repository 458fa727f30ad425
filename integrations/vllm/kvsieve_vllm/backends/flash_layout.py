"""vLLM's GPU attention backends that share one paged cache layout (vLLM 0.32: FLASH_ATTN,
FLASHINFER, TRITON_ATTN): the kvsieve descriptor of a layer's KV tensor, the probe tensor and
cache-write op of the start-up self-check, and the SnapKV window hook.

In vLLM 0.32 (the KV-cache layout RFC, `vllm/v1/kv_cache_layout.py`) each layer's cache is a
view of logical shape `[num_blocks, num_kv_heads, block_size, 2 * head_size]`, K in the first
`head_size` of the last axis and V in the second, whose physical order is one of
`KVCacheLayout`'s permutations (FlashInfer's NHD is `[blocks, tokens, heads, C]`, its HND
`[blocks, heads, tokens, C]`). All three backends write it through `reshape_and_cache_flash` on
the views `kv_cache.transpose(1, 2).split(head_size, dim=-1)` (`[blocks, tokens, heads,
head_size]` each). kvsieve describes exactly those views by their strides (its NHD addressing
with explicit strides covers every permutation), so nothing here assumes a physical order; the
self-check (`layout.verify_flash_layout`) proves it per engine before the first request. (The
issue that asked for this named the older `(2, num_blocks, block_size, heads, head_size)`
FLASH_ATTN shape; vLLM 0.32 no longer allocates it.)
"""

from __future__ import annotations

import dataclasses

from ..lib import DEVICE, DTYPE, LAYOUT, KvCache, KvsieveError
# The SnapKV window hook is CPU_ATTN's: it only reads `query` from `forward(self, layer, query,
# ...)`, the same on every backend, and the window store keeps its buffers on the query's device.
from .cpu_attn import wrap_forward  # noqa: F401


# Each backend's attention forward, wrapped with the window hook on a CUDA platform.
FORWARDS = {
    "FLASH_ATTN": ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl", "forward"),
    "FLASHINFER": ("vllm.v1.attention.backends.flashinfer", "FlashInferImpl", "forward"),
    "TRITON_ATTN": ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl", "forward"),
}


def _refuse(message: str) -> KvsieveError:
    return KvsieveError("KVS_STATUS_UNSUPPORTED", message)


def views(kv_cache, head_size: int):
    """vLLM's own K and V views of a layer's cache: `[num_blocks, block_size, heads, head_size]`."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def _strides(view) -> tuple[int, int, int]:
    """(block, token, head) strides of a K or V view in elements. A size-1 axis may carry any
    stride in torch; it is never stepped, so it gets one past everything else (never aliases)."""
    sizes, strides = view.shape[:3], list(view.stride()[:3])
    reach = max(s * n for s, n in zip(view.stride(), view.shape)) or 1
    return tuple(reach if n == 1 else s for s, n in zip(strides, sizes))


def describe(kv_cache, head_size: int) -> KvCache:
    """kvsieve's descriptor of one layer's cache (K and V bases, explicit strides), or
    KvsieveError naming what does not fit the layout."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise _refuse(f"KV cache of shape {tuple(kv_cache.shape)}; the FLASH_ATTN / FLASHINFER / TRITON_ATTN layout "
                      f"is [num_blocks, kv_heads, block_size, 2 * head_size = {2 * head_size}]")
    dtype = str(kv_cache.dtype).removeprefix("torch.")
    if dtype not in DTYPE:
        raise _refuse(f"KV cache dtype {dtype}; kvsieve moves {', '.join(DTYPE)} caches (use --kv-cache-dtype auto)")
    if kv_cache.device.type not in DEVICE:
        raise _refuse(f"KV cache on {kv_cache.device.type}; kvsieve's kernels run on cpu and cuda")
    k, v = views(kv_cache, head_size)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise _refuse(f"KV cache strides {kv_cache.stride()}: head_size elements are not contiguous")
    nb, bs, heads, _ = k.shape
    block, token, head = _strides(k)
    return KvCache(k=k.data_ptr(), v=v.data_ptr(), dtype=DTYPE[dtype], layout=LAYOUT["nhd"],
                   device=DEVICE[kv_cache.device.type], num_blocks=nb, block_size=bs, num_kv_heads=heads,
                   head_dim=head_size, block_stride=block, token_stride=token, head_stride=head)


def like(kv_cache, num_blocks: int, num_kv_heads: int | None = None):
    """A zeroed cache of `num_blocks` blocks with the same physical order as `kv_cache` (the
    self-check's probe: the engine's own cache is never written)."""
    import torch

    order = sorted(range(4), key=lambda i: (-kv_cache.stride(i), i))  # outermost first
    shape = list(kv_cache.shape)
    shape[0] = num_blocks
    if num_kv_heads is not None:
        shape[1] = num_kv_heads
    physical = torch.zeros([shape[i] for i in order], dtype=kv_cache.dtype, device=kv_cache.device)
    return physical.permute(*[order.index(i) for i in range(4)])


def vllm_writer(backend: str):
    """vLLM's cache-write op of `backend`, as `write(key, value, k_view, v_view, slot_mapping)`
    (what its `do_kv_cache_update` calls). Needs vLLM's CUDA ops."""
    import torch

    if backend == "TRITON_ATTN":
        from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash as op
    else:
        from vllm._custom_ops import reshape_and_cache_flash as op

    def write(key, value, k_view, v_view, slot_mapping) -> None:
        one = torch.ones((), dtype=torch.float32, device=key.device)
        op(key, value, k_view, v_view, slot_mapping, "auto", one, one)

    return write


# Block selection (`[selection]`, `selection.py`): FLASH_ATTN and TRITON_ATTN read the layer's
# `block_table` and `seq_lens` in every forward, so a layer reads its selection from a copy of the
# metadata with both replaced. FLASHINFER plans its native decode once per step for every layer
# (its wrapper holds the page indices), so it is refused by name.
SELECTION_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")


def selection_state(impl, layer, md, seq_lens, dtype):
    """Nothing to rebuild per step: FLASH_ATTN's ahead-of-time scheduler metadata (FA3) was made
    for the full lengths, so the copy drops it and the kernel schedules the reduced ones itself;
    TRITON_ATTN has none."""
    return None


def with_selection(md, block_table, seq_lens, state):
    """A copy of the step's metadata that reads `block_table` for `seq_lens`; the fields that
    place queries by position must be unset (prefix-LM ranges, R-SWA), else ValueError (the layer
    then reads every block)."""
    for name in ("mm_prefix_query_range_tensor", "mm_prefix_range_tensor", "rswa_prefix_lens"):
        if getattr(md, name, None) is not None:
            raise ValueError(f"the step's attention metadata sets {name}, which places queries by position")
    changes = {"block_table": block_table, "seq_lens": seq_lens}
    if getattr(md, "scheduler_metadata", None) is not None:
        changes["scheduler_metadata"] = None
    return dataclasses.replace(md, **changes)
