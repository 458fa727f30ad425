"""Quality: mean NLL (nats/byte) of held-out continuations after a compressed prompt, on the
trained byte-llama-5m, per policy and budget, next to the dense cache and NVIDIA's kvpress.

For each sample, the prompt's KV cache (transformers forward) is compressed and the
continuation is then teacher-forced over what was kept, at its logical positions:
- dense: nothing evicted.
- kvsieve: the library itself does the work. Each layer's K/V is laid out in a paged NHD
  cache (block_size 32, as vLLM's CPU backend requires), and libkvsieve plans the kept count
  (`kvs_plan_keep_count`, whole blocks), scores (`kvs_score_snapkv`/`kvs_score_knorm`, SnapKV
  with the window queries the model itself computed), selects and compacts in place; the
  continuation reads the compacted rows. (The vLLM plugin runs these same calls on vLLM's
  cache; its engine tests check it against a transformers forward over the kept K/V to 2e-5.)
  Two configs per policy: kvsieve's defaults, and kvsieve set to kvpress's settings.
- kvpress: `kvpress` (PyPI, transformers<5.3, so it runs in a child process with its own
  site dir) with the press of the same policy, its default settings, and the compression ratio
  that keeps exactly the number of tokens kvsieve kept, so only the policies differ.

Usage: python bench/quality.py [--model DIR] [--samples N] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import child  # noqa: E402
import provenance  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "byte-llama-5m"
BOS = 256
# val.txt concatenates 9 held-out tails; a sample must not straddle two (model README).
DOC_ENDS = [55712, 89561, 149869, 310688, 400255, 449789, 476701, 527709, 548538]
BLOCK_SIZE = 32
if (ROOT / "target" / "release" / "libkvsieve.so").is_file():
    os.environ.setdefault("KVSIEVE_LIB", str(ROOT / "target" / "release" / "libkvsieve.so"))

# kvsieve configs per policy: its defaults, and the settings kvpress's press of that name uses
# (SnapKVPress: window 64, avg pool 5, no sink; KnormPress: no sink, no recent window;
# StreamingLLMPress: 4 sink tokens).
OURS = {
    "streaming": 'policy = "streaming"\n',
    "knorm": 'policy = "knorm"\n',
    "snapkv": 'policy = "snapkv"\n',
}
MATCHED = {
    "streaming": 'policy = "streaming"\nsink_tokens = 4\nrecent_tokens = 0\n',
    "knorm": 'policy = "knorm"\nsink_tokens = 0\nrecent_tokens = 0\n',
    "snapkv": 'policy = "snapkv"\nsink_tokens = 0\nrecent_tokens = 0\nwindow = 64\npool_kernel = 5\npool = "avg"\n',
}


def samples(val: Path, n: int, prompt_len: int, cont_len: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """n (prompt, continuation) pairs of byte ids from val.txt; the prompt starts with BOS."""
    data = val.read_bytes()
    rng = random.Random(seed)
    need = prompt_len - 1 + cont_len
    out = []
    while len(out) < n:
        off = rng.randrange(0, len(data) - need)
        if any(off < end < off + need for end in DOC_ENDS):
            continue
        chunk = list(data[off:off + need])
        out.append(([BOS] + chunk[:prompt_len - 1], chunk[prompt_len - 1:]))
    return out


def _teacher_forced_nll(model, cache, logits_last, prompt_len: int, cont: list[int]) -> float:
    """Mean NLL of `cont` given the prompt's last logits and a (possibly compressed) cache."""
    import torch

    step = model(torch.tensor([cont[:-1]]), position_ids=torch.arange(prompt_len, prompt_len + len(cont) - 1)[None],
                 past_key_values=cache, use_cache=True)
    logits = torch.cat([logits_last[None], step.logits[0]], 0).double()
    lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None])
    return float(-lp.mean())


def _prefill(model, prompt: list[int], window: int):
    """Forward over the prompt; returns (output, per-layer rotated queries of the last `window`
    positions as float32 [window, q_heads, head_dim])."""
    import torch
    from transformers.models.llama import modeling_llama

    recorded = []
    real = modeling_llama.apply_rotary_pos_emb

    def recording(q, k, *args, **kwargs):
        q2, k2 = real(q, k, *args, **kwargs)
        recorded.append(q2[0, :, -window:, :].transpose(0, 1).float().contiguous())
        return q2, k2

    modeling_llama.apply_rotary_pos_emb = recording
    try:
        with torch.no_grad():
            out = model(torch.tensor([prompt]), use_cache=True)
    finally:
        modeling_llama.apply_rotary_pos_emb = real
    return out, recorded


