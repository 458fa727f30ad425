"""The worker side: runs the events the scheduler attached to a step after that step's forward,
acknowledges each one, and keeps positions logical while slots and sequence lengths follow the
compacted row. One code path for every model runner and device; what differs between vLLM's
runners (V1, Model Runner V2) is in `runners/`, one small adapter each, which also patches its
runner class and calls the helpers here at the right points of its step:
- `profile_run` (here, both runners): reserves the scratch of one event, the kernels'
  workspace and a SnapKV window before vLLM measures its memory, so the KV cache is sized
  around them (`Buffers`).
- `initialize_kv_cache` (here, both runners): checks the KV tensors and their layout
  (`checks.check_runner`) and sets up this runner's kvsieve state with the backend's adapter
  (`backends`) and the runner's (`runners`).
- per step, from the runner adapter: `forget` the offsets and windows of new, resumed
  (recomputing) and finished requests; once the batch is laid out, `plan_windows` maps the
  step's SnapKV captures to batch rows and the adapter applies the offsets (slot mapping and
  sequence lengths use `position - offset`); `recording` around the forward lets the attention
  hook record window queries; `after_forward` runs the step's events; the adapter attaches
  `take_acks` to the step's ModelRunnerOutput (before the last pipeline stage, to the
  IntermediateTensors the next stage receives: `pipeline`).

An event runs in two phases so that a failure never leaves a request half compacted:
1. prepare: plan from the same lengths as the scheduler, then score, select and validate
   (`kvs_compact_check` / `kvs_compact_into_check`) every layer; nothing is written to the KV
   cache;
2. move: compact every layer (in place, or out of place into the event's fresh `dest` blocks
   when the row's blocks may be shared through the prefix cache), then, once every worker
   moved, install the shortened row and the offset.
With tensor parallelism every worker holds its own KV heads, so the workers agree (an
all-reduce over the tensor-parallel CPU group) after each phase: an event moves only if every
worker prepared it, and its acknowledgement is the worst outcome any worker had. A failure in
phase 1 is FAILED (nothing moved anywhere). In phase 2, out of place it is FAILED too (only the
fresh blocks were written; the row is intact), in place it is TORN (the scheduler preempts the
request, which recomputes its KV from scratch). Nothing here raises into vLLM.

One code path for both devices: buffers live on the cache's device, the kernels handle launches
on the engine's current stream, and each phase of an event enqueues every layer and then
synchronizes once (a no-op on CPU), so the device's own checks decide the acknowledgement.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from copy import copy
from dataclasses import dataclass

from . import capture, carry, faults, groups, pipeline, protocol, selection
from .backends import adapter_for
from .runners import adapter_for as runner_adapter_for
from .checks import UnsupportedSetup, check_runner
from .lib import DEVICE, DTYPE, LAYOUT, PHASE_DECODE, POLICY_NAMES, CpuKernels, CudaKernels, KvCache, KvsieveError, Sequence, TokenSelect
from .protocol import Ack, Outcome, StepAcks, StepPlan
from .request_options import DEFAULT
from .settings import settings
from .stats import WORKER_STATS

logger = logging.getLogger("vllm.kvsieve")


class Scratch:
    """Caller-owned buffers the kernels write into, on the cache's device, grown to the largest
    event seen (or reserved up front) and then reused: steady serving allocates nothing per
    event (and fragments no heap)."""

    def __init__(self, device="cpu") -> None:
        self.device = device
        self.bufs: dict = {}

    def get(self, name: str, n: int, dtype):
        """At least max(n, 1) elements of `dtype` (never a NULL pointer, even for n = 0)."""
        import torch

        buf = self.bufs.get(name)
        if buf is None or buf.numel() < max(n, 1):
            self.bufs.pop(name, None)  # free before allocating the larger one
            buf = self.bufs[name] = torch.empty(max(n, 1) * 5 // 4 + 1, dtype=dtype, device=self.device)
        return buf

    def reserve(self, name: str, n: int, dtype) -> None:
        """Exactly n elements now, unless a larger buffer is held (no 25% headroom up front)."""
        import torch

        buf = self.bufs.get(name)
        if buf is None or buf.numel() < max(n, 1):
            self.bufs.pop(name, None)
            self.bufs[name] = torch.empty(max(n, 1), dtype=dtype, device=self.device)


@dataclass
class Geometry:
    """What the worker's buffers are sized by, known from the model before the KV cache exists."""

    layers: int
    kv_heads: int
    q_heads: int
    head_size: int
    block_size: int
    dtype: object  # torch dtype of the cache
    max_len: int  # the longest sequence (max_model_len): the most tokens an event can hold

    @staticmethod
    def of(runner) -> "Geometry":
        mc, pc = runner.model_config, runner.parallel_config
        return Geometry(layers=mc.get_num_layers(pc), kv_heads=mc.get_num_kv_heads(pc),
                        q_heads=mc.get_num_attention_heads(pc), head_size=mc.get_head_size(),
                        block_size=runner.cache_config.block_size, dtype=runner.kv_cache_dtype,
                        max_len=runner.max_model_len)


