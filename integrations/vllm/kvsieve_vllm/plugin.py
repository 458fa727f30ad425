"""The vLLM plugin: `register()` patches a stock vLLM 0.32 (v1 engine, V1 model runner) so that
each request's KV cache is compressed when its prefill ends, without a fork.

vLLM calls `register()` (entry point group `vllm.general_plugins`) in every process it starts.
It does nothing unless KVSIEVE_CONFIG names a kvsieve TOML file. When enabled it checks first
that every name it patches exists and that the setup is one it supports, and only then patches,
so it never half-patches. What it patches (DESIGN.md §5):

- `Scheduler.schedule`: before vLLM schedules, each running request whose prefill completed in
  the previous step and whose plan releases blocks gets its block list rewritten (the evicted
  block positions hold the null block, placed first so the non-null blocks in order are the
  physical row) and the released blocks go back to vLLM's block pool. The list keeps its
  logical length, so vLLM's own allocation accounting needs no change. The new physical rows
  and offsets ride on the `SchedulerOutput` to the workers.
- `GPUModelRunner._update_states` (shared by `CPUModelRunner`): installs those rows and
  offsets; forgets offsets of new, resumed (recomputing) and finished requests.
- `GPUModelRunner._prepare_inputs`: positions stay logical (RoPE); slot mapping and sequence
  lengths use `position - offset`.
- `GPUModelRunner.execute_model`: after the forward of the step in which a request's prefill
  ends (and, with a `[decode]` section, of every decode step that makes a re-compression due),
  scores, selects and compacts each layer's KV in place with libkvsieve. The scheduler
  frees the tail blocks at its next `schedule`, after the data has moved; both sides derive the
  kept count from the same lengths (`kvs_plan_keep_count`), so they agree without talking.
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
]
RELIED_UPON = [
    ("vllm.v1.core.block_pool", "BlockPool", "free_blocks"),
    ("vllm.v1.worker.block_table", "BlockTable", "compute_slot_mapping"),
    ("vllm.v1.worker.block_table", "MultiGroupBlockTable", "add_row"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "forward"),
]
# Policies this version of the plugin drives (SnapKV needs the observation-window queries
# captured from the attention forward, which is not wired yet).
PLUGIN_POLICIES = ("streaming", "knorm")
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
    if vllm_config.cache_config.enable_prefix_caching:
        raise UnsupportedSetup("prefix caching is enabled; this version rewrites blocks the prefix "
                               "cache could share: start vLLM with enable_prefix_caching=False")
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
    at_len: int  # num_computed_tokens when the event was planned
    offset: int  # evicted tokens (logical - cached)


def _scheduler_schedule(orig):
    def schedule(self, *args, **kwargs):
        st = self.__dict__.get("_kvsieve")
        if st is None:
            _check_engine(self.vllm_config)
            st = self._kvsieve = {"reqs": {}, "steps": 0}
        t0 = time.perf_counter()
        changed = _compress_due(self, st["reqs"])
        SCHEDULER_STATS.seconds += time.perf_counter() - t0
        out = orig(self, *args, **kwargs)
        rows = {}
        if changed:
            mgr = self.kv_cache_manager.coordinator.single_type_managers[0]
            for rid in changed:
                blocks = mgr.req_to_blocks.get(rid)
                if blocks is not None:
                    rows[rid] = ([b.block_id for b in blocks if not b.is_null], st["reqs"][rid].offset)
        out.kvsieve_rows = rows
        st["steps"] += 1
        if st["steps"] % LOG_EVERY_STEPS == 0 and SCHEDULER_STATS.compressions:
            s = SCHEDULER_STATS.as_dict()
            logger.info("kvsieve: %d compressions, %d blocks released, kept %.1f%% of %d tokens",
                        s["compressions"], s["blocks_released"], 100 * s["kept_ratio"], s["tokens_before"])
        return out

    return schedule


def _compress_due(sched, reqs: dict) -> set:
    """Plan and apply the block side of every due compression event; returns the request ids.

    A request's first event is planned when its prefill has completed (phase PREFILL); after
    that, every step re-plans it in phase DECODE, which is due once the cache has outgrown the
    decode budget by `interval` tokens. The worker ran the same plans on the same lengths at the
    end of the previous step and has already moved the data."""
    cfg = settings().config
    mgrs = sched.kv_cache_manager.coordinator.single_type_managers
    if len(mgrs) != 1:
        raise UnsupportedSetup(f"{len(mgrs)} KV cache groups; kvsieve maps a single full-attention group")
    mgr = mgrs[0]
    pool = sched.kv_cache_manager.block_pool
    bs = mgr.block_size
    changed = set()
    for req in sched.running:
        rid = req.request_id
        computed = req.num_computed_tokens
        prev = reqs.get(rid)
        if prev is not None and computed < prev.at_len:
            del reqs[rid]  # preempted and recomputing from scratch: plan again
            prev = None
        if prev is None:
            if computed != req.num_prompt_tokens:
                continue
            phase, offset = PHASE_PREFILL, 0
            prev = reqs[rid] = _ReqState(at_len=computed, offset=0)
        elif computed > prev.at_len:
            phase, offset = PHASE_DECODE, prev.offset
            prev.at_len = computed
        else:
            continue
        cached = computed - offset
        plan = cfg.plan(computed, cached, 0, bs, phase)
        if plan.released_blocks == 0:
            continue
        blocks = mgr.req_to_blocks[rid]
        nulls = offset // bs
        physical = blocks[nulls:]
        old, new = math.ceil(cached / bs), math.ceil(plan.kept_tokens / bs)
        if any(not b.is_null for b in blocks[:nulls]) or len(physical) < old or any(b.is_null for b in physical):
            raise KvsieveError("KVS_STATUS_INVALID_ARGUMENT",
                               f"request {rid}: block list ({len(blocks)} entries, {nulls} expected nulls first) "
                               f"does not hold {cached} cached tokens; the engine state is not what kvsieve expects")
        released = physical[new:old]
        mgr.req_to_blocks[rid] = [pool.null_block] * (nulls + len(released)) + physical[:new] + physical[old:]
        pool.free_blocks(reversed(released))
        prev.offset += int(plan.evicted_tokens)
        SCHEDULER_STATS.compressions += 1
        SCHEDULER_STATS.tokens_before += cached
        SCHEDULER_STATS.tokens_evicted += int(plan.evicted_tokens)
        SCHEDULER_STATS.blocks_released += len(released)
        entry = SCHEDULER_STATS.per_request.setdefault(rid, {"events": 0, "tokens_evicted": 0, "blocks_released": 0})
        entry["events"] += 1
        entry["tokens_evicted"] += int(plan.evicted_tokens)
        entry["blocks_released"] += len(released)
        changed.add(rid)
    running = {q.request_id for q in sched.running}
    for rid in [r for r in reqs if r not in running and r not in sched.requests]:
        del reqs[rid]  # finished or aborted
    return changed


# ---------------------------------------------------------------------------------------------
# Worker side.


def _offsets(runner) -> dict:
    return runner.__dict__.setdefault("_kvsieve_offsets", {})


def _done(runner) -> set:
    return runner.__dict__.setdefault("_kvsieve_done", set())


def _runner_update_states(orig):
    def _update_states(self, scheduler_output):
        ret = orig(self, scheduler_output)
        offs, done = _offsets(self), _done(self)
        forget = set(scheduler_output.finished_req_ids)
        forget |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        forget |= {r.req_id for r in scheduler_output.scheduled_new_reqs}
        for rid in forget:
            offs.pop(rid, None)
            done.discard(rid)
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


def _runner_execute_model(orig):
    def execute_model(self, scheduler_output, *args, **kwargs):
        out = orig(self, scheduler_output, *args, **kwargs)
        s = settings()
        decode_on = s.params[PHASE_DECODE].policy != 0
        due = []
        done, offs = _done(self), _offsets(self)
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            state = self.requests.get(rid)
            if state is None:
                continue
            length = state.num_computed_tokens + n
            if rid not in done:
                prompt = len(state.prompt_token_ids or ())
                if prompt and length == prompt:
                    due.append((rid, PHASE_PREFILL, length, 0))
                    done.add(rid)
            elif decode_on:
                due.append((rid, PHASE_DECODE, length, offs.get(rid, 0)))
        if due:
            t0 = time.perf_counter()
            for rid, phase, length, offset in due:
                _compact_request(self, rid, phase, length, offset)
            WORKER_STATS.seconds += time.perf_counter() - t0
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


def _compact_request(runner, rid: str, phase: int, length: int, offset: int) -> None:
    """Plan one request's event for `phase` and, if it releases blocks, score, select and
    compact every layer: `length` logical tokens, `offset` of them evicted earlier."""
    import torch

    from .layout import kvsieve_layout_for, vllm_isa
    from .lib import DTYPE, LAYOUT, CpuKernels, KvCache, Sequence, TokenSelect

    s = settings()
    caches = _layer_caches(runner)
    nb, heads, bs, two_d = caches[0].shape
    cached = length - offset
    plan = s.config.plan(length, cached, 0, bs, phase)
    if plan.released_blocks == 0:
        return
    params, policy = s.params[phase], s.policy[phase]
    dtype = caches[0].dtype
    layout = kvsieve_layout_for(vllm_isa(dtype, bs, two_d // 2), dtype)
    kernels = runner.__dict__.get("_kvsieve_kernels")
    if kernels is None:
        kernels = runner._kvsieve_kernels = CpuKernels(s.lib)
    row = torch.tensor(runner.requests[rid].block_ids[0], dtype=torch.int32)
    seq = Sequence(row=row.data_ptr(), row_len=len(row), cached_len=cached, protected_len=0)
    k = int(plan.selected_tokens)
    sel = TokenSelect(cached_len=cached, protected_len=0, sink_tokens=params.sink_tokens,
                      protected_tail=params.protected_tail, selected=k)
    scores = torch.empty(heads * cached, dtype=torch.float32)
    keep = torch.empty(heads * k, dtype=torch.int32)
    released = torch.empty(max(1, len(row)), dtype=torch.int32)
    for t in caches:
        desc = KvCache(k=t.data_ptr(), v=None, dtype=DTYPE[str(dtype).removeprefix("torch.")], layout=LAYOUT[layout],
                       device=0, num_blocks=nb, block_size=bs, num_kv_heads=heads, head_dim=two_d // 2,
                       block_stride=0, token_stride=0, head_stride=0)
        if policy == "knorm":
            kernels.score_knorm(desc, seq, scores.data_ptr(), scores.numel())
            scores_ptr = scores.data_ptr()
        else:
            scores_ptr = None
        kernels.select_tokens(scores_ptr, scores.numel(), heads, sel, keep.data_ptr(), keep.numel())
        n = kernels.compact(desc, seq, keep.data_ptr(), keep.numel(), k, released.data_ptr(), released.numel())
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