def kvsieve_compress(lib, kernels, config, cache, queries, block_size: int = BLOCK_SIZE, logical: int | None = None,
                     phase: int = 0, rescore=None, carried: dict | None = None) -> int:
    """Compress every layer of a transformers cache with libkvsieve in a paged NHD cache, as the
    event of `phase` (default prefill end; bench/decode_quality.py passes decode) at `logical`
    tokens (default: the cache's length, nothing evicted yet); returns the kept token count (the
    cache's length when the plan releases nothing).

    `rescore` (offline prototypes of other rules, bench/decode_quality.py): an object whose
    `scores(layer, scores, keys)` rewrites the library's SnapKV scores ([heads, length] float32,
    in place) before the library selects, and whose `kept(layer, scores, keep)` sees what was kept
    ([heads, selected] positions, ascending).

    `carried` (decode SnapKV with `[decode] carry`, as the plugin's worker does): one request's
    carried scores, layer -> [heads, kept] tensor, read and replaced here; pass the same dict to
    each event of one sequence."""
    import torch
    from kvsieve_vllm import carry
    from kvsieve_vllm.lib import DTYPE, LAYOUT, PHASE_DECODE, POLICY_NAMES, KvCache, Sequence, TokenSelect

    params = config.params(phase)
    policy = POLICY_NAMES[params.policy]
    _, heads, length, dim = cache.layers[0].keys.shape
    plan = config.plan(length if logical is None else logical, length, 0, block_size, phase)
    if plan.released_blocks == 0:
        return length
    nb = math.ceil(length / block_size)
    k_sel = int(plan.selected_tokens)
    row = torch.arange(nb, dtype=torch.int32)
    seq = Sequence(row=row.data_ptr(), row_len=nb, cached_len=length, protected_len=0)
    sel = TokenSelect(cached_len=length, protected_len=0, sink_tokens=params.sink_tokens,
                      protected_tail=params.protected_tail, selected=k_sel)
    scores = torch.empty(heads * length, dtype=torch.float32)
    keep = torch.empty(heads * k_sel, dtype=torch.int32)
    released = torch.empty(nb, dtype=torch.int32)
    for li, (layer, q) in enumerate(zip(cache.layers, queries)):
        paged = []
        for t in (layer.keys, layer.values):  # [1, H, C, D] -> [nb, bs, H, D], zero-padded tail
            p = torch.zeros(nb * block_size, heads, dim, dtype=torch.float32)
            p[:length] = t[0].transpose(0, 1).float()
            paged.append(p.view(nb, block_size, heads, dim).contiguous())
        desc = KvCache(k=paged[0].data_ptr(), v=paged[1].data_ptr(), dtype=DTYPE["float32"], layout=LAYOUT["nhd"],
                       device=0, num_blocks=nb, block_size=block_size, num_kv_heads=heads, head_dim=dim,
                       block_stride=0, token_stride=0, head_stride=0)
        gamma = params.carry if carried is not None and phase == PHASE_DECODE and policy == "snapkv" else 0.0
        prior = carried.get(li) if gamma > 0 else None
        rank = None
        if prior is not None:
            def rank(s, p=prior):
                carry.fold(s.view(heads, length), p, 0, gamma)
        kernels.select(desc, seq, policy, params, sel, q, scores, keep, rank=rank)
        if gamma > 0:
            carried[li] = carry.kept_scores(scores.view(heads, length), keep.view(heads, k_sel))
        if rescore is not None:  # select again by the rewritten scores
            assert policy == "snapkv", f"rescore reranks SnapKV scores, not {policy}'s"
            rescore.scores(li, scores.view(heads, length), layer.keys[0].float())
            kernels.select_tokens(scores.data_ptr(), scores.numel(), heads, sel, keep.data_ptr(), keep.numel())
            rescore.kept(li, scores.view(heads, length), keep.view(heads, k_sel))
        n = kernels.compact(desc, seq, keep.data_ptr(), keep.numel(), k_sel, released.data_ptr(), released.numel())
        assert n == plan.released_blocks, (n, plan.released_blocks)
        kept = int(plan.kept_tokens)
        k_out, v_out = (p.view(nb * block_size, heads, dim)[:kept].transpose(0, 1)[None].contiguous() for p in paged)
        layer.keys, layer.values = k_out.to(layer.keys.dtype), v_out.to(layer.values.dtype)
    return int(plan.kept_tokens)


