"""The scheduler side: decides every compression event, and hands blocks back to vLLM only for
events the workers acknowledged.

Patched on vLLM's `Scheduler`:
- `__init__`: refuses unsupported setups (`checks.check_scheduler`) while the engine starts.
- `schedule`: first preempts requests whose last event was torn (they recompute); after vLLM
  schedules the step, plans the events that fall due in it (a prefill or recompute that ends,
  a decode re-compression that is due) and the SnapKV window captures, all from lengths
  (`kvs_plan_keep_count`), and attaches them as one `protocol.StepPlan`.
- `update_from_output`: before vLLM reads the step's output, applies each event's `Ack`: DONE
  rewrites the block list (the evicted positions hold the null block right after the protected
  prefix, so the non-null blocks in order are the worker's row; the list keeps its logical
  length, so vLLM's allocation accounting needs no change) and frees the released blocks;
  FAILED leaves the request uncompressed (its fresh blocks, never installed, go back); TORN or
  no ack at all marks it for recompute, and its fresh blocks stay held until its preemption
  (a worker may have installed them). After vLLM read the output, finishes with an error the
  requests that can neither be compressed nor fit the KV space (see "Failures" below).
- `_preempt_request` / `_free_request`: the PREEMPTED / FINISHED / ABORTED transitions.

Asynchronous scheduling (`AsyncScheduler`: step n+1 is scheduled before step n's output, and so
its acks, arrive): a request whose event is PENDING is scheduled once more, and nothing is
planned for it until the acks came. That is safe because the block list keeps its logical
length until DONE (vLLM allocates step n+1 as if nothing moved; blocks it appends are after the
compacted ones, `physical[old:]`), the workers run steps in order (step n+1 reads the row step
n's event installed; blocks freed on the acks are only written by steps scheduled later), and
a request that must recompute is preempted dropping its step in flight (`drop_stale_output`,
as vLLM's reset_prefix_cache), whose output was computed over KV being thrown away. A decode
event due right after another is planned one step later than synchronously. A request whose
chunk event is PENDING sits out the step scheduled before its acks (`sitting_out`): its next
chunk is scheduled once the event is applied, so every chunk, window capture and prefill-end
event is planned as with synchronous scheduling, and it never holds more than its budget plus
one chunk (the bound `admission` assumes); the cost is one step per chunk event for that
request (the others run in that step). Pipeline parallelism keeps a batch in flight per stage
(one more asynchronously): the same rules hold at any depth, each stage running the steps in
order (`pipeline` carries every stage's acks to the scheduler).

Prefix caching: no block that is or may become shared is ever rewritten. When the blocks an
event reads include one in the prefix cache (hashed) or held by another request, the event is
out of place: the scheduler takes fresh blocks from the pool for the kept tokens, the workers
write them there (`kvs_compact_into`) and only read the originals, and on DONE the request's
originals go back to the pool with their hashes, so later requests (the next turn of a chat,
the next question on a document) still hit them until the pool reuses them. The budget covers
the whole sequence, shared prefix included. When the pool holds fewer free blocks than the
kept tokens need, the event runs in place behind a protected prefix (the leading blocks other
requests share, never moved) after taking the blocks it rewrites out of the prefix cache: the
pre-prefix-cache behaviour, counted as `in_place_pool_short`; kvsieve never preempts another
request to make room. Either way the first event stops caching the request's later blocks
(their KV was computed over a compressed cache, not what a prefix hash promises).

Containment: every kvsieve step here runs inside a try; a failure disables kvsieve for the
request involved (it runs on uncompressed, logged once per kind, counted in stats) and vLLM's
own code runs as it would without kvsieve.

Failures (`settle_failure`): a request kvsieve stopped compressing runs on uncompressed when
it fits the KV space that way (its prompt plus `max_tokens`, at most `max_model_len`) and is
compressed again if vLLM preempts and recomputes it, once. One that does not fit (admitted by
the bound of a bounding config, `admission`) would fill the pool, preempt everything and be
re-admitted forever: it is recomputed from scratch (compressed again) while it has a retry,
and otherwise finished with vLLM's error status (`FINISHED_ERROR`: the client sees an error
finish, the OpenAI server a 500), counted as `requests{kind="ended_with_error"}`. A request
never costs more than `RETRIES` + 1 failed events.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

from . import admission, faults, protocol
from .checks import async_scheduling, check_scheduler
from .lib import PHASE_DECODE, PHASE_PREFILL, PHASE_PREFILL_CHUNK
from .protocol import Capture, Event, Outcome, StepAcks, StepPlan
from .request_options import OptionError, parse
from .settings import settings
from .state import Record, State
from .stats import SCHEDULER_STATS

logger = logging.getLogger("vllm.kvsieve")

LOG_EVERY_STEPS = 100
TIMELINE_LIMIT = 256
# A request whose events failed this many times may be compressed again after a recompute;
# after one more failure it runs on uncompressed (or ends with an error if it cannot).
RETRIES = 1
# Failure kinds a recompute may not meet again (the others are the request's own choice).
TRANSIENT = {"worker", "lost", "torn", "scheduler"}

# Never cache a compressed request's later blocks: its later KV was computed attending over a
# compressed cache, so it is not what the prefix-cache hash of those tokens promises.
_NEVER_CACHE = 1 << 62


class SchedulerSide:
    """kvsieve's state in one vLLM Scheduler."""

    def __init__(self) -> None:
        self.reqs: dict[str, Record] = {}
        self.to_preempt: set[str] = set()  # recompute from scratch at the next schedule
        self.to_fail: dict[str, str] = {}  # finish with an error after this step's output
        self.steps = 0
        self.logged: set[str] = set()

    # -- containment ---------------------------------------------------------------------------

    def log_once(self, key: str, msg: str, *args) -> None:
        if key not in self.logged:
            self.logged.add(key)
            logger.warning("kvsieve: " + msg + " (logged once per kind; counted in kvsieve stats)", *args)

    def disable(self, rec: Record, kind: str, reason: str) -> None:
        """No more events for this request; it runs on uncompressed (or as compressed so far)."""
        rec.disabled, rec.skip_kind = reason, kind
        rec.failures += 1
        SCHEDULER_STATS.failed[kind] += 1
        SCHEDULER_STATS.request(rec.req_id)["disabled"] = reason
        self.log_once(kind, "request %s is no longer compressed: %s", rec.req_id, reason)

    def may_retry(self, rec: Record) -> bool:
        return rec.skip_kind in TRANSIENT and rec.failures <= RETRIES

    @staticmethod
    def fits_uncompressed(sched, req) -> bool:
        """Whether the request can finish holding every token: its prompt and all it may
        generate fit the whole KV space (vLLM checked that for max_model_len unless kvsieve's
        bound let it start with less)."""
        bs = sched.kv_cache_manager.coordinator.single_type_managers[0].block_size
        longest = min(sched.max_model_len, req.num_prompt_tokens + req.max_tokens)
        return math.ceil(longest / bs) <= sched.kv_cache_manager.block_pool.num_gpu_blocks - 1

    def settle_failure(self, sched, rec: Record, recompute: bool = False) -> None:
        """After kvsieve stopped compressing a request (`disable`): a request that must
        recompute anyway (`recompute`: its KV is torn) does; one that fits the KV space
        uncompressed runs on; one that does not is recomputed, compressed again, while it has a
        retry, and finished with an error otherwise (it could never finish: a livelock)."""
        req = sched.requests.get(rec.req_id)
        if req is None:
            return
        fits = self.fits_uncompressed(sched, req)
        if fits and not recompute:
            return
        if fits or self.may_retry(rec):
            self.to_preempt.add(rec.req_id)
            return
        self.to_preempt.discard(rec.req_id)
        self.to_fail[rec.req_id] = (
            f"kvsieve could not compress it ({rec.disabled}) and its {req.num_prompt_tokens}-token prompt with up to "
            f"{req.max_tokens} tokens to generate does not fit the KV space uncompressed "
            f"({sched.kv_cache_manager.block_pool.num_gpu_blocks - 1} blocks)")

    def finish_failed(self, sched, outputs) -> None:
        """Finish the requests in `to_fail` with vLLM's error status and tell their clients (as
        vLLM's own error sweep in update_from_output does)."""
        if not self.to_fail:
            return
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
        from vllm.v1.request import RequestStatus

        why, self.to_fail = self.to_fail, {}
        for req in sched.finish_requests(list(why), RequestStatus.FINISHED_ERROR):
            logger.error("kvsieve: request %s finished with an error: %s", req.request_id, why[req.request_id])
            SCHEDULER_STATS.requests["ended_with_error"] += 1
            SCHEDULER_STATS.request(req.request_id)["error"] = why[req.request_id]
            eco = outputs.get(req.client_index)
            if eco is None:
                eco = outputs[req.client_index] = EngineCoreOutputs()
            eco.outputs.append(EngineCoreOutput(request_id=req.request_id, new_token_ids=[],
                                                finish_reason=req.get_finished_reason(), events=req.take_events(),
                                                trace_headers=req.trace_headers))
            done = getattr(sched, "finished_req_ids_dict", None)
            if done is not None:  # data parallel: the coordinator hears of it with this output
                eco.finished_requests = (eco.finished_requests or set()) | done.pop(req.client_index, set())

    def record(self, rid: str) -> Record:
        rec = self.reqs.get(rid)
        if rec is None:
            rec = self.reqs[rid] = Record(rid)
        return rec

    # -- before vLLM schedules -----------------------------------------------------------------

    def preempt_for_recompute(self, sched) -> None:
        """Requests whose KV an event left half compacted (or whose event was never
        acknowledged), and requests retried after a failure, recompute from scratch."""
        from vllm.v1.request import RequestStatus

        for rid in sorted(self.to_preempt):
            self.to_preempt.discard(rid)
            req = sched.requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING or req not in sched.running:
                continue
            sched.running.remove(req)
            # With asynchronous scheduling the request's next step is already scheduled and
            # ran over the KV being thrown away: its output is dropped, and resampled after the
            # recompute (vLLM's own reset_prefix_cache does the same).
            sched._preempt_request(req, time.monotonic(), drop_stale_output=True)
            # As vLLM's own reset_prefix_cache does: preempted and resumed in one step, the
            # request must look unscheduled in the prior step (the worker gets its full state).
            sched.prev_step_scheduled_req_ids.discard(rid)
            SCHEDULER_STATS.counts["recomputed_after_failed_event"] += 1

    @contextmanager
    def sitting_out(self, sched):
        """While vLLM schedules: the requests whose chunk event is PENDING (only ever with several
        batches in flight, asynchronous scheduling or pipeline parallelism: with one, the acks
        came before) are out of `running`, and
        the running limits are lowered by as many, so vLLM neither schedules nor preempts them
        (it preempts another request instead, for that step) and admits no request into their
        slots. Afterwards `running` keeps its order: vLLM only removes requests from it
        (preemptions, at any index under the priority policy) and appends admitted ones.
        (vLLM 0.33 counts the LoRAs of all of `running` when it admits; a held request's would
        be missed, so LoRA with chunk events and asynchronous scheduling is refused, `checks`.)"""
        held = [r for r in sched.running
                if (rec := self.reqs.get(r.request_id)) is not None and rec.state == State.PENDING
                and rec.chunk_from is not None]
        if not held:
            yield
            return
        before, held_ids, lowered = list(sched.running), {id(r) for r in held}, False
        try:
            sched.running[:] = [r for r in before if id(r) not in held_ids]
            sched.max_num_running_reqs -= len(held)
            sched.max_num_active_reqs -= len(held)
            lowered = True
            yield
        finally:
            if lowered:
                sched.max_num_running_reqs += len(held)
                sched.max_num_active_reqs += len(held)
            after, was = {id(r) for r in sched.running}, {id(r) for r in before}
            sched.running[:] = ([r for r in before if id(r) in held_ids or id(r) in after]
                                + [r for r in sched.running if id(r) not in was])
            SCHEDULER_STATS.counts["steps_sat_out_for_chunk_events"] += len(held)

    # -- after vLLM schedules ------------------------------------------------------------------

    def plan(self, sched, out) -> StepPlan:
        faults.check("schedule")
        plan = StepPlan()
        for rid, n in out.num_scheduled_tokens.items():
            req = sched.requests.get(rid)
            if req is None:
                continue
            rec = self.record(rid)
            try:
                self._plan_request(sched, req, rec, n, plan)
                if rid not in plan.rings:
                    rec.ring_from = None  # the workers end the request's ring run too (capture.Ring)
                if rec.options is not None and rec.options.opt_out:
                    plan.dense.add(rid)
            except Exception as e:
                plan.events.pop(rid, None)
                plan.captures.pop(rid, None)
                plan.rings.pop(rid, None)
                rec.ring_from = None
                self.give_back_dest(sched, rec)
                if rec.state == State.PENDING:
                    rec.go(rec.chunk_from or State.DECODING)
                    rec.chunk_from = None
                self.disable(rec, "scheduler", f"planning its event failed: {type(e).__name__}: {e}")
                self.settle_failure(sched, rec)
        return plan

    def resolve_options(self, req, rec: Record) -> None:
        """The request's own settings (SamplingParams.extra_args), once. The API server refused
        bad ones; one that arrives anyway (another frontend) leaves the request uncompressed."""
        s = settings()
        rec.config = s.config
        params = getattr(req, "sampling_params", None)
        try:
            rec.options = parse(getattr(params, "extra_args", None))
            rec.config = s.requests.get(rec.options)
        except OptionError as e:
            rec.disabled, rec.skip_kind = f"its kvsieve options were refused: {e}", "bad_request_options"
            self.log_once("options", "request %s is not compressed: %s", rec.req_id, rec.disabled)
            return
        if rec.options.opt_out:
            rec.disabled, rec.skip_kind = "it opted out (kvsieve = off)", "opted_out"
            SCHEDULER_STATS.requests["opted_out"] += 1
        elif not rec.options.default:
            SCHEDULER_STATS.requests["own_budget"] += 1

    def _plan_request(self, sched, req, rec: Record, n: int, plan: StepPlan) -> None:
        s = settings()
        if rec.req_id in self.to_fail:
            return
        if rec.config is None:
            self.resolve_options(req, rec)
            if getattr(req, "resumable", False) and not rec.disabled:
                # A streaming-input session appends prompt turns to a request after its prefill;
                # kvsieve has not mapped that, so it leaves such requests whole.
                rec.skip_kind = "resumable"
                rec.disabled = "a resumable (streaming-input) request; kvsieve leaves it uncompressed"
                SCHEDULER_STATS.counts["requests_left_whole"] += 1
                self.log_once("resumable", "request %s: %s", rec.req_id, rec.disabled)
            if rec.disabled:
                self.settle_failure(sched, rec)
                if rec.req_id in self.to_fail:
                    return
        if rec.state == State.PREEMPTED:
            rec.go(State.RESUMED)
            rec.restart()
            if rec.disabled and self.may_retry(rec):
                rec.disabled, rec.skip_kind = "", ""  # compressed again, once
                SCHEDULER_STATS.counts["compressed_again_after_failure"] += 1
            # It recomputes every token so far (prompt and output), with chunk events if any.
            _timeline(rec.req_id, ["recompute", req.num_tokens])
        target = 0  # set while prefilling
        computed = req.num_computed_tokens  # already advanced by this step's schedule
        if rec.prefilling:
            if rec.first_computed is None:
                rec.first_computed = computed - n
            target = req.num_tokens  # the prompt, or prompt + output so far when recomputing
            window = s.params[PHASE_PREFILL].window if s.policy[PHASE_PREFILL] == "snapkv" else 0
            if window and not rec.disabled:
                start = max(0, target - window)
                lo, hi = max(start, computed - n), min(target, computed)
                if lo < hi:
                    plan.captures[rec.req_id] = Capture(rec.req_id, start, target, lo, hi)
            if computed < target:
                rec.go(State.PREFILLING if rec.state == State.ADMITTED else rec.state)
                if s.policy[PHASE_PREFILL_CHUNK] == "none" or rec.disabled or rec.req_id in plan.captures:
                    return  # no [prefill] section, or this chunk computes the question's window
                phase = PHASE_PREFILL_CHUNK
            else:
                phase = PHASE_PREFILL
        elif rec.state in (State.DECODING, State.COMPRESSED):
            if rec.disabled or s.params[PHASE_DECODE].policy == 0 or computed <= rec.at_len:
                return
            if s.policy[PHASE_DECODE] == "snapkv" and not self._plan_ring(sched, rec, computed, n, plan):
                return  # no event before its window's queries are recorded
            phase = PHASE_DECODE
        else:
            return  # TORN (waiting for its preemption) or an unexpected state: nothing to plan
        rec.at_len = computed
        if phase == PHASE_PREFILL_CHUNK:
            resting = rec.state  # still prefilling
        elif rec.state == State.COMPRESSED or (phase == PHASE_PREFILL and rec.offset):
            resting = State.COMPRESSED  # chunk events compressed the prompt already
        else:
            resting = State.DECODING
        if rec.disabled:
            if phase == PHASE_PREFILL:
                SCHEDULER_STATS.skipped[rec.skip_kind or "disabled"] += 1
            rec.go(resting)
            return
        mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]
        pool = sched.kv_cache_manager.block_pool
        bs = mgr.block_size
        blocks = mgr.req_to_blocks.get(rec.req_id, [])
        cached = computed - rec.offset
        protected = rec.protected  # 0 until an event fixes it
        source = _physical(blocks, rec, bs)[protected // bs:math.ceil(cached / bs)]
        shared = pool.enable_caching and any(b.block_hash is not None or b.ref_cnt > 1 for b in source)
        prompt_len = target if phase == PHASE_PREFILL_CHUNK else 0
        p = rec.config.plan_event(phase, computed, cached, protected, bs, prompt_len)
        dest = None
        if shared and p.released_blocks:
            need = math.ceil(int(p.selected_tokens) / bs)
            if pool.get_num_free_blocks() >= need:
                dest = pool.get_new_blocks(need)
            else:
                SCHEDULER_STATS.counts["in_place_pool_short"] += 1
                if not rec.frozen:
                    # Pool short: in place, behind the leading blocks other requests share.
                    protected = min(_shared_prefix_blocks(blocks) * bs, cached)
                    p = rec.config.plan_event(phase, computed, cached, protected, bs, prompt_len)
        if p.released_blocks == 0:
            rec.go(resting)
            return
        window = None
        if s.policy[phase] == "snapkv":
            start = max(0, computed - s.params[phase].window, rec.first_computed or 0)
            if phase == PHASE_PREFILL_CHUNK:
                # The chunk's own last queries, all computed by this step's forward.
                start = max(start, computed - n)
                plan.captures[rec.req_id] = Capture(rec.req_id, start, computed, start, computed)
            window = (start, computed)
            if start > computed - s.params[phase].window:
                SCHEDULER_STATS.counts["partial_snapkv_windows"] += 1
        if not rec.frozen:
            rec.protected, rec.frozen = protected, True
            mgr.num_cached_block[rec.req_id] = _NEVER_CACHE
            SCHEDULER_STATS.request(rec.req_id)["protected_tokens"] = protected
        if dest is None:
            # In place: blocks from the protected prefix on may be rewritten, so out of the
            # prefix cache before the workers move anything (an abort can free them before the
            # event is acknowledged).
            for b in blocks[protected // bs:]:
                if not b.is_null:
                    pool._maybe_evict_cached_block(b)
        else:
            rec.dest = dest
            SCHEDULER_STATS.counts["events_into_fresh_blocks"] += 1
        if rec.state == State.RESUMED:
            SCHEDULER_STATS.counts["recompressions_after_preemption"] += 1
        plan.events[rec.req_id] = Event(rec.req_id, phase, computed, rec.offset, protected, int(p.kept_tokens),
                                        int(p.released_blocks), window,
                                        None if dest is None else tuple(b.block_id for b in dest),
                                        None if rec.options.default else rec.options, prompt_len)
        if phase == PHASE_PREFILL_CHUNK:
            rec.chunk_from = rec.state
            SCHEDULER_STATS.counts["prefill_chunk_events"] += 1
        rec.go(State.PENDING)
        SCHEDULER_STATS.counts["events_announced"] += 1

    def _plan_ring(self, sched, rec: Record, computed: int, n: int, plan: StepPlan) -> bool:
        """Decode SnapKV: while the request's next decode event falls due within a window
        (planned from lengths `window - 1` tokens ahead), the step's queries go to the workers'
        ring. True once the run the ring recorded covers the window ending at this step."""
        window = settings().params[PHASE_DECODE].window
        bs = sched.kv_cache_manager.coordinator.single_type_managers[0].block_size
        cached = computed - rec.offset
        ahead = rec.config.plan_event(PHASE_DECODE, computed + window - 1, cached + window - 1, rec.protected, bs, 0)
        if not ahead.released_blocks:
            return False
        if rec.ring_from is None:
            rec.ring_from = computed - n
        plan.rings[rec.req_id] = (computed - n, computed)
        return computed - rec.ring_from >= window

    # -- before vLLM reads the step's output ---------------------------------------------------

    def apply_acks(self, sched, scheduler_output, runner_output) -> None:
        got = protocol.read(runner_output, StepAcks)
        if got is not None and got.selection:
            SCHEDULER_STATS.selected(got.selection)
        plan = protocol.read(scheduler_output, StepPlan)
        if plan is None or not plan.events:
            return
        acks = got.acks if got is not None else {}
        SCHEDULER_STATS.worker_seconds += got.seconds if got is not None else 0.0
        for rid, ev in plan.events.items():
            rec = self.reqs.get(rid)
            if rec is None or rec.state != State.PENDING:
                continue  # finished or aborted while its event ran
            ack = acks.get(rid)
            try:
                if ack is None:
                    # Unknown: a worker may have moved and installed it. Nothing is handed back
                    # (its fresh blocks included) until it is preempted and recomputes.
                    self._tear(sched, rec, "lost", "the workers never acknowledged its event; it recomputes, and no "
                               "block it may read is handed back before")
                elif ack.outcome == Outcome.DONE:
                    self._apply_done(sched, rec, ev)
                elif ack.outcome == Outcome.FAILED:
                    self.give_back_dest(sched, rec)  # never installed: the request keeps its row
                    rec.settle()
                    self.disable(rec, "worker", f"a worker refused its event, KV intact: {ack.reason}")
                    self.settle_failure(sched, rec)
                else:
                    self._tear(sched, rec, "torn", f"a worker moved only some layers: {ack.reason}")
            except Exception as e:
                self._tear(sched, rec, "torn", f"applying its event failed: {type(e).__name__}: {e}")

    def give_back_dest(self, sched, rec: Record) -> None:
        """Return the fresh blocks of an out-of-place event that will not be installed."""
        if rec.dest:
            dest, rec.dest = rec.dest, []
            sched.kv_cache_manager.block_pool.free_blocks(dest)

    def _tear(self, sched, rec: Record, kind: str, reason: str) -> None:
        """The request's KV (or the workers' view of its row) cannot be trusted: it recomputes
        from scratch at the next schedule (or ends with an error, `settle_failure`). Its fresh
        blocks stay held until then."""
        if rec.state != State.TORN:
            rec.go(State.TORN)
        self.disable(rec, kind, reason)
        self.settle_failure(sched, rec, recompute=True)

    def _apply_done(self, sched, rec: Record, ev: Event) -> None:
        """The workers compacted: rewrite the block list and free the released blocks. Every
        check runs before the list changes."""
        mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]
        pool = sched.kv_cache_manager.block_pool
        bs = mgr.block_size
        blocks = mgr.req_to_blocks.get(rec.req_id)
        pb, nulls = rec.protected // bs, rec.offset // bs
        cached = ev.logical_len - rec.offset
        if blocks is None or ev.offset != rec.offset or ev.protected != rec.protected:
            raise RuntimeError(f"the request's blocks or lengths changed while its event ran (offset {rec.offset} "
                               f"vs {ev.offset})")
        physical = _physical(blocks, rec, bs)
        old, new = math.ceil(cached / bs), math.ceil(ev.kept_tokens / bs)
        if (any(not b.is_null for b in blocks[pb:pb + nulls]) or len(physical) < old
                or any(b.is_null for b in physical)):
            raise RuntimeError(f"its block list ({len(blocks)} entries, {pb} protected, {nulls} null) does not hold "
                               f"{cached} cached tokens")
        if ev.dest is None:
            released, kept, taken = physical[new:old], physical[pb:new], 0
        else:
            if tuple(b.block_id for b in rec.dest) != ev.dest:
                raise RuntimeError("its fresh blocks are not the ones the event wrote")
            released, kept, taken = physical[pb:old], rec.dest, len(rec.dest)
        if len(released) - taken != ev.released_blocks or len(kept) != new - pb:
            raise RuntimeError(f"{len(released) - taken} blocks to release and {len(kept)} to keep, the plan said "
                               f"{ev.released_blocks} and {new - pb}")
        rec.dest = []  # installed below: the request's own blocks from here on
        mgr.req_to_blocks[rec.req_id] = (physical[:pb] + [pool.null_block] * (nulls + ev.released_blocks)
                                         + kept + physical[old:])
        # Last block first: the free queue evicts in order, so the prefix stays hit-able longest.
        pool.free_blocks(reversed(released))
        rec.offset += ev.logical_len - rec.offset - ev.kept_tokens
        rec.events += 1
        rec.settle()
        SCHEDULER_STATS.compressed(rec.req_id, cached, cached - ev.kept_tokens, ev.released_blocks)
        if ev.phase == PHASE_PREFILL_CHUNK:
            SCHEDULER_STATS.chunk_compressions += 1
        _timeline(rec.req_id, ["event", ev.logical_len, ev.phase, ev.kept_tokens, ev.protected,
                               ev.window[0] if ev.window else None])

    # -- vLLM's own transitions ----------------------------------------------------------------

    def preempted(self, sched, request) -> None:
        rec = self.reqs.get(request.request_id)
        if rec is not None:
            self.give_back_dest(sched, rec)
            rec.go(State.PREEMPTED)
            self.to_preempt.discard(request.request_id)
            SCHEDULER_STATS.counts["preemptions"] += 1

    def freed(self, sched, request) -> None:
        from vllm.v1.request import RequestStatus

        rec = self.reqs.pop(request.request_id, None)
        self.to_preempt.discard(request.request_id)
        if rec is None:
            return
        self.to_fail.pop(request.request_id, None)
        self.give_back_dest(sched, rec)
        rec.go(State.ABORTED if request.status == RequestStatus.FINISHED_ABORTED else State.FINISHED)
        SCHEDULER_STATS.request(rec.req_id)["states"] = [s.value for s in rec.history]

    def log_progress(self) -> None:
        self.steps += 1
        if self.steps % LOG_EVERY_STEPS == 0 and (SCHEDULER_STATS.compressions or SCHEDULER_STATS.failed):
            s = SCHEDULER_STATS.as_dict()
            logger.info("kvsieve: %d compressions, %d blocks released, kept %.1f%% of %d tokens, events not done: %s",
                        s["compressions"], s["blocks_released"], 100 * s["kept_ratio"], s["tokens_before"],
                        s["events_failed"] or "none")


def _timeline(req_id: str, entry: list) -> None:
    """What happened to a request's cache, in order, for tests and debugging (bounded)."""
    line = SCHEDULER_STATS.request(req_id).setdefault("timeline", [])
    line.append(entry)
    del line[:-TIMELINE_LIMIT]


def _physical(blocks, rec: Record, bs: int) -> list:
    """The request's blocks without the null entries that stand for evicted tokens (they sit
    right after the protected prefix): the row the workers compact."""
    pb = rec.protected // bs
    return blocks[:pb] + blocks[pb + rec.offset // bs:]


def _shared_prefix_blocks(blocks) -> int:
    """Leading blocks held by another request too (prefix-cache hits share whole prefixes)."""
    n = 0
    while n < len(blocks) and not blocks[n].is_null and blocks[n].ref_cnt > 1:
        n += 1
    return n


def _side(sched) -> SchedulerSide | None:
    return sched.__dict__.get("_kvsieve")


def _contained(side: SchedulerSide, what: str, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:
        side.log_once("internal:" + what, "%s failed (%s: %s); vLLM continues without kvsieve for the requests "
                      "involved", what, type(e).__name__, e)
        SCHEDULER_STATS.failed["internal"] += 1


def wrap_init(orig):
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        check_scheduler(self)  # refusals raise here, while the engine starts
        admission.install_admission_bound(self)
        self._kvsieve = SchedulerSide()
        logger.info("kvsieve scheduler: %s scheduling (%s)",
                    "asynchronous" if async_scheduling(self.vllm_config) else "synchronous", type(self).__name__)

    return __init__


def wrap_schedule(orig):
    def schedule(self, *args, **kwargs):
        side = _side(self)
        if side is None:
            return orig(self, *args, **kwargs)
        t0 = time.perf_counter()
        _contained(side, "preempting requests to recompute", side.preempt_for_recompute, self)
        SCHEDULER_STATS.seconds += time.perf_counter() - t0
        with side.sitting_out(self):
            out = orig(self, *args, **kwargs)
        t0 = time.perf_counter()
        try:
            plan = side.plan(self, out)
        except Exception as e:
            plan = StepPlan()
            for rec in side.reqs.values():
                side.give_back_dest(self, rec)
                if rec.state == State.PENDING:
                    rec.settle()
            side.log_once("schedule", "planning a step failed (%s: %s); no event this step", type(e).__name__, e)
            SCHEDULER_STATS.failed["scheduler"] += 1
        setattr(out, protocol.ATTR, plan)
        SCHEDULER_STATS.seconds += time.perf_counter() - t0
        side.log_progress()
        return out

    return schedule


def wrap_update_from_output(orig):
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        side = _side(self)
        if side is not None:
            t0 = time.perf_counter()
            _contained(side, "applying acknowledged events", side.apply_acks, self, scheduler_output,
                       model_runner_output)
            SCHEDULER_STATS.seconds += time.perf_counter() - t0
        out = orig(self, scheduler_output, model_runner_output, *args, **kwargs)
        if side is not None and side.to_fail:
            _contained(side, "finishing requests that cannot be served", side.finish_failed, self, out)
        return out

    return update_from_output


def _wrap_tracking(what: str, track):
    """A wrapper for a Scheduler method taking a request, that tells kvsieve first."""

    def factory(orig):
        def wrapper(self, request, *args, **kwargs):
            side = _side(self)
            if side is not None:
                _contained(side, what, track, side, self, request)
            return orig(self, request, *args, **kwargs)

        return wrapper

    return factory


wrap_preempt_request = _wrap_tracking("tracking a preemption", SchedulerSide.preempted)
wrap_free_request = _wrap_tracking("tracking a finished request", SchedulerSide.freed)
