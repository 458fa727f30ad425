"""Checks of the GPU backends' layout (`kvsieve_vllm.backends.flash_layout`) that run on any
torch device: the CPU tests (`test_gpu_layouts.py`) and, on a GPU machine that may have PyTorch
but no vLLM and no pytest, `scripts/torch_adapter_check.py`. Each check raises AssertionError or KvsieveError.

Caches come from vLLM's own allocation code (`create_kv_cache_views`, every `KVCacheLayout`)
where vLLM is installed, else from the two orders FlashInfer names (NHD `[blocks, tokens,
heads, C]`, HND `[blocks, heads, tokens, C]`) permuted to vLLM's logical `[blocks, heads,
tokens, 2 * head_size]` view. Writes use vLLM's `reshape_and_cache_flash` where its CUDA op is
available, else that op's indexing in torch (`write_like_vllm`).
"""

from __future__ import annotations

import math

from kvsieve_vllm.backends import flash_layout
from kvsieve_vllm.layout import verify_flash_layout
from kvsieve_vllm.lib import DEVICE, CpuKernels, CudaKernels, Sequence, TokenSelect, load

BS, HEADS, HEAD, BLOCKS, LAYERS = 16, 2, 64, 12, 2


def layouts() -> list[str]:
    """Names of the physical orders to check: vLLM's KVCacheLayout members, or NHD and HND."""
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout

        return [x.name for x in KVCacheLayout]
    except ImportError:
        return ["NHD", "HND"]


