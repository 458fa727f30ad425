"""SnapKV observation windows on the worker: the queries of each request's last `window`
positions, recorded from the attention forward of whichever steps (prefill chunks) compute them.

The scheduler says, per step, which logical positions of which window the step computes
(`protocol.Capture`); `Windows.plan_step` maps them to rows of the step's flattened batch, and
the attention backend's hook calls `record` for each layer while `ACTIVE` is this runner's
store. `ACTIVE` is set only around a real step's forward, so a dummy or profiling forward
never writes a window.

Buffers: each window is one float32 tensor `[layers, >= end - start, q_heads, head_dim]` on the
query's device, taken in `plan_step` (before the forward, never inside a CUDA-graph-captured
region or per layer) from a pool that keeps released buffers for reuse. `record` only copies
rows of `query` into it (no host copy). Every layer's recorded rows are counted, so a forward
that skipped the hook (a step replayed as a full CUDA graph) leaves the window incomplete, and
its event fails with the request's KV intact, instead of scoring zeros.

Decode SnapKV rings (`Ring`): while a request's next decode event falls due within a window,
each decode step's query goes to slot `position % size` of the request's ring (a pooled buffer
like a window's), so the ring holds the queries of the last `size` positions of the run it
recorded; a step that schedules the request without a ring entry ends the run (the ring goes
back to the pool). The scheduler keeps the same run (`Record.ring_from`) and plans the event
only once the run covers the whole window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The store of the runner whose step is executing (None outside execute_model).
ACTIVE: "Windows | None" = None


@dataclass
class Batch:
    """A step's batch as the runner laid it out: per row, the request, how many tokens it had
    computed before the step and how many the step computes; `starts[i]` is row i's first token
    in the flattened batch (`starts[-1]`: all of them)."""

    req_ids: list
    starts: object
    computed: object
    scheduled: object


@dataclass
class Window:
    """Queries of logical positions [start, end) of every layer: `buf` float32 [layers, rows >=
    end - start, q_heads, head_dim] (position p in row p - start). `lo` is the first position
    recorded (the rest up to `hi` follow it in order); `rows[i]` counts the rows layer i
    recorded."""

    start: int
    end: int
    lo: int | None = None
    hi: int | None = None
    buf: object = None
    rows: list = field(default_factory=list)
    broken: str = ""


@dataclass
class Ring:
    """The queries of a request's last `size` recorded positions: position p in row p % size of
    `buf` float32 [layers, >= size, q_heads, head_dim]. The run recorded is [lo, hi) (the ring
    holds [max(lo, hi - size), hi)); `rows[i]` counts the rows layer i recorded in it."""

    size: int
    lo: int
    hi: int
    buf: object = None
    rows: list = field(default_factory=list)
    broken: str = ""


class Windows:
    """The windows of one model runner: `layers` attention layers (named by `name_layers` once
    the KV cache exists) with `q_heads` query heads of `head_dim`, on `device`."""

    def __init__(self, layers: int, q_heads: int, head_dim: int, device="cpu") -> None:
        self.layers, self.q_heads, self.head_dim, self.device = layers, q_heads, head_dim, device
        self.index: dict[str, int] = {}
        self.windows: dict[str, Window] = {}
        self.rings: dict[str, Ring] = {}
        self.ring_size = 0  # decode SnapKV's window (set by the worker when [decode] is snapkv)
        self.rows: list[tuple[Window | Ring, int, int, int]] = []  # (target, batch row, count, slot)
        self.pool: list = []  # released buffers, reused by any window they can hold
        self.capacity = 0  # rows of the buffers allocated: the longest window reserved or seen

    def name_layers(self, layer_names: list[str]) -> None:
        """The layers in cache order; a count other than the model config's drops the pool."""
        if len(layer_names) != self.layers:
            self.layers, self.pool = len(layer_names), []
        self.index = {name: i for i, name in enumerate(layer_names)}

    def _alloc(self, length: int):
        import torch

        self.capacity = max(self.capacity, length)
        return torch.empty(self.layers, self.capacity, self.q_heads, self.head_dim, dtype=torch.float32,
                           device=self.device)

    def _take(self, length: int):
        for i, buf in enumerate(self.pool):
            if buf.shape[1] >= length:
                return self.pool.pop(i)
        return self._alloc(length)

    def reserve(self, length: int, count: int = 1) -> None:
        """Hold at least `count` pooled buffers for windows of up to `length` positions (up front,
        while vLLM measures memory; shorter, partial windows use them too)."""
        while sum(buf.shape[1] >= length for buf in self.pool) < count:
            self.pool.append(self._alloc(length))

    def _new(self, rid: str, start: int, end: int) -> Window:
        self._release(rid)
        w = self.windows[rid] = Window(start, end, buf=self._take(end - start), rows=[0] * self.layers)
        return w

    def _release(self, rid: str) -> None:
        w = self.windows.pop(rid, None)
        if w is not None and w.buf is not None:
            self.pool.append(w.buf)

    def _release_ring(self, rid: str) -> None:
        r = self.rings.pop(rid, None)
        if r is not None and r.buf is not None:
            self.pool.append(r.buf)

    def plan_step(self, batch: "Batch", captures: dict, rings: dict | None = None) -> None:
        """Map this step's captures (and ring entries) to rows of the step's flattened batch
        (laid out by the runner's input preparation; `runners.*.batch` reads it)."""
        self.rows = []
        rings = rings or {}
        if self.rings or rings:
            self._plan_rings(batch, rings)
        if not captures:
            return
        starts, num_scheduled_tokens = batch.starts, batch.scheduled
        for i, rid in enumerate(batch.req_ids):
            cap = captures.get(rid)
            if cap is None:
                continue
            first = int(batch.computed[i])
            w = self.windows.get(rid)
            if w is None or (w.start, w.end) != (cap.start, cap.end):
                w = self._new(rid, cap.start, cap.end)
            if cap.lo < first or cap.hi > first + int(num_scheduled_tokens[i]):
                w.broken = (f"the step computes positions [{first}, {first + int(num_scheduled_tokens[i])}) but the "
                            f"scheduler asked for [{cap.lo}, {cap.hi})")
                continue
            if w.hi is not None and cap.lo != w.hi:
                w.broken = f"window positions [{w.hi}, {cap.lo}) were never computed"
            w.lo = cap.lo if w.lo is None else w.lo
            w.hi = cap.hi
            self.rows.append((w, int(starts[i]) + cap.lo - first, cap.hi - cap.lo, cap.lo - cap.start))

    def _plan_rings(self, batch: "Batch", rings: dict) -> None:
        """Each scheduled request's ring: continued by this step's positions, started (from the
        pool) when its run had ended, ended when the step has no entry for it."""
        for i, rid in enumerate(batch.req_ids):
            span = rings.get(rid)
            if span is None:
                self._release_ring(rid)
                continue
            lo, hi = span
            first, n = int(batch.computed[i]), int(batch.scheduled[i])
            r = self.rings.get(rid)
            if r is None or r.hi != lo:
                self._release_ring(rid)
                r = self.rings[rid] = Ring(self.ring_size, lo, lo, buf=self._take(self.ring_size),
                                           rows=[0] * self.layers)
            if lo < first or hi > first + n or hi - lo > r.size:
                r.broken = f"the step computes positions [{first}, {first + n}) but the scheduler asked for [{lo}, {hi})"
                continue
            r.hi = hi
            for p in range(lo, hi):  # one row per position: its slot wraps independently
                self.rows.append((r, int(batch.starts[i]) + p - first, 1, p % r.size))

    def record(self, layer_name: str, query) -> None:
        """Copy this step's window rows of `query` [tokens, q_heads, head_dim] for one layer."""
        layer = self.index.get(layer_name)
        if layer is None:
            return  # not a layer of the cache group kvsieve compacts
        if tuple(query.shape[1:]) != (self.q_heads, self.head_dim):
            raise ValueError(f"layer {layer_name}: query rows {tuple(query.shape[1:])}, expected "
                             f"({self.q_heads}, {self.head_dim})")
        for w, row, count, slot in self.rows:
            w.buf[layer, slot:slot + count].copy_(query[row:row + count])
            w.rows[layer] += count

    def fail_step(self, why: str) -> None:
        """Recording failed in this step: the windows (and rings) it was writing cannot be trusted."""
        for w, *_ in self.rows:
            w.broken = why

    def ring_queries(self, rid: str, start: int, end: int, layer_names: list[str]) -> dict:
        """A decode event's queries: positions [start, end) from the request's ring, per layer
        (in position order, copied out of the ring), or ValueError saying what is missing."""
        import torch

        r = self.rings.get(rid)
        if r is None:
            raise ValueError("no decode SnapKV queries were recorded (the request's ring is empty)")
        if r.broken:
            raise ValueError(f"the decode SnapKV ring is incomplete: {r.broken}")
        if r.hi != end or start < max(r.lo, r.hi - r.size):
            raise ValueError(f"the ring holds positions [{max(r.lo, r.hi - r.size)}, {r.hi}), not [{start}, {end})")
        self._every_layer_recorded(r, layer_names, "ring")
        slots = torch.arange(start, end, device=r.buf.device) % r.size
        return {n: r.buf[self.index[n]].index_select(0, slots) for n in layer_names}

    def queries(self, rid: str, start: int, end: int, layer_names: list[str]) -> dict:
        """The recorded queries of [start, end) per layer (contiguous views of the window's
        buffer), or ValueError saying what is missing."""
        w = self.windows.get(rid)
        if w is None:
            raise ValueError("no observation-window queries were captured")
        if w.broken:
            raise ValueError(f"the observation window is incomplete: {w.broken}")
        if w.lo is None or w.lo > start or w.hi < end or w.end != end:
            raise ValueError(f"captured positions [{w.lo}, {w.hi}) of window [{w.start}, {w.end}) do not cover "
                             f"[{start}, {end})")
        self._every_layer_recorded(w, layer_names, "window")
        return {n: w.buf[self.index[n], start - w.start:end - w.start] for n in layer_names}

    def _every_layer_recorded(self, target: Window | Ring, layer_names: list[str], what: str) -> None:
        """ValueError unless each layer recorded every position of the run [lo, hi)."""
        short = [n for n in layer_names if target.rows[self.index[n]] != target.hi - target.lo]
        if short:
            raise ValueError(f"layers {short[:3]} recorded {target.rows[self.index[short[0]]]} of "
                             f"{target.hi - target.lo} {what} rows (their attention forward did not run the hook, "
                             "e.g. a step replayed as a full CUDA graph)")

    def end_step(self, captures: dict) -> None:
        """Drop the windows this step completed (their event ran, or none falls due)."""
        for rid, cap in captures.items():
            if cap.hi == cap.end:
                self._release(rid)
        self.rows = []

    def event_done(self, rid: str) -> None:
        """The request's event ran (or failed): its window is dropped; its decode ring goes on,
        as the scheduler's run does (the next decode window may hold queries from before it)."""
        self._release(rid)

    def forget(self, req_ids) -> None:
        for rid in req_ids:
            self._release(rid)
            self._release_ring(rid)
