"""Each request's kvsieve state on the scheduler side, as an explicit state machine.

    ADMITTED --scheduled--> PREFILLING --last chunk--> PENDING (event announced)
                                 |                         |  DONE ack  -> COMPRESSED
                                 |                         |  FAILED    -> DECODING (disabled)
                                 |                         |  TORN      -> TORN -> PREEMPTED
                                 +--last chunk, no event-> DECODING
    DECODING / COMPRESSED --decode event due--> PENDING
    any live state --vLLM preempts--> PREEMPTED --rescheduled--> RESUMED (recompute from 0)
    RESUMED --recompute ends--> PENDING or DECODING (compressed again, like a prefill)
    any state --> FINISHED / ABORTED (the record is dropped)
    With `[prefill]`: PREFILLING / RESUMED --chunk event due--> PENDING --any ack--> back to
    PREFILLING / RESUMED; a prefill that ends compressed rests in COMPRESSED.

A transition not in `ALLOWED` raises `IllegalTransition`: the caller contains it (the request
is left uncompressed), so an engine state kvsieve did not expect never becomes a wrong row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class State(Enum):
    ADMITTED = "admitted"  # known to the scheduler, nothing computed yet
    PREFILLING = "prefilling"  # prompt chunks being computed
    PENDING = "pending"  # an event announced this step; the workers run it after the forward
    DECODING = "decoding"  # prefill over, holding its full cache
    COMPRESSED = "compressed"  # at least one event done
    TORN = "torn"  # an event moved some layers only; preempted at the next schedule
    PREEMPTED = "preempted"  # vLLM freed its blocks; it recomputes from scratch when rescheduled
    RESUMED = "resumed"  # recomputing prompt and output so far after a preemption
    FINISHED = "finished"
    ABORTED = "aborted"


S = State
_LIVE = {S.ADMITTED, S.PREFILLING, S.PENDING, S.DECODING, S.COMPRESSED, S.TORN, S.RESUMED}
_END = {S.FINISHED, S.ABORTED}
ALLOWED: dict[State, set[State]] = {
    S.ADMITTED: {S.PREFILLING, S.PENDING, S.DECODING, S.PREEMPTED} | _END,
    S.PREFILLING: {S.PREFILLING, S.PENDING, S.DECODING, S.COMPRESSED, S.PREEMPTED} | _END,
    S.RESUMED: {S.RESUMED, S.PENDING, S.DECODING, S.COMPRESSED, S.PREEMPTED} | _END,
    # PREEMPTED from PENDING: with asynchronous scheduling the next step is scheduled (and may
    # preempt the request) before the event's acks arrive; its acks are then ignored.
    S.PENDING: {S.COMPRESSED, S.DECODING, S.PREFILLING, S.RESUMED, S.TORN, S.PREEMPTED} | _END,
    S.DECODING: {S.DECODING, S.PENDING, S.PREEMPTED} | _END,
    S.COMPRESSED: {S.COMPRESSED, S.PENDING, S.PREEMPTED} | _END,
    S.TORN: {S.PREEMPTED} | _END,
    S.PREEMPTED: {S.RESUMED} | _END,
    S.FINISHED: set(),
    S.ABORTED: set(),
}
assert set(ALLOWED) == set(State) and _LIVE | _END | {S.PREEMPTED} == set(State)


HISTORY_LIMIT = 64  # states kept per request (a long generation has many decode events)


class IllegalTransition(RuntimeError):
    pass


@dataclass
class Record:
    """One request as kvsieve tracks it. `offset` tokens were evicted (logical - cached);
    `protected` leading cached tokens are never moved (fixed at the first event); `disabled`
    says why no event runs for it any more (an event failed), or is empty."""

    req_id: str
    state: State = S.ADMITTED
    offset: int = 0
    protected: int = 0
    frozen: bool = False  # `protected` fixed by the first event
    at_len: int = 0  # logical length at the last planned event (decode events run once a step)
    first_computed: int | None = None  # where this prefill (or recompute) started computing
    disabled: str = ""
    skip_kind: str = ""  # why no event runs (a stats reason), set with `disabled`
    options: object = None  # request_options.Options, resolved at its first step
    config: object = None  # the lib.Config its events are planned with (the request's own budget)
    events: int = 0
    failures: int = 0  # events that did not complete (see scheduler.RETRIES)
    dest: list = field(default_factory=list)  # fresh blocks held for the PENDING out-of-place event
    chunk_from: State | None = None  # PREFILLING / RESUMED while a chunk event is PENDING
    # Decode SnapKV: the first position of the run of decode steps whose queries the workers'
    # ring recorded (capture.Ring), None when no run is going on.
    ring_from: int | None = None
    history: list = field(default_factory=lambda: [State.ADMITTED])  # states visited, for tests and logs

    def go(self, new: State) -> None:
        if new not in ALLOWED[self.state]:
            raise IllegalTransition(f"request {self.req_id}: {self.state.value} -> {new.value} is not a "
                                    "transition kvsieve expects")
        # Chunks count (prefill and recompute steps); other repeats are no-ops.
        if new != self.state or new in (S.PREFILLING, S.RESUMED):
            self.history.append(new)
            del self.history[:-HISTORY_LIMIT]
        self.state = new

    def settle(self) -> None:
        """Leave PENDING after an event that did not tear: back to prefilling after a chunk
        event, else COMPRESSED once any event is done (DECODING otherwise)."""
        if self.chunk_from is not None:
            back, self.chunk_from = self.chunk_from, None
            self.go(back)
        else:
            self.go(S.COMPRESSED if self.events else S.DECODING)

    def restart(self) -> None:
        """Recompute from scratch (after a preemption): nothing evicted, nothing protected.
        Whether a request kvsieve stopped compressing is compressed again is the scheduler's
        call (`SchedulerSide.may_retry`)."""
        self.offset = self.protected = self.at_len = 0
        self.frozen = False
        self.first_computed = None
        self.chunk_from = None
        self.ring_from = None

    @property
    def prefilling(self) -> bool:
        return self.state in (S.ADMITTED, S.PREFILLING, S.RESUMED)
