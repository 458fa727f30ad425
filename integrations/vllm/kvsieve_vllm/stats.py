"""kvsieve's counters in one process: the scheduler side (events planned, blocks released back
to vLLM, failures by reason) and the worker side (tokens evicted, time spent compacting).

Memory stays bounded however long the engine runs: aggregates are plain counters and
`per_request` keeps the `PER_REQUEST_LIMIT` most recently updated requests.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

PER_REQUEST_LIMIT = 1024


@dataclass
class Stats:
    """Aggregate counters of one side (worker or scheduler) in this process."""

    compressions: int = 0
    chunk_compressions: int = 0  # of them, between prefill chunks (`[prefill]`)
    tokens_before: int = 0
    tokens_evicted: int = 0
    blocks_released: int = 0
    seconds: float = 0.0
    failed: Counter = field(default_factory=Counter)  # events not done, by reason
    skipped: Counter = field(default_factory=Counter)  # prefill-end events not run, by reason
    requests: Counter = field(default_factory=Counter)  # requests by what they asked (opted_out, own_budget)
    worker_seconds: float = 0.0  # scheduler side: the workers' time on events, from their acks
    counts: Counter = field(default_factory=Counter)  # other events worth counting, by name
    # Block selection (`[selection]`), from the workers' acks: steps, rows, blocks_read,
    # blocks_total, seconds, failed; and the metadata's size on the reporting worker.
    selection: Counter = field(default_factory=Counter)
    selection_metadata_bytes: int = 0
    per_request: OrderedDict = field(default_factory=OrderedDict)

    def request(self, req_id: str) -> dict:
        """The per-request entry (made on first use), moved to the most recent end."""
        entry = self.per_request.pop(req_id, None)
        if entry is None:
            entry = {"events": 0, "tokens_evicted": 0, "blocks_released": 0}
        self.per_request[req_id] = entry
        while len(self.per_request) > PER_REQUEST_LIMIT:
            self.per_request.popitem(last=False)
        return entry

    def compressed(self, req_id: str, cached: int, evicted: int, released: int) -> dict:
        self.compressions += 1
        self.tokens_before += cached
        self.tokens_evicted += evicted
        self.blocks_released += released
        entry = self.request(req_id)
        entry["events"] += 1
        entry["tokens_evicted"] += evicted
        entry["blocks_released"] += released
        return entry

    def selected(self, got: dict) -> None:
        for k, v in got.items():
            if k == "metadata_bytes":
                self.selection_metadata_bytes = int(v)
            else:
                self.selection[k] += v

    def as_dict(self) -> dict:
        ratio = (self.tokens_before - self.tokens_evicted) / self.tokens_before if self.tokens_before else 1.0
        return {
            "compressions": self.compressions,
            "prefill_chunk_compressions": self.chunk_compressions,
            "tokens_before": self.tokens_before,
            "tokens_evicted": self.tokens_evicted,
            "blocks_released": self.blocks_released,
            "kept_ratio": ratio,
            "seconds_in_kvsieve": self.seconds,
            "seconds_in_workers": self.worker_seconds,
            "events_failed": dict(self.failed),
            "events_skipped": dict(self.skipped),
            "requests": dict(self.requests),
            "counts": dict(self.counts),
            "selection": {**self.selection, "metadata_bytes": self.selection_metadata_bytes},
            "per_request": {k: dict(v) for k, v in self.per_request.items()},
        }


SCHEDULER_STATS = Stats()
WORKER_STATS = Stats()


def stats() -> dict:
    """Counters of this process: `scheduler` (events, blocks released back to vLLM, failures)
    and `worker` (tokens evicted, compaction time). In vLLM's in-process mode both live here."""
    return {"scheduler": SCHEDULER_STATS.as_dict(), "worker": WORKER_STATS.as_dict()}