def _stream(device) -> int:
    """The engine's current stream on `device` (0 on CPU): kvsieve enqueues behind the forward."""
    if device.type != "cuda":
        return 0
    import torch

    return torch.cuda.current_stream(device).cuda_stream


class Buffers:
    """A runner's kernels handles (one per stream the engine runs events on), scratch and window
    store. Made in `profile_run`, before vLLM measures its memory, so what is reserved here is
    counted before the KV cache is sized; the WorkerState takes it over."""

    def __init__(self, device, layers: int, q_heads: int, head_size: int) -> None:
        import torch

        self.device = torch.device(device)
        self.kernels_by_stream: dict[int, CpuKernels] = {}
        self.scratch = Scratch(self.device)
        self.windows = capture.Windows(layers, q_heads, head_size, self.device)
        s = settings()
        if s.policy[PHASE_DECODE] == "snapkv":
            self.windows.ring_size = s.params[PHASE_DECODE].window

    def kernels(self) -> CpuKernels:
        key = _stream(self.device)
        k = self.kernels_by_stream.get(key)
        if k is None:
            lib = settings().lib
            k = CpuKernels(lib) if self.device.type == "cpu" else CudaKernels(lib, self.device.index or 0, key)
            self.kernels_by_stream[key] = k
        return k

    def reserve(self, geo: Geometry, cache: KvCache) -> None:
        """Scratch for one event on a sequence of up to `geo.max_len` tokens (scores, every
        layer's keep lists, released ids), the kernels' own workspace, and one SnapKV window.
        None for a config that evicts nothing (`[selection]` only)."""
        import torch

        s = settings()
        if all(p == "none" for p in s.policy.values()):
            return
        n = geo.max_len
        self.scratch.reserve("scores", geo.kv_heads * n, torch.float32)
        self.scratch.reserve("keep", geo.layers * geo.kv_heads * n, torch.int32)
        self.scratch.reserve("released", math.ceil(n / geo.block_size), torch.int32)
        window = max((p.window for ph, p in s.params.items() if s.policy[ph] == "snapkv"), default=0)
        self.kernels().reserve(cache, n, window, geo.q_heads if window else 0)
        if window:
            self.windows.reserve(window)


