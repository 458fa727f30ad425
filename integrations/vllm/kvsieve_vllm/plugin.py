"""The vLLM plugin entry point: `register()` patches a stock vLLM 0.32 (v1 engine, V1 model
runner) so that each request's KV cache is compressed when its prefill ends, without a fork.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts.
It does nothing unless KVSIEVE_CONFIG names a kvsieve TOML file. When enabled it checks first
that every name it patches exists and that the setup is one it supports, and only then patches,
so it never half-patches. The patched functions live in `scheduler` (Scheduler.schedule),
`worker` (the model runner) and `backends.cpu_attn` (the attention forward); DESIGN.md §5.
"""

from __future__ import annotations

import logging
import os

from . import settings as _settings_mod
from .backends import cpu_attn
from .checks import UnsupportedSetup, check_version
from .lib import PHASE_DECODE, PHASE_PREFILL
from .scheduler import wrap_schedule
from .settings import Settings
from .stats import stats
from .worker import wrap_execute_model, wrap_prepare_inputs, wrap_update_states

logger = logging.getLogger("vllm.kvsieve")

# (module, class, attribute) of everything patched, with its wrapper factory; a test asserts
# every name exists.
PATCHES = {
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"): wrap_schedule,
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_update_states"): wrap_update_states,
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs"): wrap_prepare_inputs,
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model"): wrap_execute_model,
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "forward"): cpu_attn.wrap_forward,
}
PATCHED = list(PATCHES)
RELIED_UPON = [
    ("vllm.v1.core.block_pool", "BlockPool", "free_blocks"),
    ("vllm.v1.core.block_pool", "BlockPool", "_maybe_evict_cached_block"),
    ("vllm.v1.worker.block_table", "BlockTable", "compute_slot_mapping"),
    ("vllm.v1.worker.block_table", "MultiGroupBlockTable", "add_row"),
    ("vllm.model_executor.models.utils", "extract_layer_index", "__call__"),
]

_registered = False

__all__ = ["PATCHED", "RELIED_UPON", "UnsupportedSetup", "check_names", "register", "stats"]


def _resolve(module: str, cls: str, attr: str):
    import importlib

    try:
        owner = getattr(importlib.import_module(module), cls)
        getattr(owner, attr)
    except (ImportError, AttributeError) as e:
        raise UnsupportedSetup(f"{module}.{cls}.{attr} is missing ({e}); kvsieve is mapped on vLLM 0.32") from e
    return owner


def check_names() -> None:
    """Every name kvsieve patches or relies on exists (raises UnsupportedSetup otherwise)."""
    for entry in PATCHED + RELIED_UPON:
        _resolve(*entry)


def register() -> None:
    """vLLM's plugin entry point: inert without KVSIEVE_CONFIG, idempotent, all-or-nothing."""
    global _registered
    path = os.environ.get("KVSIEVE_CONFIG")
    if not path or _registered:
        return
    check_version()
    check_names()
    new_settings = Settings(path)  # loads the library and validates the config first
    owners = {entry: _resolve(*entry) for entry in PATCHED}
    for entry, owner in owners.items():
        orig = getattr(owner, entry[2])
        wrapped = PATCHES[entry](orig)
        wrapped.__wrapped__ = orig
        wrapped.__kvsieve__ = True
        setattr(owner, entry[2], wrapped)
    _settings_mod.install(new_settings)
    _registered = True
    logger.info("kvsieve %s enabled (%s, prefill policy %s, decode policy %s)", new_settings.lib.version, path,
                new_settings.policy[PHASE_PREFILL], new_settings.policy[PHASE_DECODE])
