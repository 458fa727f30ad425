"""vLLM's CPU KV-cache packing, probed with vLLM's own write op and mapped to a kvsieve layout.

vLLM's CPU attention (CPU_ATTN, vLLM 0.32) keeps one tensor per layer shaped
`[num_blocks, num_kv_heads, block_size, 2 * head_dim]` whose inner packing depends on the ISA
vLLM picks at start-up (`_get_attn_isa`). kvsieve never assumes that packing: `verify_layout`
writes one-hot tokens through `cpu_attn_reshape_and_cache`, finds where each element landed,
and compares with kvsieve's own addressing (`kvs_kv_cache_offset`). A packing that was not
probed is refused with an error naming the ISA.
"""

from __future__ import annotations

from .lib import DEVICE, DTYPE, LAYOUT, KvCache, KvsieveError, Library

# ISA -> (kvsieve layout, dtypes probed for it).
SUPPORTED = {
    "vec": ("vllm_cpu_vec", ("float32", "bfloat16")),
    "amx": ("vllm_cpu_amx", ("bfloat16",)),
}


def _torch_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def vllm_isa(dtype, block_size: int, head_dim: int, kv_cache_dtype: str = "auto") -> str:
    """The ISA vLLM's CPU attention picks for these settings."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)


def kvsieve_layout_for(isa: str, dtype) -> str:
    """The kvsieve layout name for a vLLM CPU ISA and dtype, or KvsieveError if not probed."""
    name = _torch_name(dtype)
    entry = SUPPORTED.get(isa)
    if entry is None or name not in entry[1]:
        known = ", ".join(f"{i} ({'/'.join(d)})" for i, (_, d) in SUPPORTED.items())
        raise KvsieveError(
            "KVS_STATUS_UNSUPPORTED",
            f"vLLM's CPU attention picked ISA {isa!r} for {name}; kvsieve has probed only: {known}. "
            "Use a block_size that is a multiple of 32 and a head_dim that is a multiple of 32.",
        )
    return entry[0]


def probe_positions(dtype, block_size: int, head_dim: int, num_kv_heads: int, isa: str, block: int = 1):
    """{(kind, head, slot, d): flat element index} where vLLM writes K (kind 0) / V (kind 1)
    element (head, slot, d) of `block` in a `[block + 1, heads, block_size, 2 * head_dim]` tensor.
    Values 1..head_dim are exact in every dtype, so each element is found unambiguously."""
    import torch
    import vllm._custom_ops as ops

    nb = block + 1
    codes = torch.arange(1, head_dim + 1, dtype=torch.float32).to(dtype)
    found = {}
    for kind in (0, 1):
        for head in range(num_kv_heads):
            for slot in range(block_size):
                kv = torch.zeros(nb, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
                k_cache, v_cache = kv.view(nb, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
                key = torch.zeros(1, num_kv_heads, head_dim, dtype=dtype)
                val = torch.zeros_like(key)
                (key if kind == 0 else val)[0, head] = codes
                mapping = torch.tensor([block * block_size + slot], dtype=torch.int64)
                ops.cpu_attn_reshape_and_cache(key, val, k_cache, v_cache, mapping, isa,
                                               k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
                flat = kv.reshape(-1).float()
                idx = torch.nonzero(flat).flatten()
                if len(idx) != head_dim:
                    raise KvsieveError("KVS_STATUS_UNSUPPORTED",
                                       f"vLLM wrote {len(idx)} elements for one {head_dim}-wide row")
                for i in idx.tolist():
                    found[(kind, head, slot, int(flat[i].item()) - 1)] = i
    return found


def verify_layout(lib: Library, dtype, block_size: int, head_dim: int, num_kv_heads: int = 2) -> str:
    """Probe vLLM's packing for these settings and check kvsieve addresses every element of a
    block the same way. Returns the kvsieve layout name; raises KvsieveError on any mismatch."""
    isa = vllm_isa(dtype, block_size, head_dim)
    layout = kvsieve_layout_for(isa, dtype)
    block = 1
    positions = probe_positions(dtype, block_size, head_dim, num_kv_heads, isa, block)
    # kvsieve's descriptor of the same tensor (the address is never dereferenced here).
    desc = KvCache(k=1 << 20, v=None, dtype=DTYPE[_torch_name(dtype)], layout=LAYOUT[layout],
                   device=DEVICE["cpu"], num_blocks=block + 1, block_size=block_size, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, block_stride=0, token_stride=0, head_stride=0)
    for (kind, head, slot, d), where in positions.items():
        ours = lib.kv_cache_offset(desc, kind, block, head, slot, d)
        if ours != where:
            raise KvsieveError(
                "KVS_STATUS_UNSUPPORTED",
                f"{layout} ({isa}, {_torch_name(dtype)}): {'KV'[kind]}[block {block}][head {head}]"
                f"[slot {slot}][d {d}] is element {where} in vLLM but {ours} in kvsieve",
            )
    return layout



def verify_flash_layout(lib: Library, kv_cache, head_size: int, write, num_kv_heads: int = 2) -> None:
    """The start-up self-check of the GPU backends' layout (`backends.flash_layout`), run on a
    probe tensor of two blocks with the same physical order, device and dtype as the engine's
    `kv_cache` (which is never written): for each (K or V, head, slot) of block 1, `write` (the
    backend's own cache-write op) stores codes 1..head_size into a zeroed probe, and exactly
    those elements must be non-zero, each where kvsieve's descriptor of the probe addresses it.
    Raises KvsieveError naming the first element that disagrees."""
    import torch

    from .backends import flash_layout

    heads = min(num_kv_heads, kv_cache.shape[1])
    probe = flash_layout.like(kv_cache, 2, heads)
    desc = flash_layout.describe(probe, head_size)
    k_view, v_view = flash_layout.views(probe, head_size)
    bs, dev, dtype = probe.shape[2], probe.device, probe.dtype
    esize, base = probe.element_size(), probe.untyped_storage().data_ptr()
    flat = torch.as_strided(probe, (probe.untyped_storage().nbytes() // esize,), (1,), 0)
    codes = torch.arange(1, head_size + 1, dtype=torch.float32, device=dev).to(dtype)
    want = torch.arange(1, head_size + 1, dtype=torch.float32)
    for kind, ptr in ((0, desc.k), (1, desc.v)):
        start = (ptr - base) // esize
        for head in range(heads):
            for slot in range(bs):
                probe.zero_()
                key = torch.zeros(1, heads, head_size, dtype=dtype, device=dev)
                value = torch.zeros_like(key)
                (key if kind == 0 else value)[0, head] = codes
                write(key, value, k_view, v_view, torch.tensor([bs + slot], dtype=torch.int64, device=dev))
                where = [start + lib.kv_cache_offset(desc, kind, 1, head, slot, d) for d in range(head_size)]
                got = flat[torch.tensor(where, device=dev)].float().cpu()
                written = int((flat != 0).sum())
                if not torch.equal(got, want) or written != head_size:
                    d = int((got != want).nonzero().flatten()[0]) if not torch.equal(got, want) else 0
                    raise KvsieveError(
                        "KVS_STATUS_UNSUPPORTED",
                        f"KV cache layout self-check: {'KV'[kind]}[block 1][head {head}][slot {slot}][d {d}] holds "
                        f"{got[d].item():g} where kvsieve's descriptor (strides block {desc.block_stride}, token "
                        f"{desc.token_stride}, head {desc.head_stride}) expects {d + 1}, and the write set {written} "
                        f"elements for {head_size}; kvsieve refuses this layout (cache strides "
                        f"{tuple(kv_cache.stride())})")
