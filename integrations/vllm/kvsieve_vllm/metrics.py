"""kvsieve on vLLM's `/metrics`, through vLLM's own stats path.

The engine core (where the scheduler runs, in a process of its own under the OpenAI server)
puts what kvsieve's scheduler-side counters gained since its last report on every
`SchedulerStats` it makes (`SchedulerStats.kvsieve`, a field kvsieve adds in every process
when it is enabled), with the cumulative kept ratio. Increments, not totals: vLLM hands each
step's stats to one API server, and with `--api-server-count N` each of the N processes
exports what it was handed, which Prometheus' multiprocess mode sums; totals would be counted
up to N times. The workers' time arrives with their acknowledgements, so with tensor
parallelism nothing is read from a worker process. In the API server,
`stat_logger.KvsieveStatLogger` (entry point group `vllm.stat_logger_plugins`) adds the
increments to Prometheus series beside vLLM's, with vLLM's names and labels (`vllm:` prefix,
`model_name`, `engine`):

    vllm:kvsieve_compressions_total           compression events done
    vllm:kvsieve_tokens_before_total          cached tokens those events started from
    vllm:kvsieve_tokens_evicted_total         cached tokens they evicted
    vllm:kvsieve_blocks_released_total        KV blocks handed back to vLLM's pool
    vllm:kvsieve_kept_ratio                   1 - evicted / before (1 before any event)
    vllm:kvsieve_seconds_total{side}          time in kvsieve: scheduler, worker
    vllm:kvsieve_events_failed_total{reason}  events not done (worker, torn, lost, ...)
    vllm:kvsieve_events_skipped_total{reason} prefill-end events not run (opted_out, ...)
    vllm:kvsieve_requests_total{kind}         requests that asked for something: opted_out, own_budget
    vllm:kvsieve_selection_rows_total         decode rows that read a block selection ([selection])
    vllm:kvsieve_selection_blocks_read_total  blocks those rows read (every selected layer reads as many)
    vllm:kvsieve_selection_blocks_cached_total blocks those rows hold
    vllm:kvsieve_selection_failed_total       layers or steps that fell back to reading every block
    vllm:kvsieve_selection_metadata_bytes     the Quest metadata's size on one worker (a gauge)
    (seconds_total{side="selection"}: the workers' time selecting, inside the forward)
"""

from __future__ import annotations

import dataclasses

from .stats import SCHEDULER_STATS

FIELD = "kvsieve"
KEPT_RATIO = "kept_ratio"  # entries that are not increments: this one
METADATA_BYTES = "selection_metadata_bytes"  # and this one
_installed = False
_reported: dict[str, float] = {}  # the totals as of the last report (this engine core's)
_metadata_bytes = 0  # the gauge as last reported


def totals() -> dict[str, float]:
    """The engine's cumulative kvsieve counters as a flat map."""
    s = SCHEDULER_STATS
    out = {"compressions": s.compressions, "prefill_chunk_compressions": s.chunk_compressions,
           "tokens_before": s.tokens_before, "tokens_evicted": s.tokens_evicted,
           "blocks_released": s.blocks_released, "seconds:scheduler": s.seconds, "seconds:worker": s.worker_seconds}
    sel = s.selection
    if sel:
        out.update({"selection_rows": sel["rows"], "selection_blocks_read": sel["blocks_read"],
                    "selection_blocks_cached": sel["blocks_total"], "selection_failed": sel["failed"],
                    "seconds:selection": sel["seconds"]})
    for prefix, counter in (("failed:", s.failed), ("skipped:", s.skipped), ("requests:", s.requests)):
        for k, v in counter.items():
            out[prefix + k] = v
    return out


def snapshot() -> dict[str, float]:
    """What rides on one SchedulerStats: each counter's increment since the previous snapshot
    (those that moved), and the cumulative kept ratio. Each snapshot is handed to exactly one
    API server, so the increments add up to the totals however many there are."""
    now = totals()
    out = {k: v - _reported.get(k, 0.0) for k, v in now.items() if v != _reported.get(k, 0.0)}
    _reported.clear()
    _reported.update(now)
    s = SCHEDULER_STATS
    out[KEPT_RATIO] = (s.tokens_before - s.tokens_evicted) / s.tokens_before if s.tokens_before else 1.0
    global _metadata_bytes
    if s.selection_metadata_bytes != _metadata_bytes:  # a gauge: sent when it changes
        out[METADATA_BYTES] = _metadata_bytes = s.selection_metadata_bytes
    return out


def install_stats_field() -> None:
    """Give vLLM's SchedulerStats a `kvsieve` field (default None) so the snapshot crosses the
    engine-core -> API-server boundary: vLLM's msgpack transport encodes and decodes a
    dataclass by its declared fields. Every process does this at register(), before vLLM builds
    an encoder or decoder; a process that did not simply reads None."""
    global _installed
    if _installed:
        return
    from vllm.v1.metrics.stats import SchedulerStats

    if FIELD not in SchedulerStats.__dataclass_fields__:
        f = dataclasses.field(default=None, init=False)  # so dataclasses.replace() still works
        f.name, f.type = FIELD, "dict[str, float] | None"
        f._field_type = dataclasses._FIELD  # what @dataclass sets on a regular field
        SchedulerStats.__annotations__[FIELD] = dict[str, float] | None
        SchedulerStats.__dataclass_fields__[FIELD] = f
        setattr(SchedulerStats, FIELD, None)  # instances made by vLLM's own __init__ read None
    _installed = True


def wrap_make_stats(orig):
    """`Scheduler.make_stats`: vLLM's stats with kvsieve's snapshot on them."""

    def make_stats(self, *args, **kwargs):
        stats = orig(self, *args, **kwargs)
        if stats is not None and self.__dict__.get("_kvsieve") is not None:
            try:
                setattr(stats, FIELD, snapshot())
            except Exception:  # never let metrics take a step down
                pass
        return stats

    return make_stats