class WorkerState:
    """kvsieve's state in one model runner, made when vLLM allocates the KV cache."""

    def __init__(self, layers: list, adapter, head_size: int, buffers: Buffers, runner_adapter=None) -> None:
        from .runners import v1

        self.layers = layers  # [(layer name, KV tensor)] in cache order
        self.names = [name for name, _ in layers]
        self.adapter = adapter  # backends.cpu_attn or backends.flash_layout
        self.runner_adapter = runner_adapter or v1  # runners.v1 or runners.v2
        self.desc = [adapter.describe(t, head_size) for _, t in layers]
        self.device = layers[0][1].device
        self.block_size = self.desc[0].block_size
        self.heads = self.desc[0].num_kv_heads
        self.buffers = buffers
        self.windows = buffers.windows
        self.scratch = buffers.scratch
        self.offsets: dict[str, int] = {}
        # Decode SnapKV's carried scores (`carry`): per request, one [heads, kept] tensor per layer.
        self.carried: dict[str, list] = {}
        self.applied: dict = {}  # what the adapter changed for this step's offsets, to undo after
        self.plan: StepPlan | None = None  # this step's, read when the step starts
        self.acks: StepAcks | None = None  # this step's, until a ModelRunnerOutput carries them
        self.logged: set[str] = set()
        self.selector: selection.Selector | None = None  # `[selection]`: made by `_new_selector`
        self.place = groups.read()  # tensor-parallel rank and group, pipeline stage
        # Pipeline parallelism: what the earlier stages did with the step's events (`pipeline`;
        # None on the first stage).
        self.upstream: pipeline.Upstream | None = None
        self.sent = None  # the payload sent to the next stage, alive until the next step
        self.relay = False  # this step had events (their acks go on to the next stage)
        layout = next(k for k, v in LAYOUT.items() if v == self.desc[0].layout)
        logger.info("kvsieve worker rank %d: %d layers, %d KV heads per layer, block size %d, layout %s (%s, %s), "
                    "model runner %s%s", self.place.tp_rank, len(layers), self.heads, self.block_size, layout, layers[0][1].dtype,
                    self.device, self.runner_adapter.__name__.rsplit(".", 1)[-1],
                    f", pipeline stage {self.place.stage} of {self.place.stages}" if self.place.stages > 1 else "")

    def kernels(self) -> CpuKernels:
        return self.buffers.kernels()


def state(runner) -> WorkerState | None:
    """This runner's kvsieve state (None: kvsieve is off here or the KV cache is not yet made)."""
    return runner.__dict__.get("_kvsieve")


def _log_once(st: WorkerState, key: str, msg: str, *args) -> None:
    if key not in st.logged:
        st.logged.add(key)
        logger.warning(msg, *args)


def _geometry_desc(geo: Geometry, device) -> KvCache:
    """A descriptor of the cache's geometry before the cache exists (only read for sizes)."""
    dtype = str(geo.dtype).removeprefix("torch.")
    per_kind = geo.block_size * geo.kv_heads * geo.head_size
    return KvCache(k=1 << 20, v=(1 << 20) + per_kind * 8, dtype=DTYPE[dtype], layout=LAYOUT["nhd"],
                   device=DEVICE[device.type], num_blocks=1, block_size=geo.block_size, num_kv_heads=geo.kv_heads,
                   head_dim=geo.head_size, block_stride=0, token_stride=0, head_stride=0)


def _new_buffers(runner, geo: Geometry) -> Buffers:
    b = runner.__dict__.get("_kvsieve_buffers")
    if b is None:
        b = runner._kvsieve_buffers = Buffers(runner.device, geo.layers, geo.q_heads, geo.head_size)
    return b


def wrap_profile_run(orig):
    def profile_run(self, *args, **kwargs):
        # Reserve before vLLM measures the forward's peak, so the KV cache is sized around it.
        try:
            geo = Geometry.of(self)
            _new_buffers(self, geo).reserve(geo, _geometry_desc(geo, self.device))
        except Exception as e:
            # Unsupported setups are refused with their reason at initialize_kv_cache.
            logger.warning("kvsieve: reserving scratch before memory profiling failed (%s); it is reserved when "
                           "the KV cache is allocated instead, uncounted by vLLM's profile", _reason(e))
        return orig(self, *args, **kwargs)

    return profile_run


def wrap_initialize_kv_cache(orig):
    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        out = orig(self, kv_cache_config, *args, **kwargs)
        # Refusals raise here, while the engine starts: before the first request.
        layers, backend = check_runner(self)
        geo = Geometry.of(self)
        head_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.head_size
        st = WorkerState(layers, adapter_for(backend), head_size, _new_buffers(self, geo), runner_adapter_for(self))
        st.windows.name_layers(st.names)
        try:
            st.buffers.reserve(geo, st.desc[0])  # a no-op for what profile_run reserved; block marks
        except KvsieveError as e:
            raise UnsupportedSetup(f"the kvsieve kernels on {st.device}: {e.message}") from e
        st.selector = _new_selector(self, st, geo, backend)
        _log_carry_bound(st, geo)
        self._kvsieve = st
        faults.STAGE = st.place.stage  # stage-scoped faults fire from here on, never while starting
        return out

    return initialize_kv_cache


