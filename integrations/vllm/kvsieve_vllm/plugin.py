"""The vLLM plugin: `register()` patches a stock vLLM 0.32 (v1 engine, V1 model runner) so that
each request's KV cache is compressed when its prefill ends, without a fork.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts.
It does nothing unless KVSIEVE_CONFIG names a kvsieve TOML file. When enabled it checks first
that every name it patches exists and that the setup is one it supports, and only then patches,
so it never half-patches. What it patches (DESIGN.md §5):

- `Scheduler.schedule`: the scheduler decides every compression event. After vLLM schedules a
  step, each scheduled request whose prefill ends in it (or, with `[decode]`, whose decode
  re-compression falls due in it) is planned (`kvs_plan_keep_count`); an event that releases
  blocks fixes the request's protected prefix (its leading blocks shared with other requests
  through the prefix cache, never rewritten), removes the blocks it will rewrite from the
  prefix cache and stops caching the request's later blocks, so no request ever reads
  rewritten KV through the cache. The event rides on the `SchedulerOutput` to the workers.
  Before vLLM schedules the next step, the block list is rewritten (the evicted positions hold
  the null block, right after the protected prefix, so the non-null blocks in order are the
  physical row) and the released blocks go back to vLLM's block pool. The list keeps its
  logical length, so vLLM's own allocation accounting needs no change.
- `GPUModelRunner._update_states` (shared by `CPUModelRunner`): installs those rows and
  offsets; forgets offsets of new, resumed (recomputing) and finished requests.
- `GPUModelRunner._prepare_inputs`: positions stay logical (RoPE); slot mapping and sequence
  lengths use `position - offset`.
- `CPUAttentionBackendImpl.forward`: for SnapKV, records the queries of each request's last
  `window` prompt positions, in whichever prefill chunks hold them.
- `GPUModelRunner.execute_model`: after the forward of a step, runs the events the scheduler
  attached to it: scores, selects and compacts each layer's KV in place with libkvsieve. The
  scheduler frees the tail blocks at its next `schedule`, after the data has moved; both sides
  derive the kept count from the same lengths (`kvs_plan_keep_count`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

from .lib import PHASE_DECODE, PHASE_PREFILL, POLICY_NAMES, KvsieveError, load

logger = logging.getLogger("vllm.kvsieve")

MAPPED_VERSION_PREFIX = "0.32."
# (module, class, attribute) of everything patched or relied upon; a test asserts they exist.
PATCHED = [
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_update_states"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "forward"),
]
RELIED_UPON = [
    ("vllm.v1.core.block_pool", "BlockPool", "free_blocks"),
    ("vllm.v1.core.block_pool", "BlockPool", "_maybe_evict_cached_block"),
    ("vllm.v1.worker.block_table", "BlockTable", "compute_slot_mapping"),
    ("vllm.v1.worker.block_table", "MultiGroupBlockTable", "add_row"),
    ("vllm.model_executor.models.utils", "extract_layer_index", "__call__"),
]
PLUGIN_POLICIES = ("streaming", "knorm", "snapkv")
LOG_EVERY_STEPS = 100

_registered = False


class UnsupportedSetup(KvsieveError):
    """vLLM (version, runner, backend, model or options) is not one kvsieve has mapped."""

    def __init__(self, message: str):
        super().__init__("KVS_STATUS_UNSUPPORTED", "kvsieve cannot run on this vLLM setup: " + message)


@dataclass
class Stats:
    """Aggregate counters of one process (worker or scheduler side)."""

    compressions: int = 0
    tokens_before: int = 0
    tokens_evicted: int = 0
    blocks_released: int = 0
    seconds: float = 0.0
    per_request: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        ratio = (self.tokens_before - self.tokens_evicted) / self.tokens_before if self.tokens_before else 1.0
        return {
            "compressions": self.compressions,
            "tokens_before": self.tokens_before,
            "tokens_evicted": self.tokens_evicted,
            "blocks_released": self.blocks_released,
            "kept_ratio": ratio,
            "seconds_in_kvsieve": self.seconds,
            "per_request": dict(self.per_request),
        }


SCHEDULER_STATS = Stats()
WORKER_STATS = Stats()


def stats() -> dict:
    """Counters of this process: `scheduler` (blocks released back to vLLM) and `worker` (tokens
    evicted and compaction time). In vLLM's in-process mode both live here."""
    return {"scheduler": SCHEDULER_STATS.as_dict(), "worker": WORKER_STATS.as_dict()}


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


