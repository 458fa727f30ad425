"""The scheduler side: decides every compression event and hands the released blocks to vLLM.

After vLLM schedules a step, each scheduled request whose prefill ends in it (or, with
`[decode]`, whose decode re-compression falls due in it) is planned (`kvs_plan_keep_count`); an
event that releases blocks fixes the request's protected prefix (its leading blocks shared with
other requests through the prefix cache, never rewritten), removes the blocks it will rewrite
from the prefix cache and stops caching the request's later blocks, so no request ever reads
rewritten KV through the cache. The event rides on the `SchedulerOutput` to the workers. Before
vLLM schedules the next step, the block list is rewritten (the evicted positions hold the null
block, right after the protected prefix, so the non-null blocks in order are the physical row)
and the released blocks go back to vLLM's block pool. The list keeps its logical length, so
vLLM's own allocation accounting needs no change.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from .checks import UnsupportedSetup, check_engine
from .lib import PHASE_DECODE, PHASE_PREFILL, KvsieveError
from .settings import settings
from .stats import SCHEDULER_STATS

logger = logging.getLogger("vllm.kvsieve")

LOG_EVERY_STEPS = 100


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


def wrap_schedule(orig):
    def schedule(self, *args, **kwargs):
        st = self.__dict__.get("_kvsieve")
        if st is None:
            check_engine(self.vllm_config)
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


