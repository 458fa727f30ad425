"""SnapKV observation windows on the worker: the queries of each request's last `window`
positions, recorded from the attention forward of whichever steps (prefill chunks) compute them.

The scheduler says, per step, which logical positions of which window the step computes
(`protocol.Capture`); `Windows.plan_step` maps them to rows of the step's flattened batch, and
the attention backend's hook calls `record` for each layer while `ACTIVE` is this runner's
store. `ACTIVE` is set only around a real step's forward, so a dummy or profiling forward
never writes a window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The store of the runner whose step is executing (None outside execute_model).
ACTIVE: "Windows | None" = None


@dataclass
class Window:
    """Queries of logical positions [start, end), per layer name: float32 [end - start, q_heads,
    head_dim]. `lo` is the first position recorded (the rest up to `end` follow it in order)."""

    start: int
    end: int
    lo: int | None = None
    hi: int | None = None
    layers: dict = field(default_factory=dict)
    broken: str = ""


class Windows:
    """The windows of one model runner."""

    def __init__(self) -> None:
        self.windows: dict[str, Window] = {}
        self.rows: list[tuple[str, int, int, int]] = []  # (req id, batch row, count, slot)

    def plan_step(self, runner, captures: dict, num_scheduled_tokens) -> None:
        """Map this step's captures to batch rows (`_prepare_inputs` has laid out the batch)."""
        self.rows = []
        if not captures:
            return
        num_reqs = runner.input_batch.num_reqs
        starts = runner.query_start_loc.np[: num_reqs + 1]
        for i, rid in enumerate(runner.input_batch.req_ids[:num_reqs]):
            cap = captures.get(rid)
            if cap is None:
                continue
            first = int(runner.input_batch.num_computed_tokens_cpu[i])
            if cap.lo < first or cap.hi > first + int(num_scheduled_tokens[i]):
                self._break(rid, cap, f"the step computes positions [{first}, {first + int(num_scheduled_tokens[i])}) "
                                      f"but the scheduler asked for [{cap.lo}, {cap.hi})")
                continue
            w = self.windows.get(rid)
            if w is None or (w.start, w.end) != (cap.start, cap.end):
                w = self.windows[rid] = Window(cap.start, cap.end)
            if w.hi is not None and cap.lo != w.hi:
                w.broken = f"window positions [{w.hi}, {cap.lo}) were never computed"
            w.lo = cap.lo if w.lo is None else w.lo
            w.hi = cap.hi
            self.rows.append((rid, int(starts[i]) + cap.lo - first, cap.hi - cap.lo, cap.lo - cap.start))

    def _break(self, rid: str, cap, why: str) -> None:
        w = self.windows.setdefault(rid, Window(cap.start, cap.end))
        w.broken = why

    def record(self, layer_name: str, query) -> None:
        """Copy this step's window rows of `query` [tokens, q_heads, head_dim] for one layer."""
        import torch

        for rid, row, count, slot in self.rows:
            w = self.windows[rid]
            buf = w.layers.get(layer_name)
            if buf is None:
                # On the query's device: a GPU forward records without a host copy.
                buf = w.layers[layer_name] = torch.zeros(w.end - w.start, query.shape[1], query.shape[2],
                                                         dtype=torch.float32, device=query.device)
            buf[slot:slot + count] = query[row:row + count].float()

    def fail_step(self, why: str) -> None:
        """Recording failed in this step: the windows it was writing cannot be trusted."""
        for rid, *_ in self.rows:
            self.windows[rid].broken = why

    def queries(self, rid: str, start: int, end: int, layer_names: list[str]) -> dict:
        """The recorded queries of [start, end) per layer, or ValueError saying what is missing."""
        w = self.windows.get(rid)
        if w is None:
            raise ValueError("no observation-window queries were captured")
        if w.broken:
            raise ValueError(f"the observation window is incomplete: {w.broken}")
        if w.lo is None or w.lo > start or w.hi < end or w.end != end:
            raise ValueError(f"captured positions [{w.lo}, {w.hi}) of window [{w.start}, {w.end}) do not cover "
                             f"[{start}, {end})")
        missing = [n for n in layer_names if n not in w.layers]
        if missing:
            raise ValueError(f"no window queries for layers {missing[:3]}")
        return {n: w.layers[n][start - w.start:end - w.start].contiguous() for n in layer_names}

    def end_step(self, captures: dict) -> None:
        """Drop the windows this step completed (their event ran, or none falls due)."""
        for rid, cap in captures.items():
            if cap.hi == cap.end:
                self.windows.pop(rid, None)
        self.rows = []

    def forget(self, req_ids) -> None:
        for rid in req_ids:
            self.windows.pop(rid, None)