def _log_carry_bound(st: WorkerState, geo: Geometry) -> None:
    """Decode SnapKV's carried scores live beside the KV cache, not in it or the reserve: say
    how much a request may hold (every layer's kept tokens per KV head, float32)."""
    s = settings()
    p = s.params[PHASE_DECODE]
    if s.policy[PHASE_DECODE] != "snapkv" or not p.carry:
        return
    kept = p.budget_tokens or math.ceil(p.budget_ratio * geo.max_len)
    per_request = carry.bytes_per_request(len(st.desc), st.heads, min(kept, geo.max_len))
    logger.info("kvsieve: decode SnapKV carries up to %.2f MiB of scores per request (rank %d; %d layers x %d "
                "KV heads x %d tokens x 4 bytes), on %s outside the KV cache", per_request / 2**20,
                st.place.tp_rank, len(st.desc), st.heads, min(kept, geo.max_len), st.device)


def _windowless(window) -> bool:
    """A layer's `sliding_window` as the backends store "none": None, -1 (CPU_ATTN) or (-1, -1)
    (FLASH_ATTN, TRITON_ATTN)."""
    return window is None or window == -1 or (isinstance(window, tuple) and all(w == -1 for w in window))


def _new_selector(runner, st: WorkerState, geo: Geometry, backend: str) -> selection.Selector | None:
    """`[selection]`'s state for this runner (None without one), or UnsupportedSetup naming
    what this setup cannot serve."""
    s = settings()
    params = s.config.selection()
    if POLICY_NAMES[params.policy] == "none":
        return None
    if not hasattr(st.adapter, "selection_state") or backend not in getattr(
            st.adapter, "SELECTION_BACKENDS", ("CPU_ATTN",)):
        raise UnsupportedSetup(f"{s.path}: [selection] (Quest) is served on CPU_ATTN, FLASH_ATTN and TRITON_ATTN; "
                               f"this engine runs {backend} (choose one with --attention-backend, or drop "
                               "[selection])")
    ctx = runner.compilation_config.static_forward_context
    impls = [getattr(ctx.get(name), "impl", None) for name in st.names]
    if not all(_windowless(getattr(i, "sliding_window", None)) for i in impls):
        raise UnsupportedSetup(f"{s.path}: [selection] needs full attention; this model has sliding-window layers "
                               "(drop [selection])")
    if any(getattr(i, "alibi_slopes", None) is not None for i in impls):
        raise UnsupportedSetup(f"{s.path}: [selection] shortens the sequence attention reads, which would change "
                               "ALiBi's distance biases; this model uses ALiBi (drop [selection])")
    try:
        sel = selection.Selector.make(s.config, params, st.names, st.desc, geo.layers, st.device, st.kernels,
                                      st.adapter, runner.model_config.dtype)
    except ValueError as e:
        raise UnsupportedSetup(f"{s.path}: {e}") from e
    kv = sum(t.numel() * t.element_size() for _, t in st.layers)
    logger.info("kvsieve worker rank %d: block selection (quest) on %d of %d layers; its metadata takes %.1f MiB "
                "(%.1f%% of the KV cache's %.1f MiB)", st.place.tp_rank, len(sel.layers), len(st.layers),
                sel.metadata_bytes / 2**20, 100 * sel.metadata_bytes / max(kv, 1), kv / 2**20)
    return sel


# ---------------------------------------------------------------------------------------------
# The step, as the runner adapters drive it.


def begin_step(st: WorkerState, scheduler_output, intermediate_tensors=None) -> StepPlan | None:
    """A real step starts: its plan, nothing recorded or acknowledged yet; after the first
    pipeline stage, the earlier stages' acks come off the received tensors (`pipeline.take`)."""
    st.plan = protocol.read(scheduler_output, StepPlan)
    st.upstream = pipeline.take(intermediate_tensors) if st.place.stage > 0 else None
    st.windows.rows = []
    st.acks = None
    st.sent = None
    if st.selector is not None:
        st.selector.begin_step(st.plan.dense if st.plan is not None else ())
    return st.plan


def intermediate_tensors(args: tuple, kwargs: dict):
    """The IntermediateTensors a runner's `execute_model(scheduler_output, intermediate_tensors)`
    received (after the first pipeline stage), or None."""
    return args[0] if args else kwargs.get("intermediate_tensors")