def _check_version() -> None:
    import vllm

    if not vllm.__version__.startswith(MAPPED_VERSION_PREFIX):
        raise UnsupportedSetup(f"vLLM {vllm.__version__}; kvsieve's hooks are mapped on vLLM 0.32.x")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "", "false", "False"):
        raise UnsupportedSetup("VLLM_USE_V2_MODEL_RUNNER is set; only the V1 model runner is mapped "
                               "(set VLLM_USE_V2_MODEL_RUNNER=0)")


def _check_engine(vllm_config) -> None:
    """Options decided at engine start that this version does not support."""
    if vllm_config.speculative_config is not None:
        raise UnsupportedSetup("speculative decoding is enabled; kvsieve does not support it yet")
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        raise UnsupportedSetup("asynchronous scheduling is enabled; the release of blocks is "
                               "mapped for synchronous scheduling only")
    hf = vllm_config.model_config.hf_config
    if getattr(hf, "alibi", False) or "alibi" in str(getattr(hf, "position_embedding_type", "")):
        raise UnsupportedSetup("the model applies ALiBi position biases at attention time")


class _Settings:
    """The loaded library and config of this process (one per process, made at register)."""

    def __init__(self, path: str):
        self.path = path
        self.lib = load()
        self.config = self.lib.config_from_file(path)
        self.params = {PHASE_PREFILL: self.config.params(PHASE_PREFILL),
                       PHASE_DECODE: self.config.params(PHASE_DECODE)}
        policy = POLICY_NAMES[self.params[PHASE_PREFILL].policy]
        if policy not in PLUGIN_POLICIES:
            raise UnsupportedSetup(f"{path}: sparsity.policy = {policy!r} is not driven by the vLLM plugin yet; "
                                   f"use one of {', '.join(PLUGIN_POLICIES)}")
        self.policy = {PHASE_PREFILL: policy, PHASE_DECODE: POLICY_NAMES[self.params[PHASE_DECODE].policy]}


_settings: _Settings | None = None


def settings() -> _Settings:
    assert _settings is not None, "kvsieve_vllm.register() has not enabled kvsieve in this process"
    return _settings


# ---------------------------------------------------------------------------------------------
# Scheduler side.


@dataclass
class _ReqState:
    at_len: int  # num_computed_tokens when the last event was planned
    offset: int = 0  # evicted tokens (logical - cached)
    protected: int = 0  # leading cached tokens never rewritten (frozen at the first event)
    frozen: bool = False
    pending: object = None  # the plan of an event announced to the workers, applied next step


# Never cache a compressed request's later blocks: its cached tokens no longer sit at the
# positions their prefix-cache hashes describe.
_NEVER_CACHE = 1 << 62


