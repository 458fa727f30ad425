"""The worker side: installs compacted rows and offsets, keeps positions logical while slots
and sequence lengths follow the physical row, and runs the events the scheduler attached to a
step after that step's forward (score, select and compact every layer with libkvsieve).

- `GPUModelRunner._update_states` (shared by `CPUModelRunner`): installs those rows and
  offsets; forgets offsets of new, resumed (recomputing) and finished requests.
- `GPUModelRunner._prepare_inputs`: positions stay logical (RoPE); slot mapping and sequence
  lengths use `position - offset`.
- `GPUModelRunner.execute_model`: after the forward of a step, runs the events. The scheduler
  frees the tail blocks at its next `schedule`, after the data has moved; both sides derive the
  kept count from the same lengths (`kvs_plan_keep_count`).
"""

from __future__ import annotations

import time

from .backends.cpu_attn import CAPTURE, plan_capture
from .checks import UnsupportedSetup
from .lib import KvsieveError
from .settings import settings
from .stats import WORKER_STATS


def _offsets(runner) -> dict:
    return runner.__dict__.setdefault("_kvsieve_offsets", {})


def wrap_update_states(orig):
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


def wrap_prepare_inputs(orig):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = orig(self, scheduler_output, num_scheduled_tokens)
        plan_capture(self, num_scheduled_tokens)
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


def wrap_execute_model(orig):
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
        for rid in list(CAPTURE["queries"]):
            state = self.requests.get(rid)
            if state is None or state.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(rid, 0) >= len(
                state.prompt_token_ids or ()
            ):
                del CAPTURE["queries"][rid]  # prefill over: the window served its event (if any)
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
    captured = CAPTURE["queries"].get(rid, {}) if policy == "snapkv" else {}
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