def make_caches(layout: str, dtype, device="cpu", heads=HEADS, head=HEAD, blocks=BLOCKS, layers=LAYERS) -> list:
    """Per-layer caches in physical order `layout`, as vLLM's model runner allocates them."""
    import torch

    if layout in ("NHD", "HND"):
        order = (0, 2, 1, 3) if layout == "NHD" else (0, 1, 2, 3)  # physical axes of [B, H, N, C]
        logical = (blocks, heads, BS, 2 * head)
        out = []
        for _ in range(layers):
            phys = torch.zeros([logical[i] for i in order], dtype=dtype, device=device)
            out.append(phys.permute(*[order.index(i) for i in range(4)]))
        return out
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheTensor, compute_layout_strides,
                                            create_kv_cache_views)
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = FullAttentionSpec(block_size=BS, num_kv_heads=heads, head_size=head, dtype=dtype)
    strides = compute_layout_strides(spec, blocks, layers, KVCacheLayout[layout])
    shape = (layers, blocks, heads, BS, 2 * head * torch.finfo(dtype).bits // 8)
    size = max(s * n for s, n in zip(strides, shape))
    tensor = KVCacheTensor(size=size, layers=[f"layer.{i}" for i in range(layers)], layer_stride=strides[0],
                           block_stride=strides[1])
    raw = torch.zeros(size, dtype=torch.int8, device=device)
    return create_kv_cache_views(raw, spec, blocks, KVCacheLayout[layout], tensor)


def write_like_vllm(key, value, k_view, v_view, slot_mapping) -> None:
    """`reshape_and_cache_flash`'s effect: key/value [tokens, heads, head_size] to their slots."""
    bs = k_view.shape[1]
    b, t = slot_mapping // bs, slot_mapping % bs
    k_view[b, t] = key
    v_view[b, t] = value


def writer(device: str):
    """vLLM's own cache-write op on a GPU where vLLM is installed, else `write_like_vllm`;
    returns (write, name)."""
    if device != "cpu":
        try:
            return flash_layout.vllm_writer("FLASH_ATTN"), "vllm reshape_and_cache_flash"
        except ImportError:
            pass
    return write_like_vllm, "torch indexing (reshape_and_cache_flash semantics)"


def kernels_for(device: str):
    lib = load()
    return CpuKernels(lib) if device == "cpu" else CudaKernels(lib, 0, 0)


def check_self_check(layout: str, dtype, device="cpu") -> str:
    """The self-check accepts the layout; the descriptor is vLLM's own K/V views."""
    cache = make_caches(layout, dtype, device)[1]
    write, how = writer(device)
    verify_flash_layout(load(), cache, HEAD, write)
    d = flash_layout.describe(cache, HEAD)
    k, v = flash_layout.views(cache, HEAD)
    assert (d.k, d.v) == (k.data_ptr(), v.data_ptr()) and d.device == DEVICE[cache.device.type]
    assert (d.block_stride, d.token_stride, d.head_stride) == k.stride()[:3], (d.block_stride, k.stride())
    return how


def _fill(cache, rows, lengths, seed: int, write):
    """Random K/V per sequence written slot by slot; logical K, V [heads, tokens, head_size]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k_view, v_view = flash_layout.views(cache, HEAD)
    out = []
    for row, n in zip(rows, lengths):
        key = torch.randn(n, HEADS, HEAD, generator=g).to(cache.dtype).to(cache.device)
        value = torch.randn(n, HEADS, HEAD, generator=g).to(cache.dtype).to(cache.device)
        slots = torch.tensor([row[t // BS] * BS + t % BS for t in range(n)], device=cache.device)
        write(key, value, k_view, v_view, slots)
        out.append((key.transpose(0, 1).clone(), value.transpose(0, 1).clone()))
    return out


def _read(cache, row, n: int):
    """Logical K, V [heads, n, head_size] of the first n positions of a row (vLLM's views)."""
    import torch

    k_view, v_view = flash_layout.views(cache, HEAD)
    idx = torch.tensor(row, device=cache.device)[torch.arange(n, device=cache.device) // BS]
    slot = torch.arange(n, device=cache.device) % BS
    return k_view[idx, slot].transpose(0, 1), v_view[idx, slot].transpose(0, 1)


def check_knorm_compaction(layout: str, into: bool, device="cpu", dtype=None) -> None:
    """Two layers; one 70-token sequence in a scattered row keeps 24 per head by key norm (sink
    4, last 8): keep lists equal torch's ranking (lowest norms kept), and after compaction each
    head's first 24 positions hold exactly its kept K and V, bitwise; another sequence's blocks
    are untouched. In place, or into fresh blocks (the row then only read)."""
    import torch

    dtype = dtype or torch.bfloat16
    lib, kernels = load(), kernels_for(device)
    write, _ = writer(device)
    caches = make_caches(layout, dtype, device)
    row, other, n, k, sink, tail = [7, 2, 9, 4, 11], [5, 6], 70, 24, 4, 8
    dest = [0, 1] if into else None
    params = lib.config_from_str('[sparsity]\npolicy = "knorm"\nbudget_tokens = 24\nsink_tokens = 4\n'
                                 'recent_tokens = 8\n').params()
    for layer, cache in enumerate(caches):
        (key, value), (okey, ovalue) = _fill(cache, [row, other], [n, 20], layer, write)
        desc = flash_layout.describe(cache, HEAD)
        rows = torch.tensor(row, dtype=torch.int32, device=device)
        seq = Sequence(row=rows.data_ptr(), row_len=len(row), cached_len=n, protected_len=0)
        sel = TokenSelect(cached_len=n, protected_len=0, sink_tokens=sink, protected_tail=tail, selected=k)
        scores = torch.zeros(HEADS * n, dtype=torch.float32, device=device)
        keep = torch.zeros(HEADS * k, dtype=torch.int32, device=device)
        kernels.select(desc, seq, "knorm", params, sel, None, scores, keep)
        if device != "cpu":
            kernels.synchronize()
        keep = keep.view(HEADS, k)
        for h in range(HEADS):
            norms = key[h, sink:n - tail].double().norm(dim=-1).cpu()
            top = torch.sort(norms, stable=True).indices[:k - sink - tail] + sink
            want = torch.cat([torch.arange(sink), torch.sort(top).values, torch.arange(n - tail, n)])
            assert torch.equal(keep[h].long().cpu(), want), (layout, layer, h, keep[h].tolist(), want.tolist())
        if into:
            d = torch.tensor(dest, dtype=torch.int32, device=device)
            kernels.compact_into(desc, seq, keep.data_ptr(), keep.numel(), k, d.data_ptr(), len(dest))
            if device != "cpu":
                kernels.synchronize()
            got_k, got_v = _read(cache, dest, k)
            assert all(torch.equal(a, b) for a, b in zip(_read(cache, row, n), (key, value))), "row written"
        else:
            released = torch.zeros(len(row), dtype=torch.int32, device=device)
            got = kernels.compact(desc, seq, keep.data_ptr(), keep.numel(), k, released.data_ptr(), released.numel())
            assert got == len(row) - math.ceil(k / BS), got
            got_k, got_v = _read(cache, row, k)
        for h in range(HEADS):
            idx = keep[h].long()
            assert torch.equal(got_k[h], key[h, idx]) and torch.equal(got_v[h], value[h, idx]), (layout, layer, h)
        assert all(torch.equal(a, b) for a, b in zip(_read(cache, other, 20), (okey, ovalue))), "other blocks"


def check_window_hook(device="cpu") -> None:
    """The window hook on a GPU backend's forward records the asked rows of the query into a
    float32 buffer on the query's own device, one per layer."""
    from types import SimpleNamespace

    import torch

    from kvsieve_vllm import capture

    calls = []
    hooked = flash_layout.wrap_forward(lambda self, layer, query, *a, **kw: calls.append(query.shape) or "out")
    w = capture.Windows()
    w.windows["r"] = capture.Window(start=100, end=132)
    w.rows = [("r", 5, 20, 12)]  # batch rows 5..24 are window positions 112..131
    query = torch.randn(40, 4, HEAD, dtype=torch.bfloat16, device=device)
    capture.ACTIVE = w
    try:
        assert hooked(None, SimpleNamespace(layer_name="model.layers.0.attn"), query) == "out"
    finally:
        capture.ACTIVE = None
    buf = w.windows["r"].layers["model.layers.0.attn"]
    assert buf.device == query.device and buf.dtype == torch.float32 and tuple(buf.shape) == (32, 4, HEAD)
    assert torch.equal(buf[12:32], query[5:25].float()) and not buf[:12].any() and calls == [query.shape]
