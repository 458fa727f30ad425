"""What the scheduler and the workers tell each other, once per step.

The scheduler attaches one `StepPlan` to the step's `SchedulerOutput` (`.kvsieve`): the events
the workers run after the step's forward and the SnapKV observation windows (and decode SnapKV
rings) whose queries the step's forward computes. Each worker answers with one `StepAcks` on the `ModelRunnerOutput` it
returns (`.kvsieve`), an `Ack` per event it received. The scheduler rewrites a request's block
list and frees blocks only for events acknowledged `DONE`.

Both objects are plain dataclasses, pickled with the outputs they ride on (multiprocess
executors, tensor parallelism). `version` changes whenever a field changes meaning; a side that
reads another version treats the payload as absent (no event runs, no block is freed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .request_options import Options

PROTOCOL_VERSION = 6

# The attribute each payload rides on.
ATTR = "kvsieve"


@dataclass(frozen=True)
class Event:
    """One compression event of one request, planned by the scheduler from lengths alone.

    After this step's forward the request holds `logical_len - offset` cached tokens; the first
    `protected` of them are never moved. The workers plan again from the same lengths and must
    find the same `kept_tokens` and `released_blocks` (otherwise they refuse the event).
    `window` is the SnapKV observation window `[start, end)` in logical positions whose queries
    score the event (start may be later than `end - config window` when a prefix-cache hit
    skipped the computation of the first window positions); None for other policies."""

    req_id: str
    phase: int
    logical_len: int
    offset: int
    protected: int
    kept_tokens: int
    released_blocks: int
    window: tuple[int, int] | None = None
    # Out of place: the fresh blocks that receive the kept tokens after the protected prefix
    # (`ceil((kept_tokens - protected) / block_size)` of them); the row's blocks from the
    # protected prefix on are only read, and are given back intact (prefix-cache hashes and
    # all) when the event is done. None: compact in place.
    dest: tuple[int, ...] | None = None
    # The request's own settings (SamplingParams.extra_args) when it asked for any: workers plan
    # with the config derived from them, as the scheduler did. None: the config's.
    options: Options | None = None
    # Chunk events (phase PREFILL_CHUNK): the whole prompt's length, which their budget is of.
    prompt_len: int = 0


@dataclass(frozen=True)
class Capture:
    """Record the queries of logical positions `[lo, hi)` (computed by this step's forward) into
    the request's SnapKV window, which covers `[start, end)`."""

    req_id: str
    start: int
    end: int
    lo: int
    hi: int


@dataclass
class StepPlan:
    """The scheduler's payload on a `SchedulerOutput`."""

    events: dict[str, Event] = field(default_factory=dict)
    captures: dict[str, Capture] = field(default_factory=dict)
    # Decode SnapKV (`[decode] policy = "snapkv"`): requests whose ring keeps the queries of the
    # logical positions `[lo, hi)` this step's forward computes, appended to the run it recorded
    # so far (a request scheduled without an entry here ends its run; the next starts over).
    rings: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Requests of the step that read every block whatever `[selection]` says (they opted out).
    dense: set[str] = field(default_factory=set)
    version: int = PROTOCOL_VERSION


class Outcome(IntEnum):
    """What a worker did with an event. Higher is worse: across tensor-parallel workers the
    event's outcome is the worst any worker reports."""

    DONE = 0  # every layer compacted; the worker now reads the shortened row
    FAILED = 1  # nothing moved; the request keeps its full cache
    TORN = 2  # some layers moved, not all: the request's KV is inconsistent and must be recomputed


@dataclass(frozen=True)
class Ack:
    req_id: str
    outcome: Outcome
    reason: str = ""


@dataclass
class StepAcks:
    """A worker's payload on a `ModelRunnerOutput`: one Ack per event it received."""

    acks: dict[str, Ack] = field(default_factory=dict)
    seconds: float = 0.0  # this worker's time running the step's events (kvsieve's cost on that side)
    # Block selection since the last payload (`selection.Counters`, plus `metadata_bytes`).
    selection: dict | None = None
    version: int = PROTOCOL_VERSION


def read(obj, cls):
    """The payload of type `cls` on `obj`, or None when absent or of another protocol version."""
    payload = getattr(obj, ATTR, None)
    if isinstance(payload, cls) and payload.version == PROTOCOL_VERSION:
        return payload
    return None