def forget(st: WorkerState, req_ids) -> None:
    """New, resumed (recomputing) and finished requests start with no offset and no window."""
    req_ids = set(req_ids)
    for rid in req_ids:
        st.offsets.pop(rid, None)
        st.carried.pop(rid, None)
    st.windows.forget(req_ids)


def captures_due(st: WorkerState) -> bool:
    """Whether this step records SnapKV window (or decode ring) queries (then it must not replay
    a full CUDA graph, which would skip the attention hook)."""
    return bool(st.plan is not None and (st.plan.captures or st.plan.rings))


def plan_windows(st: WorkerState, batch: capture.Batch) -> None:
    """Map this step's captures to rows of the batch the runner laid out (contained: a failure
    leaves those requests uncompressed)."""
    if st.selector is not None:
        st.selector.set_rows(batch.req_ids)
    try:
        st.windows.plan_step(batch, st.plan.captures if st.plan else {}, st.plan.rings if st.plan else {})
    except Exception as e:
        _log_once(st, "capture-plan", "kvsieve: planning SnapKV window capture failed (%s); those requests stay "
                  "uncompressed", e)
        st.windows.rows = []


@contextmanager
def recording(st: WorkerState):
    """Around the forward: the attention hook records into this runner's windows and reads
    its block selection."""
    capture.ACTIVE = st.windows
    selection.ACTIVE = st.selector
    try:
        yield
    finally:
        capture.ACTIVE = None
        selection.ACTIVE = None


def after_forward(runner, st: WorkerState, scheduler_output) -> None:
    """Run the step's events (the forward computed their last tokens), keep their acks for
    the step's ModelRunnerOutput, and drop the windows the step completed. Block selection's
    metadata for the blocks the forward filled comes first: an event may rewrite them."""
    if st.selector is not None:
        st.selector.after_forward()
    plan = st.plan
    st.relay = bool(plan is not None and plan.events)
    if plan is not None and (plan.events or plan.captures):
        if plan.events:
            t0 = time.perf_counter()
            acks = run_events(runner, st, scheduler_output, plan)
            dt = time.perf_counter() - t0
            WORKER_STATS.seconds += dt
            st.acks = StepAcks(acks, seconds=dt + (st.upstream.seconds if st.upstream is not None else 0.0))
        st.windows.end_step(plan.captures)
    st.plan = None
    if st.selector is not None:
        done = st.selector.counters.take()
        if done is not None:
            done["metadata_bytes"] = st.selector.metadata_bytes
            st.acks = st.acks or StepAcks()
            st.acks.selection = done


def take_acks(st: WorkerState | None, out):
    """Put the step's acknowledgements on the ModelRunnerOutput that goes to the scheduler and
    return what the runner returns. An asynchronous output (asynchronous scheduling; MRV2 always)
    makes its ModelRunnerOutput when `get_output` is called (in the executor's thread or the
    worker process): they are attached there. Nothing to attach to yet (the V1 runner's
    `execute_model` when it samples in `sample_tokens`): they wait for the next call. Before the
    last pipeline stage they go to the next stage with the hidden states (`pipeline.attach`;
    selection's counters go to this stage's worker stats: the scheduler hears the last stage's)."""
    from vllm.sequence import IntermediateTensors
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    if st is None or st.acks is None:
        return out
    if isinstance(out, IntermediateTensors):
        acks, st.acks = st.acks, None
        if acks.selection:
            WORKER_STATS.selected(acks.selection)  # no scheduler hears an earlier stage's: kept here
        if st.relay:  # the step had events: the next stage waits for their acks
            out = pipeline.attach(out, acks, st.device, st.place.tp_size)
            st.sent = out.tensors[pipeline.KEY]
        return out
    if isinstance(out, AsyncModelRunnerOutput):
        acks, st.acks, get_output = st.acks, None, out.get_output
        out.get_output = lambda: _attach(get_output(), acks)
        return out
    if not isinstance(out, ModelRunnerOutput):
        return out
    acks, st.acks = st.acks, None
    return _attach(out, acks)


