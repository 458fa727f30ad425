"""The API server's side of kvsieve's metrics (entry point group `vllm.stat_logger_plugins`):
`KvsieveStatLogger` turns the snapshots the engines put on `SchedulerStats` (`metrics`) into
Prometheus series on vLLM's `/metrics`. Imported by vLLM only; see `metrics` for the series.
"""

from __future__ import annotations

import os

from .metrics import FIELD, KEPT_RATIO, METADATA_BYTES


def _base():
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase

    return AggregateStatLoggerBase


class KvsieveStatLogger(_base()):
    """Prometheus series from the kvsieve snapshots of every engine (one logger for all engines,
    as vLLM's PrometheusStatLogger): counters advance by each snapshot's increments (see
    `metrics`), so several API servers, each handed some of the steps, add up to the truth.
    Inert unless KVSIEVE_CONFIG is set in the API server."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        self.engine_indexes = list(engine_indexes or [0])
        self.model_name = vllm_config.model_config.served_model_name if vllm_config.model_config else ""
        self.enabled = bool(os.environ.get("KVSIEVE_CONFIG"))
        self.series = None

    def _make_series(self) -> None:
        # Made on first use, not in __init__: vLLM's PrometheusStatLogger, built after the
        # plugins' loggers, unregisters every `vllm:` collector it finds when it starts.
        import prometheus_client as prom

        names = {"compressions": "compression events done",
                 "prefill_chunk_compressions": "of them, between prefill chunks ([prefill])",
                 "tokens_before": "cached tokens before those events",
                 "tokens_evicted": "cached tokens evicted", "blocks_released": "KV blocks handed back to vLLM",
                 "selection_rows": "decode rows that read a block selection ([selection])",
                 "selection_blocks_read": "blocks those rows read per selected layer",
                 "selection_blocks_cached": "blocks those rows hold",
                 "selection_failed": "layers or steps that fell back to reading every block"}
        labels = ["model_name", "engine"]
        registry = prom.REGISTRY
        for collector in list(registry._collector_to_names):
            if getattr(collector, "_name", "").startswith("vllm:kvsieve_"):
                registry.unregister(collector)
        s = {k: prom.Counter(f"vllm:kvsieve_{k}", f"kvsieve: {doc}", labels) for k, doc in names.items()}
        s["kept_ratio"] = prom.Gauge("vllm:kvsieve_kept_ratio", "kvsieve: cached tokens kept over cached tokens "
                                     "before, all events so far (1 before any)", labels, multiprocess_mode="mostrecent")
        s[METADATA_BYTES] = prom.Gauge("vllm:kvsieve_selection_metadata_bytes", "kvsieve: bytes of Quest metadata "
                                       "(per-block min/max keys) on one worker", labels, multiprocess_mode="mostrecent")
        s["seconds"] = prom.Counter("vllm:kvsieve_seconds", "kvsieve: seconds spent, by side", labels + ["side"])
        s["failed"] = prom.Counter("vllm:kvsieve_events_failed", "kvsieve: events not done, by reason",
                                   labels + ["reason"])
        s["skipped"] = prom.Counter("vllm:kvsieve_events_skipped", "kvsieve: prefill-end events not run, by reason",
                                    labels + ["reason"])
        s["requests"] = prom.Counter("vllm:kvsieve_requests", "kvsieve: requests by what they asked for",
                                     labels + ["kind"])
        for idx in self.engine_indexes:
            lv = [self.model_name, str(idx)]
            for k in names:
                s[k].labels(*lv)
            s["kept_ratio"].labels(*lv).set(1.0)
            for side in ("scheduler", "worker"):
                s["seconds"].labels(*lv, side)
            for kind in ("opted_out", "own_budget", "ended_with_error"):
                s["requests"].labels(*lv, kind)
        self.series = s

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if not self.enabled:
            return
        snap = getattr(scheduler_stats, FIELD, None) if scheduler_stats is not None else None
        if not snap:
            return
        if self.series is None:
            self._make_series()
        s, lv = self.series, [self.model_name, str(engine_idx)]
        for key, delta in snap.items():
            kind, _, label = key.partition(":")
            if key in (KEPT_RATIO, METADATA_BYTES):
                s[key].labels(*lv).set(delta)
            elif delta <= 0 or kind not in s:
                continue
            elif label:
                s[kind].labels(*lv, label).inc(delta)
            else:
                s[kind].labels(*lv).inc(delta)

    def log_engine_initialized(self):
        if self.enabled and self.series is None:
            self._make_series()

    def log(self):
        pass