def _scheduler_schedule(orig):
    def schedule(self, *args, **kwargs):
        st = self.__dict__.get("_kvsieve")
        if st is None:
            _check_engine(self.vllm_config)
            mgrs = self.kv_cache_manager.coordinator.single_type_managers
            if len(mgrs) != 1:
                raise UnsupportedSetup(f"{len(mgrs)} KV cache groups; kvsieve maps a single full-attention group")
            st = self._kvsieve = {"reqs": {}, "steps": 0}
        t0 = time.perf_counter()
        changed = _apply_pending(self, st["reqs"])
        SCHEDULER_STATS.seconds += time.perf_counter() - t0
        out = orig(self, *args, **kwargs)
        t0 = time.perf_counter()
        mgr = self.kv_cache_manager.coordinator.single_type_managers[0]
        out.kvsieve_rows = {
            rid: ([b.block_id for b in mgr.req_to_blocks[rid] if not b.is_null], st["reqs"][rid].offset)
            for rid in changed if rid in mgr.req_to_blocks
        }
        out.kvsieve_events = _announce_events(self, st["reqs"], out)
        SCHEDULER_STATS.seconds += time.perf_counter() - t0
        st["steps"] += 1
        if st["steps"] % LOG_EVERY_STEPS == 0 and SCHEDULER_STATS.compressions:
            s = SCHEDULER_STATS.as_dict()
            logger.info("kvsieve: %d compressions, %d blocks released, kept %.1f%% of %d tokens",
                        s["compressions"], s["blocks_released"], 100 * s["kept_ratio"], s["tokens_before"])
        return out

    return schedule


def _shared_prefix_blocks(blocks) -> int:
    """Leading blocks held by another request too (prefix-cache hits share whole prefixes)."""
    n = 0
    while n < len(blocks) and not blocks[n].is_null and blocks[n].ref_cnt > 1:
        n += 1
    return n


def _announce_events(sched, reqs: dict, out) -> dict:
    """After vLLM scheduled a step: plan the events that fall due in it. Returns
    {request id: (phase, protected tokens, offset)} for the workers, who run them after the
    step's forward."""
    cfg = settings().config
    mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]
    pool = sched.kv_cache_manager.block_pool
    bs = mgr.block_size
    decode_on = settings().params[PHASE_DECODE].policy != 0
    events = {}
    for rid in out.num_scheduled_tokens:
        req = sched.requests.get(rid)
        if req is None:
            continue
        length = req.num_computed_tokens  # already advanced by this step's schedule
        s = reqs.get(rid)
        if s is not None and length < s.at_len:
            del reqs[rid]  # preempted and recomputing from scratch: plan again
            s = None
        if s is None:
            if length != req.num_prompt_tokens:
                continue
            phase = PHASE_PREFILL
            s = reqs[rid] = _ReqState(at_len=length)
        elif decode_on and length > s.at_len and s.pending is None:
            phase = PHASE_DECODE
            s.at_len = length
        else:
            continue
        blocks = mgr.req_to_blocks.get(rid, [])
        protected = s.protected if s.frozen else min(_shared_prefix_blocks(blocks) * bs, length - s.offset)
        plan = cfg.plan(length, length - s.offset, protected, bs, phase)
        if plan.released_blocks == 0:
            continue
        if not s.frozen:
            s.protected, s.frozen = protected, True
            mgr.num_cached_block[rid] = _NEVER_CACHE
        # Blocks from the protected prefix on are rewritten by this event: out of the prefix
        # cache before any later schedule can hit them.
        for b in blocks[protected // bs:]:
            if not b.is_null:
                pool._maybe_evict_cached_block(b)
        s.pending = (phase, plan)
        events[rid] = (phase, protected, s.offset)
    return events


def _apply_pending(sched, reqs: dict) -> set:
    """Before vLLM schedules: rewrite the block lists of the events the workers ran after the
    last step and free the released blocks. Returns the request ids whose rows changed."""
    mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]
    pool = sched.kv_cache_manager.block_pool
    bs = mgr.block_size
    running = {q.request_id for q in sched.running}
    changed = set()
    for rid in list(reqs):
        s = reqs[rid]
        if rid not in sched.requests:
            del reqs[rid]  # finished or aborted: vLLM freed its blocks
            continue
        if s.pending is None:
            continue
        _phase, plan = s.pending
        s.pending = None
        if rid not in running or rid not in mgr.req_to_blocks:
            continue  # preempted before the rewrite: it recomputes from scratch
        blocks = mgr.req_to_blocks[rid]
        pb, nulls = s.protected // bs, s.offset // bs
        physical = blocks[:pb] + blocks[pb + nulls:]
        cached = s.at_len - s.offset
        old, new = math.ceil(cached / bs), math.ceil(plan.kept_tokens / bs)
        if (any(not b.is_null for b in blocks[pb:pb + nulls]) or len(physical) < old
                or any(b.is_null for b in physical)):
            raise KvsieveError("KVS_STATUS_INVALID_ARGUMENT",
                               f"request {rid}: block list ({len(blocks)} entries, {pb} protected, {nulls} "
                               f"null) does not hold {cached} cached tokens; the engine state is not what "
                               "kvsieve expects")
        released = physical[new:old]
        mgr.req_to_blocks[rid] = (physical[:pb] + [pool.null_block] * (nulls + len(released))
                                  + physical[pb:new] + physical[old:])
        pool.free_blocks(reversed(released))
        s.offset += int(plan.evicted_tokens)
        SCHEDULER_STATS.compressions += 1
        SCHEDULER_STATS.tokens_before += cached
        SCHEDULER_STATS.tokens_evicted += int(plan.evicted_tokens)
        SCHEDULER_STATS.blocks_released += len(released)
        entry = SCHEDULER_STATS.per_request.setdefault(
            rid, {"events": 0, "tokens_evicted": 0, "blocks_released": 0, "protected_tokens": s.protected})
        entry["events"] += 1
        entry["tokens_evicted"] += int(plan.evicted_tokens)
        entry["blocks_released"] += len(released)
        changed.add(rid)
    return changed