def _attach(out, acks):
    """`out` with `acks` on it (a copy when it is vLLM's shared empty output)."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    if out is EMPTY_MODEL_RUNNER_OUTPUT:
        out = copy(out)  # never write to vLLM's shared empty output
    setattr(out, protocol.ATTR, acks)
    return out


# ---------------------------------------------------------------------------------------------
# Events.


@dataclass
class _Job:
    """A prepared event: every layer's keep list, validated against the cache."""

    req_id: str
    cached: int
    kept: int
    evicted: int
    released: int
    row: list
    row_tensor: object  # int32 copy of `row` that `seq` points into
    seq: Sequence
    selected: int
    keeps: list
    dest: list | None  # out of place: the fresh blocks
    dest_tensor: object  # int32 copy of `dest` the kernels read
    carried: list | None = None  # decode SnapKV: each layer's scores to carry, once installed


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def run_events(runner, st: WorkerState, scheduler_output, plan: StepPlan) -> dict[str, Ack]:
    """Run this step's events one after the other; returns an Ack per event received. Never
    raises. One at a time, so every event's keep lists use the one buffer reserved for the
    longest sequence (`Buffers.reserve`): however many events a step holds and whatever budgets
    their requests asked for, the worker allocates no scratch beyond the reserve (decode SnapKV's
    carried scores are state, not scratch: `carry`, bounded per request at start-up)."""
    acks: dict[str, Ack] = {}
    for ev in plan.events.values():
        if st.upstream is not None:
            # After the first pipeline stage: only where every earlier stage compacted (the
            # same decision on each of this stage's workers: their peers agreed on outcomes).
            prior = st.upstream.ack_for(ev.req_id)
            if prior is None or prior.outcome != Outcome.DONE:
                st.windows.event_done(ev.req_id)
                if prior is not None:
                    acks[ev.req_id] = prior  # FAILED or TORN before this stage; None: lost
                continue
        # Every worker runs every event of the plan in the same order, so the agreements of
        # tensor parallelism pair up; an event lost on this worker only takes part as FAILED.
        lost = faults.hit("drop_event")
        ack = _run_event(runner, st, scheduler_output, ev, lost)
        if st.upstream is not None:
            ack = pipeline.after_earlier_stages(ack)
        if lost or (ack.outcome == Outcome.DONE and faults.hit("drop_ack")):
            continue  # the scheduler hears nothing of it
        acks[ev.req_id] = ack
    return acks


def _run_event(runner, st: WorkerState, scheduler_output, ev: protocol.Event, lost: bool) -> Ack:
    """Prepare, agree, move, agree, install, agree (see the module docstring)."""
    job = None
    if lost:
        ack = Ack(ev.req_id, Outcome.FAILED, "the event never reached this worker")
    else:
        try:
            job = _prepare(runner, st, scheduler_output, ev)
            ack = Ack(ev.req_id, Outcome.DONE)
        except Exception as e:
            ack = Ack(ev.req_id, Outcome.FAILED, _reason(e))
    ack = _worst_over_workers(st, ack, "could not prepare it")
    if ack.outcome == Outcome.DONE:
        try:
            _move(st, job)
        except Exception as e:
            # Out of place only the fresh blocks were written: the row is as it was.
            ack = Ack(ev.req_id, Outcome.FAILED if job.dest is not None else Outcome.TORN, _reason(e))
        ack = _worst_over_workers(st, ack, "could not move it", torn="moved only some layers")
        if ack.outcome == Outcome.DONE:
            try:
                _install(runner, st, job)
            except Exception as e:
                ack = Ack(ev.req_id, Outcome.TORN, _reason(e))
            # An install failing on one worker while another installed: the request recomputes.
            ack = _worst_over_workers(st, ack, "could not install the shortened row")
    st.windows.event_done(ev.req_id)
    # The carried scores describe the KV as this event left it: the new ones once it is
    # installed; none after a failure (it recomputes, or compresses no more).
    if ack.outcome == Outcome.DONE and job.carried is not None:
        st.carried[ev.req_id] = job.carried
    else:
        st.carried.pop(ev.req_id, None)
    if ack.outcome == Outcome.DONE:
        if not WORKER_STATS.compressions:
            logger.info("kvsieve: first compression (request %s: %d -> %d cached tokens) (rank %d)", ev.req_id,
                        job.cached, job.kept, st.place.tp_rank)
        entry = WORKER_STATS.compressed(ev.req_id, job.cached, job.evicted, job.released)
        entry["kept_tokens"] = job.kept
    else:
        WORKER_STATS.failed[ack.outcome.name.lower()] += 1
        _log_once(st, ack.outcome.name + ack.reason.split(":")[0],
                  "kvsieve: event for request %s %s: %s (logged once per kind; counted in stats)", ev.req_id,
                  "failed, its KV is intact" if ack.outcome == Outcome.FAILED else
                  "moved only some layers, it will be recomputed", ack.reason)
    return ack


