"""kvsieve's counters in one process: the scheduler side (blocks released back to vLLM) and the
worker side (tokens evicted, time spent compacting)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Aggregate counters of one process (worker or scheduler side)."""

    compressions: int = 0
    tokens_before: int = 0
    tokens_evicted: int = 0
    blocks_released: int = 0
    seconds: float = 0.0
    per_request: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        ratio = (self.tokens_before - self.tokens_evicted) / self.tokens_before if self.tokens_before else 1.0
        return {
            "compressions": self.compressions,
            "tokens_before": self.tokens_before,
            "tokens_evicted": self.tokens_evicted,
            "blocks_released": self.blocks_released,
            "kept_ratio": ratio,
            "seconds_in_kvsieve": self.seconds,
            "per_request": dict(self.per_request),
        }


SCHEDULER_STATS = Stats()
WORKER_STATS = Stats()


def stats() -> dict:
    """Counters of this process: `scheduler` (blocks released back to vLLM) and `worker` (tokens
    evicted and compaction time). In vLLM's in-process mode both live here."""
    return {"scheduler": SCHEDULER_STATS.as_dict(), "worker": WORKER_STATS.as_dict()}