# ---------------------------------------------------------------------------------------------
# Worker side.


def _offsets(runner) -> dict:
    return runner.__dict__.setdefault("_kvsieve_offsets", {})


def _runner_update_states(orig):
    def _update_states(self, scheduler_output):
        ret = orig(self, scheduler_output)
        offs = _offsets(self)
        forget = set(scheduler_output.finished_req_ids)
        forget |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        forget |= {r.req_id for r in scheduler_output.scheduled_new_reqs}
        for rid in forget:
            offs.pop(rid, None)
        for rid, (row, offset) in (getattr(scheduler_output, "kvsieve_rows", None) or {}).items():
            state = self.requests.get(rid)
            if state is None:
                continue
            state.block_ids = (list(row),)
            idx = self.input_batch.req_id_to_index.get(rid)
            if idx is not None:
                self.input_batch.block_table.add_row((list(row),), idx)
            offs[rid] = offset
        return ret

    return _update_states


def _runner_prepare_inputs(orig):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = orig(self, scheduler_output, num_scheduled_tokens)
        _plan_capture(self, num_scheduled_tokens)
        offs = _offsets(self)
        if not offs:
            return out
        import torch

        num_reqs = self.input_batch.num_reqs
        per_req = torch.tensor([offs.get(r, 0) for r in self.input_batch.req_ids[:num_reqs]], dtype=torch.int64)
        if not bool(per_req.any()):
            return out
        total = scheduler_output.total_num_scheduled_tokens
        self.seq_lens[:num_reqs] -= per_req.to(self.seq_lens.dtype)
        self.optimistic_seq_lens_cpu[:num_reqs] -= per_req.to(self.optimistic_seq_lens_cpu.dtype)
        req_idx = self.req_indices.gpu[:total].to(torch.int64)
        physical = self.positions[:total] - per_req[req_idx].to(self.positions.dtype)
        self.input_batch.block_table.compute_slot_mapping(num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical)
        return out

    return _prepare_inputs


# SnapKV's observation window: the queries of each request's last `window` prompt positions,
# captured from the attention forward of whichever steps (prefill chunks) hold them.
# _CAPTURE["plan"]: this step's [(request id, first batch token, count, first window slot)];
# _CAPTURE["queries"][request id][layer index]: float32 [window, q_heads, head_dim].
_CAPTURE: dict = {"plan": [], "queries": {}}