def _worst_over_workers(st: WorkerState, ack: Ack, what: str, torn: str | None = None) -> Ack:
    """The event's ack becomes the worst outcome any tensor-parallel worker has for it, with a
    reason naming what another worker failed to do (`torn` when that left it TORN)."""
    worst = _agree(st.place, [int(ack.outcome)])[0]
    if worst > ack.outcome:
        why = torn if torn and worst == Outcome.TORN else what
        return Ack(ack.req_id, Outcome(worst), "another tensor-parallel worker " + why)
    return ack


def _agree(place: groups.Place, flags: list[int]) -> list[int]:
    """The element-wise maximum of `flags` over the tensor-parallel workers (identity alone)."""
    if not flags or place.tp_cpu_group is None:
        return flags
    import torch
    import torch.distributed as dist

    t = torch.tensor(flags, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=place.tp_cpu_group)
    return [int(x) for x in t.tolist()]


class Refused(RuntimeError):
    """The worker's view of a request disagrees with the scheduler's event."""


@contextmanager
def _synchronized(kernels):
    """Synchronize when the block ends, also when it raises: the calls already enqueued then
    finish, their host out-params are written while still alive, and no failure of this event
    is reported against the next one. The block's own exception is the one that propagates."""
    try:
        yield
    except BaseException:
        try:
            kernels.synchronize()
        except Exception:
            pass
        raise
    kernels.synchronize()


