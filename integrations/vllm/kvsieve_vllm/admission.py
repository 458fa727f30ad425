"""Sizing vLLM's KV space by what a request will hold, not by `max_model_len`.

vLLM refuses to start when the KV space cannot hold one request of `max_model_len` tokens
(`_check_enough_kv_cache_memory`, in `kv_cache_utils` up to vLLM 0.32, `kv_cache_planning` from
0.33). When kvsieve's config bounds every request
(a `[prefill]` and a `[decode]` section, no opt-out, own budgets capped by `[requests]`), the
library gives the most tokens one request can hold at once (`kvs_config_max_cached_tokens`:
budget + one prefill chunk + one block + interval), and the check runs for that many tokens
instead: prompts longer than the whole KV space are then served, prefilled chunk by chunk and
compressed between chunks. Admission likewise: vLLM admits a request only when its whole
prompt fits the free blocks (`scheduler_reserve_full_isl`, on by default); under a bounding
config the gate asks for the blocks of `min(prompt, bound)` instead. With any phase unbounded
both checks are vLLM's own.
"""

from __future__ import annotations

import importlib.util
import logging
import math

from .settings import settings

logger = logging.getLogger("vllm.kvsieve")

def kv_check_module(has_module) -> str:
    """Where vLLM keeps (and its callers read) the start-up check of the KV space, given
    `has_module(name)`: `kv_cache_planning` from 0.33, `kv_cache_utils` before."""
    return "vllm.v1.core.kv_cache_planning" if has_module("vllm.v1.core.kv_cache_planning") else \
        "vllm.v1.core.kv_cache_utils"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # no vLLM at all (kvsieve-check, the library alone)
        return False


KV_CHECK_MODULE = kv_check_module(_importable)


def _vllm_config(get_needed_memory):
    """The VllmConfig vLLM bound into the check's memory function (a functools.partial)."""
    from vllm.config import VllmConfig

    for arg in getattr(get_needed_memory, "args", ()):
        if isinstance(arg, VllmConfig):
            return arg
    return None


def bound_tokens(vllm_config, max_model_len: int) -> int:
    """The most tokens one request holds under kvsieve's config (max_model_len when unbounded)."""
    sched = vllm_config.scheduler_config
    chunk = sched.max_num_batched_tokens if sched.enable_chunked_prefill else max_model_len
    bs = vllm_config.cache_config.block_size
    return min(max_model_len, settings().config.max_cached_tokens(max_model_len, chunk, bs))


def wrap_check_enough_kv_cache_memory(orig):
    def _check_enough_kv_cache_memory(available_memory, get_needed_memory, max_model_len, *args, **kwargs):
        cfg = _vllm_config(get_needed_memory)
        bound = bound_tokens(cfg, max_model_len) if cfg is not None else max_model_len
        if bound >= max_model_len:
            return orig(available_memory, get_needed_memory, max_model_len, *args, **kwargs)
        bs = cfg.cache_config.block_size
        full, held = math.ceil(max_model_len / bs), math.ceil(bound / bs)
        logger.info("kvsieve: every request holds at most %d tokens (config %s), so the KV space must hold %d "
                    "tokens of one request, not max_model_len = %d", bound, settings().path, bound, max_model_len)
        return orig(available_memory, lambda: get_needed_memory() * held // full, bound, *args, **kwargs)

    return _check_enough_kv_cache_memory


def install_admission_bound(sched) -> None:
    """Called when kvsieve's Scheduler starts: the bound its KV cache manager admits by."""
    cfg = sched.vllm_config
    bound = bound_tokens(cfg, cfg.model_config.max_model_len)
    if bound < cfg.model_config.max_model_len:
        sched.kv_cache_manager._kvsieve_bound = bound


def wrap_allocate_slots(orig):
    def allocate_slots(self, request, num_new_tokens, *args, **kwargs):
        bound = self.__dict__.get("_kvsieve_bound")
        if bound and kwargs.get("full_sequence_must_fit") and request.num_tokens > bound:
            # The full-prompt admission gate, for what the request will hold at most.
            mgr = self.coordinator.single_type_managers[0]
            held = sum(not b.is_null for b in mgr.req_to_blocks.get(request.request_id, []))
            need = math.ceil(bound / mgr.block_size) - held
            if need > self.block_pool.get_num_free_blocks():
                return None
            kwargs["full_sequence_must_fit"] = False
        return orig(self, request, num_new_tokens, *args, **kwargs)

    return allocate_slots