def _plan_capture(runner, num_scheduled_tokens) -> None:
    _CAPTURE["plan"] = []
    s = settings()
    if s.policy[PHASE_PREFILL] != "snapkv":
        return
    window = s.params[PHASE_PREFILL].window
    num_reqs = runner.input_batch.num_reqs
    starts = runner.query_start_loc.np[: num_reqs + 1]
    for i, rid in enumerate(runner.input_batch.req_ids[:num_reqs]):
        state = runner.requests.get(rid)
        if state is None:
            continue
        first = int(runner.input_batch.num_computed_tokens_cpu[i])
        n = int(num_scheduled_tokens[i])
        prompt = len(state.prompt_token_ids or ())
        lo, hi = max(first, prompt - window), min(first + n, prompt)
        if lo < hi:
            _CAPTURE["plan"].append((rid, int(starts[i]) + lo - first, hi - lo, lo - (prompt - window)))


def _attention_forward(orig):
    def forward(self, layer, query, *args, **kwargs):
        if _CAPTURE["plan"]:
            import torch
            from vllm.model_executor.models.utils import extract_layer_index

            index = extract_layer_index(layer.layer_name)
            window = settings().params[PHASE_PREFILL].window
            for rid, start, count, slot in _CAPTURE["plan"]:
                per_layer = _CAPTURE["queries"].setdefault(rid, {})
                buf = per_layer.get(index)
                if buf is None:
                    buf = per_layer[index] = torch.zeros(window, query.shape[1], query.shape[2], dtype=torch.float32)
                buf[slot:slot + count] = query[start:start + count].float()
        return orig(self, layer, query, *args, **kwargs)

    return forward


def _runner_execute_model(orig):
    def execute_model(self, scheduler_output, *args, **kwargs):
        out = orig(self, scheduler_output, *args, **kwargs)
        events = getattr(scheduler_output, "kvsieve_events", None)
        if events:
            t0 = time.perf_counter()
            for rid, (phase, protected, offset) in events.items():
                state = self.requests.get(rid)
                if state is None:
                    continue
                length = state.num_computed_tokens + scheduler_output.num_scheduled_tokens[rid]
                _compact_request(self, rid, phase, length, offset, protected)
            WORKER_STATS.seconds += time.perf_counter() - t0
        for rid in list(_CAPTURE["queries"]):
            state = self.requests.get(rid)
            if state is None or state.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(rid, 0) >= len(
                state.prompt_token_ids or ()
            ):
                del _CAPTURE["queries"][rid]  # prefill over: the window served its event (if any)
        return out

    return execute_model


def _layer_caches(runner):
    caches = [t for t in runner.kv_caches if t is not None]
    if not caches:
        raise UnsupportedSetup("the model runner holds no KV cache tensors")
    for t in caches:
        if t.dim() != 4 or t.device.type != "cpu" or not t.is_contiguous():
            raise UnsupportedSetup(f"KV cache tensor of shape {tuple(t.shape)} on {t.device}; kvsieve maps "
                                   "vLLM's CPU_ATTN cache [num_blocks, kv_heads, block_size, 2*head_dim]")
    return caches


