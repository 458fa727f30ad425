"""Choose `[selection] spread` offline: SmolLM2 answers needle prompts with each decode step's
attention masked, per layer, to the blocks Quest's rule picks at a given spread.

    .venv/bin/python bench/selection_sweep.py                        # the sweep behind the default
    .venv/bin/python bench/selection_sweep.py --spreads 1,0.5 --budgets 512,1024 --samples 2

The same rule as the library (`kvs_quest_select`, `reference.selected_logprobs` in the vLLM
tests): a block's score is the max over query heads of sum_d q_d*c_d + spread*|q_d|*w_d, c and w
the centre and half-width of its keys' range per channel (spread 1: Quest's upper bound of q.k);
the first and the last block always read, the rest of `budget` tokens by score, in every layer
from `dense_layers` on; the prompt itself runs dense. Here in torch on HF transformers (masked,
not gathered), so a sweep needs no engine restarts; vLLM's figures are bench/accuracy.py's.

Two variants the library does not ship, kept to measure them again: `--recent-blocks 1,3` always
reads the last 3 blocks (not only the partial one), `--relative` ranks a block by its bound minus
the head's best bound before the max over heads (softmax cannot tell a head's scores apart from
their shift). Both lost prompts on the tuning split (bench/README.md, "Block selection").

Diagnosis, not choice: `--oracles max,mass` also runs two rules that look at the keys themselves
(each block's true largest q.k, or the attention it actually gets), the best a rule sharing one
table per request and layer could aim at; `--sub-block 8` keeps key ranges per 8 tokens and
scores a block by its best part (what finer metadata would buy); `--per-head` gives each KV
head a table of its own (what "virtual heads" would buy); `--missed RESULT:RUN` runs the
prompts of an accuracy result that dense answered and RUN did not.

The prompts come from `--seed` (default 2): a split of its own, neither the development split
(0) the accuracy suite reports nor the held-out one (1), so the default is not chosen on the
prompts it is then measured on. Writes bench/results/<name>.json (found/asked per spread, budget,
task and length, the answers, provenance)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import provenance  # noqa: E402
import ruler  # noqa: E402
from accuracy import BLOCK, PROSE, cells  # noqa: E402

TUNING_SEED = 2


def block_scores(q, k, block: int, spread: float, relative: bool = False, per_head: bool = False):
    """[nb] scores of the blocks of keys `k` [kv_heads, L, D] for the query `q` [q_heads, D]
    ([kv_heads, nb] with `per_head`: each KV head scored over its own query heads)."""
    import torch

    h, n, d = k.shape
    nb = math.ceil(n / block)
    pad = nb * block - n
    kk = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(h, nb, block, d)
    lo, hi = kk.amin(2), kk.amax(2)
    if pad:  # the partial last block: its filled slots only
        lo[:, -1], hi[:, -1] = k[:, (nb - 1) * block:].amin(1), k[:, (nb - 1) * block:].amax(1)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    qg = q.view(h, -1, d)[:, :, None]  # [kv heads, group, 1, D]
    per_q = (qg * centre[:, None] + spread * qg.abs() * half[:, None]).sum(-1)  # [kv heads, group, nb]
    if relative:  # softmax is shift-invariant per head: rank blocks by their distance to the head's best
        per_q = per_q - per_q.amax(-1, keepdim=True)
    return per_q.amax(1) if per_head else per_q.reshape(-1, nb).amax(0)


def sub_block_scores(q, k, block: int, sub: int, spread: float, per_head: bool = False):
    """[nb] (or [kv_heads, nb]) scores of the blocks of `k` with key ranges kept per `sub` tokens:
    a block scores as its best part (max over heads and max over parts commute)."""
    import torch

    nb = math.ceil(k.shape[1] / block)
    s = block_scores(q, k, sub, spread, per_head=per_head)
    pad = nb * (block // sub) - s.shape[-1]
    return torch.nn.functional.pad(s, (0, pad), value=float("-inf")).unflatten(-1, (nb, -1)).amax(-1)


def oracle_scores(q, k, block: int, rule: str, per_head: bool = False):
    """[nb] scores from the keys themselves, not their ranges: what any block rule sharing one
    selection over a layer's heads could do at best. `max`: each block's largest q.k over query
    heads; `mass`: the attention (softmax over every key) each block gets, summed over heads.
    `per_head`: [kv_heads, nb], over each KV head's own query heads."""
    import torch

    h, n, d = k.shape
    nb = math.ceil(n / block)
    logits = torch.einsum("hgd,hnd->hgn", q.view(h, -1, d), k) / math.sqrt(d)
    pad = nb * block - n
    if rule == "max":
        per = torch.nn.functional.pad(logits, (0, pad), value=float("-inf")).view(h, -1, nb, block).amax(-1)
        return per.amax(1) if per_head else per.reshape(-1, nb).amax(0)
    per = torch.nn.functional.pad(logits.softmax(-1), (0, pad)).view(h, -1, nb, block).sum(-1)
    return per.sum(1) if per_head else per.reshape(-1, nb).sum(0)