def run_ours(model_dir: Path, data: list, policies: list[str], budgets: list[float]) -> dict:
    """Dense and kvsieve NLLs. Returns {"dense": [...], "kvsieve": {policy: {budget: {...}}},
    "kvsieve_matched": ...}; each entry holds per-sample NLLs and kept counts."""
    import torch
    from transformers import LlamaForCausalLM

    from kvsieve_vllm.lib import CpuKernels, load

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    lib = load()
    kernels = CpuKernels(lib)
    res: dict = {"dense": [], "kvsieve": {}, "kvsieve_matched": {}}
    for prompt, cont in data:
        out, _ = _prefill(model, prompt, 1)
        with torch.no_grad():
            res["dense"].append(_teacher_forced_nll(model, out.past_key_values, out.logits[0, -1], len(prompt), cont))
    for name, table in (("kvsieve", OURS), ("kvsieve_matched", MATCHED)):
        for policy in policies:
            for b in budgets:
                config = lib.config_from_str(f"[sparsity]\n{table[policy]}budget_ratio = {b}\nmin_length = 1\n")
                window = config.params(0).window
                nll, kept = [], []
                for prompt, cont in data:
                    out, queries = _prefill(model, prompt, window)
                    with torch.no_grad():
                        kept.append(kvsieve_compress(lib, kernels, config, out.past_key_values, queries))
                        nll.append(_teacher_forced_nll(model, out.past_key_values, out.logits[0, -1], len(prompt), cont))
                res[name].setdefault(policy, {})[str(b)] = {"nll": nll, "kept": kept}
    return res


KVPRESS_CHILD = r"""
import json, sys, torch
from transformers import DynamicCache, LlamaForCausalLM
from kvpress import KnormPress, SnapKVPress, StreamingLLMPress
spec = json.loads(sys.stdin.read())
model = LlamaForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32).eval()
press_of = {"streaming": StreamingLLMPress, "knorm": KnormPress, "snapkv": SnapKVPress}
out = {}
for job in spec["jobs"]:
    prompt, cont, kept = job["prompt"], job["cont"], job["kept"]
    ratio = (len(prompt) - kept - 0.5) / len(prompt)  # int(len * (1 - ratio)) == kept
    press = press_of[job["policy"]](compression_ratio=max(ratio, 0.0))
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        o = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
    with torch.no_grad():
        assert cache.get_seq_length() == kept, (cache.get_seq_length(), kept)
        n = len(prompt)
        step = model(torch.tensor([cont[:-1]]), position_ids=torch.arange(n, n + len(cont) - 1)[None],
                     past_key_values=cache, use_cache=True)
        logits = torch.cat([o.logits[0, -1][None], step.logits[0]], 0).double()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None])
    out.setdefault(job["policy"], {}).setdefault(job["budget"], []).append(float(-lp.mean()))
print("RESULT" + json.dumps({"nll": out, "version": __import__("kvpress").__version__ if hasattr(__import__("kvpress"), "__version__") else "?"}))
"""