def _compact_request(runner, rid: str, phase: int, length: int, offset: int, protected: int) -> None:
    """Run one event the scheduler announced: plan it again from the same lengths and score,
    select and compact every layer. `length` logical tokens, `offset` of them evicted earlier,
    the first `protected` cached tokens never touched."""
    import torch

    from .layout import kvsieve_layout_for, vllm_isa
    from .lib import DTYPE, LAYOUT, CpuKernels, KvCache, Sequence, TokenSelect

    s = settings()
    caches = _layer_caches(runner)
    nb, heads, bs, two_d = caches[0].shape
    cached = length - offset
    plan = s.config.plan(length, cached, protected, bs, phase)
    if plan.released_blocks == 0:
        raise KvsieveError("KVS_STATUS_PANIC", f"request {rid}: the scheduler announced an event the worker's "
                           f"plan does not release blocks for ({length} tokens, {cached} cached)")
    params, policy = s.params[phase], s.policy[phase]
    dtype = caches[0].dtype
    layout = kvsieve_layout_for(vllm_isa(dtype, bs, two_d // 2), dtype)
    kernels = runner.__dict__.get("_kvsieve_kernels")
    if kernels is None:
        kernels = runner._kvsieve_kernels = CpuKernels(s.lib)
    row = torch.tensor(runner.requests[rid].block_ids[0], dtype=torch.int32)
    seq = Sequence(row=row.data_ptr(), row_len=len(row), cached_len=cached, protected_len=protected)
    k = int(plan.selected_tokens)
    sel = TokenSelect(cached_len=cached, protected_len=protected, sink_tokens=params.sink_tokens,
                      protected_tail=params.protected_tail, selected=k)
    scores = torch.empty(heads * cached, dtype=torch.float32)
    keep = torch.empty(heads * k, dtype=torch.int32)
    released = torch.empty(max(1, len(row)), dtype=torch.int32)
    captured = _CAPTURE["queries"].get(rid, {}) if policy == "snapkv" else {}
    for index, t in enumerate(caches):
        desc = KvCache(k=t.data_ptr(), v=None, dtype=DTYPE[str(dtype).removeprefix("torch.")], layout=LAYOUT[layout],
                       device=0, num_blocks=nb, block_size=bs, num_kv_heads=heads, head_dim=two_d // 2,
                       block_stride=0, token_stride=0, head_stride=0)
        q = None
        if policy == "snapkv":
            q = captured.get(index)
            if q is None:
                raise KvsieveError("KVS_STATUS_PANIC", f"request {rid}: no observation-window queries were captured "
                                   f"for layer {index}")
            q = q.contiguous()
        n = kernels.compress(desc, seq, policy, params, sel, q, scores, keep, released)
        if n != plan.released_blocks:
            raise KvsieveError("KVS_STATUS_PANIC", f"request {rid}: compaction released {n} blocks, plan said "
                               f"{plan.released_blocks}")
    WORKER_STATS.compressions += 1
    WORKER_STATS.tokens_before += cached
    WORKER_STATS.tokens_evicted += int(plan.evicted_tokens)
    WORKER_STATS.blocks_released += int(plan.released_blocks)
    entry = WORKER_STATS.per_request.setdefault(rid, {"events": 0, "tokens_evicted": 0})
    entry["events"] += 1
    entry["tokens_evicted"] += int(plan.evicted_tokens)


# ---------------------------------------------------------------------------------------------


def register() -> None:
    """vLLM's plugin entry point: inert without KVSIEVE_CONFIG, idempotent, all-or-nothing."""
    global _registered, _settings
    path = os.environ.get("KVSIEVE_CONFIG")
    if not path or _registered:
        return
    _check_version()
    check_names()
    new_settings = _Settings(path)  # loads the library and validates the config first
    owners = {entry: _resolve(*entry) for entry in PATCHED}
    wrappers = {
        PATCHED[0]: _scheduler_schedule,
        PATCHED[1]: _runner_update_states,
        PATCHED[2]: _runner_prepare_inputs,
        PATCHED[3]: _runner_execute_model,
        PATCHED[4]: _attention_forward,
    }
    for entry, owner in owners.items():
        orig = getattr(owner, entry[2])
        wrapped = wrappers[entry](orig)
        wrapped.__wrapped__ = orig
        wrapped.__kvsieve__ = True
        setattr(owner, entry[2], wrapped)
    _settings = new_settings
    _registered = True
    logger.info("kvsieve %s enabled (%s, prefill policy %s, decode policy %s)", new_settings.lib.version, path,
                new_settings.policy[PHASE_PREFILL], new_settings.policy[PHASE_DECODE])
