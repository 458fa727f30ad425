"""Fault injection, for the tests that prove kvsieve contains its failures.

`KVSIEVE_FAULTS` (read when the plugin registers, in every vLLM process) or `arm()` names the
faults: comma-separated `point=N` (fail the N-th time the point is reached, counting from 1 in
this process), `point=N+` (the N-th time and every time after) or `point=*N` (every N-th time:
faults spread over a long run, the soak's), each optionally followed by `@stageS`: armed only in
the workers of pipeline stage S, once they started (`STAGE`). Points:

- `lib`: a libkvsieve kernel call raises KvsieveError (as if the library returned an error);
- `prepare_layer`: an exception in the worker's per-layer scoring/selection loop;
- `move_layer`: an exception in the per-layer compaction loop (after earlier layers moved);
- `drop_event`: the worker never sees an event the scheduler announced (lost in transit);
- `drop_ack`: the worker runs and installs an event, then its acknowledgement is lost;
- `schedule`: an exception in the scheduler's planning of a step.

Unarmed points cost one dict lookup. Never set KVSIEVE_FAULTS in production.
"""

from __future__ import annotations

import os

POINTS = ("lib", "prepare_layer", "move_layer", "drop_event", "drop_ack", "schedule")


class InjectedFault(RuntimeError):
    """Raised where a fault was injected."""


_armed: dict[str, tuple[int, str, int | None]] = {}  # point -> (N, "once" | "after" | "every", stage)
_seen: dict[str, int] = {}
STAGE: int | None = None  # this process's pipeline stage, once it runs a worker


def arm(point: str, n: int, repeat: bool | str = False, stage: int | None = None) -> None:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; one of {', '.join(POINTS)}")
    if n < 1:
        raise ValueError(f"fault point {point}: N = {n} must be at least 1")
    mode = repeat if isinstance(repeat, str) else ("after" if repeat else "once")
    _armed[point] = (n, mode, stage)
    _seen[point] = 0


def disarm() -> None:
    _armed.clear()
    _seen.clear()


def arm_from_env() -> None:
    spec = os.environ.get("KVSIEVE_FAULTS", "").strip()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, n = item.partition("=")
        n, at, where = n.partition("@stage")
        mode = "after" if n.endswith("+") else "every" if n.startswith("*") else "once"
        try:
            count = int(n.strip("+*"))
            stage = int(where) if at else None
        except ValueError:
            raise ValueError(f"KVSIEVE_FAULTS: {item!r} is not point=N, point=N+ or point=*N (optionally "
                             "followed by @stageS)") from None
        arm(point.strip(), count, mode, stage)


def hit(point: str) -> bool:
    """Count one pass through `point`; True when the fault fires on this pass."""
    entry = _armed.get(point)
    if entry is None or (entry[2] is not None and entry[2] != STAGE):
        return False
    _seen[point] += 1
    n, mode, _ = entry
    seen = _seen[point]
    return seen == n or (mode == "after" and seen > n) or (mode == "every" and seen % n == 0)


def check(point: str) -> None:
    """Raise InjectedFault when the fault at `point` fires."""
    if hit(point):
        raise InjectedFault(f"injected fault at {point} (pass {_seen[point]})")