def run_kvpress(model_dir: Path, data: list, ours: dict) -> dict:
    """kvpress NLLs keeping kvsieve's kept counts, in a child process with kvpress's site dir
    (scripts/setup.sh installs it) ahead of the venv's packages."""
    env = child.kvpress_env()
    jobs = []
    for policy, per_budget in ours.items():
        for b, entry in per_budget.items():
            for (prompt, cont), kept in zip(data, entry["kept"]):
                jobs.append({"policy": policy, "budget": b, "prompt": prompt, "cont": cont, "kept": kept})
    return child.run(KVPRESS_CHILD, {"model": str(model_dir), "jobs": jobs}, env, "kvpress run")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def table(result: dict) -> str:
    dense = mean(result["dense"])
    rows = ["| policy | budget | kept tokens (of prompt) | dense | kvsieve (defaults) | kvsieve (kvpress settings) | kvpress |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    n = result["prompt_len"]
    for policy, per_budget in result["kvsieve"].items():
        for b, entry in per_budget.items():
            matched = result["kvsieve_matched"][policy][b]
            kp = result["kvpress"].get(policy, {}).get(b)
            rows.append(f"| {policy} | {float(b):.0%} | {mean(entry['kept']):.0f} of {n} | {dense:.4f} | "
                        f"{mean(entry['nll']):.4f} | {mean(matched['nll']):.4f} | "
                        + (f"{mean(kp):.4f} |" if kp else "n/a |"))
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(result["kvsieve"])
    fig, axes = plt.subplots(1, len(policies), figsize=(4.2 * len(policies), 3.6), sharey=True)
    dense = mean(result["dense"])
    for ax, policy in zip(axes if len(policies) > 1 else [axes], policies):
        budgets = sorted(result["kvsieve"][policy], key=float)
        xs = [100 * float(b) for b in budgets]
        for key, label, style in (("kvsieve", "kvsieve (defaults)", "o-"),
                                  ("kvsieve_matched", "kvsieve (kvpress settings)", "s--")):
            ax.plot(xs, [mean(result[key][policy][b]["nll"]) for b in budgets], style, label=label)
        kp = result["kvpress"].get(policy, {})
        if kp:
            ax.plot(xs, [mean(kp[b]) for b in budgets], "^:", label="kvpress")
        ax.axhline(dense, color="gray", lw=1, label="dense cache")
        ax.set_title(policy)
        ax.set_xlabel("budget (% of prompt)")
        ax.grid(alpha=0.3)
    (axes[0] if len(policies) > 1 else axes).set_ylabel("continuation NLL (nats/byte)")
    (axes[-1] if len(policies) > 1 else axes).legend(fontsize=8)
    fig.suptitle(f"byte-llama-5m: {result['samples']} held-out samples, {result['prompt_len']}-token prompt, "
                 f"{result['continuation_len']}-byte continuation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="trained model dir (default: %(default)s)")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=768, help="prompt tokens incl. BOS (model trained at 1024)")
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--policies", default="streaming,knorm,snapkv")
    ap.add_argument("--no-kvpress", action="store_true", help="skip the kvpress reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    if not (a.model / "config.json").is_file():
        raise SystemExit(f"--model {a.model}: no config.json there; the trained fixture lives at "
                         f"models/byte-llama-5m (pass --model to point at it)")
    if a.prompt_len + a.continuation > 1024:
        raise SystemExit(f"--prompt-len + --continuation = {a.prompt_len + a.continuation}: byte-llama-5m "
                         "is trained on 1024-token windows; keep the sum at most 1024")
    budgets = [float(b) for b in a.budgets.split(",")]
    policies = a.policies.split(",")
    for p in policies:
        if p not in OURS:
            raise SystemExit(f"--policies: unknown policy {p!r}; choose from {', '.join(OURS)}")
    data = samples(a.model / "val.txt", a.samples, a.prompt_len, a.continuation, a.seed)
    result = {"model": str(a.model), "samples": a.samples, "prompt_len": a.prompt_len,
              "continuation_len": a.continuation, "block_size": BLOCK_SIZE, "seed": a.seed,
              "configs": {"kvsieve": OURS, "kvsieve_matched": MATCHED}}
    result.update(run_ours(a.model, data, policies, budgets))
    result["kvpress"] = {} if a.no_kvpress else run_kvpress(a.model, data, result["kvsieve"])["nll"]
    result = {"provenance": provenance.record(model=a.model, config_note="the library's calls with the configs "
                                              "in `configs` (OURS: kvsieve's defaults; MATCHED: kvpress's settings)"),
              **result}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quality.json").write_text(json.dumps(result, indent=1))
    plot(result, a.out / "quality.png")
    md = table(result)
    (a.out / "quality.md").write_text(md + "\n")
    print(md)
    print(f"wrote {a.out / 'quality.json'}, {a.out / 'quality.png'}, {a.out / 'quality.md'}")


if __name__ == "__main__":
    main()