def _prepare(runner, st: WorkerState, scheduler_output, ev: protocol.Event) -> _Job:
    """Phase 1: plan, score, select and validate every layer. Writes nothing to the cache.
    The keep lists go to scratch `keep` (events run one at a time), until phase 2."""
    import torch

    s = settings()
    computed = st.runner_adapter.computed(runner, scheduler_output, ev.req_id)
    row = st.runner_adapter.row(runner, ev.req_id)
    if computed != ev.logical_len:
        raise Refused(f"the worker computed {computed} tokens, the event is for {ev.logical_len}")
    offset = st.offsets.get(ev.req_id, 0)
    if offset != ev.offset:
        raise Refused(f"the worker's offset is {offset}, the scheduler's {ev.offset}")
    bs = st.block_size
    cached = ev.logical_len - offset
    config = s.requests.get(ev.options or DEFAULT)
    plan = config.plan_event(ev.phase, ev.logical_len, cached, ev.protected, bs, ev.prompt_len)
    if (int(plan.kept_tokens), int(plan.released_blocks)) != (ev.kept_tokens, ev.released_blocks):
        raise Refused(f"the worker plans {plan.kept_tokens} kept / {plan.released_blocks} released, the "
                      f"scheduler {ev.kept_tokens} / {ev.released_blocks}")
    if len(row) < math.ceil(cached / bs):
        raise Refused(f"the row has {len(row)} blocks for {cached} cached tokens")
    params, policy = s.params[ev.phase], s.policy[ev.phase]
    queries = None
    if policy == "snapkv":
        if ev.window is None:
            raise Refused("a SnapKV event without an observation window")
        # A decode event scores with its ring (the last generated queries), the others with the
        # window their prefill recorded.
        read = st.windows.ring_queries if ev.phase == PHASE_DECODE else st.windows.queries
        queries = read(ev.req_id, ev.window[0], ev.window[1], st.names)
    k = int(plan.selected_tokens)
    dev = st.device
    dest = dest_tensor = None
    if ev.dest is not None:
        dest = list(ev.dest)
        if len(dest) != math.ceil(k / bs):
            raise Refused(f"the event brings {len(dest)} fresh blocks for {k} kept tokens")
        dest_tensor = torch.tensor(dest, dtype=torch.int32, device=dev)
    rows = torch.tensor(row, dtype=torch.int32, device=dev)
    seq = Sequence(row=rows.data_ptr(), row_len=len(row), cached_len=cached, protected_len=ev.protected)
    sel = TokenSelect(cached_len=cached, protected_len=ev.protected, sink_tokens=params.sink_tokens,
                      protected_tail=params.protected_tail, selected=k)
    scores = st.scratch.get("scores", st.heads * cached, torch.float32)
    per_layer = st.heads * k
    keep_all = st.scratch.get("keep", len(st.desc) * per_layer, torch.int32)
    keeps = []
    # Decode SnapKV ranks the tokens its last event kept by their carried scores too.
    gamma = params.carry if ev.phase == PHASE_DECODE and policy == "snapkv" else 0.0
    prior = st.carried.get(ev.req_id) if gamma > 0 else None
    carried = [] if gamma > 0 else None
    if prior is not None and len(prior) != len(st.desc):
        raise Refused(f"carried scores for {len(prior)} layers, the cache has {len(st.desc)}")
    kernels = st.kernels()
    # Every layer is enqueued, then one synchronize reports what the device found (on CUDA).
    with _synchronized(kernels):
        for i, (desc, name) in enumerate(zip(st.desc, st.names)):
            faults.check("prepare_layer")
            keep = keep_all[i * per_layer:(i + 1) * per_layer] if per_layer else keep_all[:1]
            q = queries[name] if queries is not None else None
            rank = None
            if prior is not None:
                def rank(s, p=prior[i]):
                    carry.fold(s.view(st.heads, cached), p, ev.protected, gamma)
            kernels.select(desc, seq, policy, params, sel, q, scores, keep, st.heads * cached, st.heads * k, rank)
            if carried is not None:
                carried.append(carry.kept_scores(scores[:st.heads * cached].view(st.heads, cached),
                                                 keep[:per_layer].view(st.heads, k)))
            if dest is None:
                kernels.compact_check(desc, seq, keep.data_ptr(), st.heads * k, k, max(1, len(row)))
            else:
                kernels.compact_into_check(desc, seq, keep.data_ptr(), st.heads * k, k, dest_tensor.data_ptr(),
                                           len(dest))
            keeps.append(keep)
    return _Job(ev.req_id, cached, int(plan.kept_tokens), int(plan.evicted_tokens), int(plan.released_blocks),
                row, rows, seq, k, keeps, dest, dest_tensor, carried)


def _move(st: WorkerState, job: _Job) -> None:
    """Phase 2: compact every layer (in place, or into the fresh blocks): all layers enqueued,
    one synchronize, then each layer's released count checked against the plan."""
    import torch

    released = st.scratch.get("released", len(job.row), torch.int32)
    kernels = st.kernels()
    counts = []  # host out-params, alive until the synchronize has written them
    with _synchronized(kernels):
        for desc, keep in zip(st.desc, job.keeps):
            faults.check("move_layer")
            if job.dest is not None:
                kernels.compact_into(desc, job.seq, keep.data_ptr(), st.heads * job.selected, job.selected,
                                     job.dest_tensor.data_ptr(), len(job.dest))
                continue
            counts.append(kernels.compact_enqueue(desc, job.seq, keep.data_ptr(), st.heads * job.selected,
                                                  job.selected, released.data_ptr(), released.numel()))
    for n in counts:
        if n.value != job.released:
            raise Refused(f"compaction released {n.value} blocks, the plan {job.released}")


def _install(runner, st: WorkerState, job: _Job) -> None:
    """Every worker moved the event: read the request through its shortened row."""
    bs = st.block_size
    pb = job.seq.protected_len // bs
    new, old = math.ceil(job.kept / bs), math.ceil(job.cached / bs)
    kept = job.row[pb:new] if job.dest is None else job.dest
    row = job.row[:pb] + kept + job.row[old:]
    st.runner_adapter.install(runner, job.req_id, row)
    st.offsets[job.req_id] = st.offsets.get(job.req_id, 0) + job.evicted
    if st.selector is not None:
        st.selector.rewritten(row, job.kept)