def make_attention(state: dict, block: int):
    """An attention function for transformers' AttentionInterface: sdpa, with each decode step's
    keys masked per layer to the selected blocks when `state["budget"]` is set."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, scaling=None, **kw):
        n = key.shape[2]
        keep = state["budget"] and -(-state["budget"] // block)  # rounded up to blocks, as the library
        if keep and query.shape[2] == 1 and module.layer_idx >= state["dense_layers"] and math.ceil(n / block) > keep:
            q, k = query[0, :, 0].float(), key[0].float()
            ph = state.get("per_head", False)
            if state.get("oracle"):
                s = oracle_scores(q, k, block, state["oracle"], ph)
            elif state.get("sub_block"):
                s = sub_block_scores(q, k, block, state["sub_block"], state["spread"], ph)
            else:
                s = block_scores(q, k, block, state["spread"], state.get("relative", False), ph)
            s = s.view(-1, s.shape[-1])  # [tables, nb]: one table, or one per KV head
            s[:, 0] = float("inf")
            s[:, -state["recent_blocks"]:] = float("inf")
            allow = torch.zeros(s.shape, dtype=torch.bool)
            allow.scatter_(1, s.topk(keep, dim=1).indices, True)
            extra = torch.where(allow.repeat_interleave(block, dim=1)[:, :n], 0.0, float("-inf")).to(query.dtype)
            # [1, query heads (or 1), 1, n]: each query head reads its KV head's table.
            extra = extra.repeat_interleave(query.shape[1] // extra.shape[0], dim=0)[None, :, None, :]
            attention_mask = extra if attention_mask is None else attention_mask + extra
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    return attention


def missed(result: str, run: str) -> list[dict]:
    """The prompts of an accuracy result (bench/results/RESULT) that its dense run answered and RUN
    (a token-budget run such as quest@1024) did not, with the prompts' own tokens."""
    d = json.loads((HERE / "results" / result).read_text())
    dense, other = d["texts"]["prefix_caching_off"]["dense"], d["token_texts"][run]
    return [s for s, a, b in zip(d["samples"], dense, other)
            if ruler.score(a, s["answers"]) and not ruler.score(b, s["answers"])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="niah_number,niah_multikey")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--samples", type=int, default=3, help="prompts per task and length")
    ap.add_argument("--seed", type=int, default=TUNING_SEED)
    ap.add_argument("--spreads", default="1,0.75,0.5,0.25")
    ap.add_argument("--budgets", default="1024", help="tokens each decode step reads")
    ap.add_argument("--dense-layers", default="2", help="layers left dense (a list sweeps them)")
    ap.add_argument("--recent-blocks", default="1", help="last blocks always read (a list sweeps them)")
    ap.add_argument("--relative", action="store_true", help="score blocks relative to each head's best")
    ap.add_argument("--sub-block", type=int, default=0,
                    help="key ranges per this many tokens, a block scored by its best (default: the block)")
    ap.add_argument("--per-head", action="store_true",
                    help="one table per KV head (each over its own query heads), not one per request and layer")
    ap.add_argument("--oracles", default="", help="also the oracle rules (max,mass) at each budget")
    ap.add_argument("--missed", default="",
                    help="RESULT:RUN - diagnose instead of tune: the prompts of an accuracy result (e.g. "
                         "accuracy-quest.json:quest@1024) that dense answered and RUN did not")
    ap.add_argument("--name", default="selection-spread")
    a = ap.parse_args(argv)
    missed_in = a.missed.split(":") if a.missed else None  # [result file, run]
    if a.seed in (0, 1) and not missed_in:
        raise SystemExit(f"--seed {a.seed} is the accuracy suite's {'development' if a.seed == 0 else 'held-out'} "
                         "split; tune on another (default 2)")

    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    import smollm2

    torch.set_num_threads(2)
    model_dir = smollm2.ensure()
    tok = AutoTokenizer.from_pretrained(model_dir)
    state = {"budget": 0, "spread": 1.0, "dense_layers": 0, "recent_blocks": 1, "relative": a.relative,
             "oracle": "", "sub_block": a.sub_block, "per_head": a.per_head}
    if a.sub_block and BLOCK % a.sub_block:
        raise SystemExit(f"--sub-block {a.sub_block} must divide the block size {BLOCK}")
    AttentionInterface.register("kvsieve_selection_sweep", make_attention(state, BLOCK))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="kvsieve_selection_sweep").eval()
    c = {"tasks": a.tasks.split(","), "lengths": [int(x) for x in a.lengths.split(",")],
         "long_tasks": a.tasks.split(","), "samples": a.samples, "samples_long": a.samples}
    samples = ([ruler.as_dict(s) for s in ruler.suite(tok, PROSE, cells(c), a.seed)] if not missed_in
               else missed(*missed_in))

    @torch.no_grad()
    def generate(prompt: list[int], max_tokens: int) -> list[int]:
        out = model(torch.tensor([prompt]), use_cache=True)
        got = [int(out.logits[0, -1].argmax())]
        while len(got) < max_tokens and got[-1] != tok.eos_token_id:
            out = model(torch.tensor([[got[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            got.append(int(out.logits[0, -1].argmax()))
        return got

    dense_layers = [int(x) for x in a.dense_layers.split(",")]
    recent_blocks = [int(x) for x in a.recent_blocks.split(",")]

    def run_name(spread: float | str, budget: int, dl: int, rb: int) -> str:
        extra = (f",dense_layers={dl}" if len(dense_layers) > 1 else "")
        extra += f",recent={rb}" if len(recent_blocks) > 1 else ""
        rule = f"oracle={spread}" if isinstance(spread, str) else f"spread={spread:g}"
        rule += f",sub={a.sub_block}" if a.sub_block and not isinstance(spread, str) else ""
        rule += ",per_head" if a.per_head else ""
        return f"{rule}@{budget}{extra}"

    rules: list[float | str] = [float(s) for s in a.spreads.split(",") if s]
    rules += [o for o in a.oracles.split(",") if o]
    runs = [("dense", 0, 1.0, 0, 1)] + [(run_name(r, int(b), dl, rb), int(b), r, dl, rb)
                                        for b in a.budgets.split(",") for r in rules
                                        for dl in dense_layers for rb in recent_blocks]
    result: dict = {"samples": [{k: s[k] for k in ("id", "task", "length", "answers")} for s in samples],
                    "runs": {}}
    t0 = time.time()
    for name, budget, rule, dl, rb in runs:
        oracle = rule if isinstance(rule, str) else ""
        spread = 0.0 if oracle else rule
        state.update(budget=budget, spread=spread, dense_layers=dl, recent_blocks=rb, oracle=oracle)
        cellwise: dict = {}
        answers = []
        for s in samples:
            text = tok.decode(generate(s["prompt"], s["max_tokens"]), skip_special_tokens=True)
            cell = cellwise.setdefault(s["task"], {}).setdefault(str(s["length"]), [0, 0])
            cell[0] += ruler.score(text, s["answers"])
            cell[1] += 1
            answers.append(text)
        found = sum(x[0] for t in cellwise.values() for x in t.values())
        result["runs"][name] = {"budget": budget, "spread": None if oracle else spread, "oracle": oracle or None,
                                "dense_layers": dl, "recent_blocks": rb, "sub_block": a.sub_block or BLOCK,
                                "per_kv_head": a.per_head,
                                "found": found, "asked": len(samples),
                                "cells": cellwise, "answers": answers}
        print(f"[sweep] {name}: {found}/{len(samples)} {cellwise} ({time.time() - t0:.0f} s)", flush=True)
    if missed_in:
        result["diagnosis"] = f"the prompts of {missed_in[0]} that dense answered and {missed_in[1]} did not"
    result["provenance"] = provenance.record(model=model_dir, model_name="SmolLM2-135M-Instruct",
                                             seed=None if missed_in else a.seed,
                                             block_size=BLOCK,
                                             engine="HF transformers (masked attention), not vLLM")
    out = HERE / "results" / f"{a.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[sweep] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
