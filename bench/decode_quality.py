"""Decode-time eviction on long generations, with ground truth: SmolLM2-135M-Instruct
teacher-forced through the real continuation of prose passages (the long-answer workload's
text), its cache cut by `[decode]` events as they fall due, against the dense cache.

    .venv/bin/python bench/decode_quality.py                      # the run in bench/README.md
    .venv/bin/python bench/decode_quality.py --samples 1 --continuation 512 --budgets 256 --presses snapkv

Per sample: a short prompt (`--prompt` tokens of a passage: less than any budget, so the prompt
is not cut) and the passage's next `--continuation` tokens, fed in segments that end where
kvsieve's decode events fall due (`kvs_plan_keep_count`, phase decode, from lengths). After each
segment the library compresses every layer (`CpuKernels.compress` on a paged copy of the layer,
as bench/quality.py does at prefill end); SnapKV scores with the rotated queries of the last
`window` tokens fed, which are the queries vLLM's decode steps record in the request's ring.
Feeding a segment in one forward equals feeding its tokens one at a time: nothing is evicted
inside a segment. Budgets and the interval are whole blocks, so every event keeps exactly the
budget.

kvpress (its own site dir, as the accuracy suite runs it): `DecodingPress(base_press=P,
compression_interval=1, target_size=budget)` over the same segments, so it compresses after
each segment to the count kvsieve kept, for P in `--presses` (SnapKVPress with kvsieve's
window, 32: the segment's last 32 queries). kvpress is run as it ships: its ScorerPress keeps
the top-k in score order, not position order, and StreamingLLMPress prunes by index (the first
tokens after the sinks), so from its second compression on it drops arbitrary tokens (sorting the
kept indices gives kvsieve's streaming NLL exactly; measured on the trial run). Its avg-pooling
is index-based too, so SnapKVPress pools over neighbours in score order from the second
compression on; `--kvpress-sorted` runs the presses with each selection kept in position order.

`--rule LABEL=SPEC[;SETTINGS]` also runs SnapKV ranked by an offline prototype of another rule
(`Rule`: scores carried across events, R-KV's redundancy term), in torch over the library's own
scores, selection and compaction: measured before anything is built into the library.

Reported per run: the mean per-token NLL of the continuation and its increase over dense, and
the greedy-agreement length (how many continuation positions, from the first, the compressed
cache's argmax equals dense's). Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import child  # noqa: E402
import provenance  # noqa: E402

PROSE = ROOT / "models" / "byte-llama-5m" / "val.txt"
# val.txt concatenates held-out tails (bench/quality.py); a passage must not straddle two.
DOC_ENDS = [55712, 89561, 149869, 310688, 400255, 449789, 476701, 527709, 548538]
BLOCK = 32
WINDOW = 32  # kvsieve's SnapKV window (its default); kvpress's SnapKVPress gets the same
if (ROOT / "target" / "release" / "libkvsieve.so").is_file():
    os.environ.setdefault("KVSIEVE_LIB", str(ROOT / "target" / "release" / "libkvsieve.so"))


def config_text(policy: str, budget: int, interval: int, extra: str = "") -> str:
    """kvsieve's defaults for `policy` (sinks 4, recent 64, SnapKV window 32; decode SnapKV
    unpooled, scores carried 0.5), with
    `extra` settings ("key = value; ..."): `[sparsity]`'s, or `[decode]`'s when prefixed
    "decode." ("decode.carry = 0")."""
    kvs = [kv.strip() for kv in extra.split(";") if kv.strip()]
    sparsity = "".join(f"{kv}\n" for kv in kvs if not kv.startswith("decode."))
    decode = "".join(f"{kv.removeprefix('decode.')}\n" for kv in kvs if kv.startswith("decode."))
    return (f'[sparsity]\npolicy = "{policy}"\nbudget_tokens = {budget}\n{sparsity}'
            f'[decode]\npolicy = "{policy}"\ninterval = {interval}\n{decode}')


def passages(tok, n: int, prompt: int, cont: int, seed: int) -> list[list[int]]:
    """n token sequences of prompt + cont tokens, each from one document of the prose text."""
    text = PROSE.read_text(errors="replace")
    rng = random.Random(seed)
    span = (prompt + cont) * 6  # characters enough for the tokens (SmolLM2: ~4 per token here)
    out: list[list[int]] = []
    while len(out) < n:
        off = rng.randrange(0, len(text) - span)
        if any(off < end < off + span for end in DOC_ENDS):
            continue
        ids = tok(text[off:off + span], add_special_tokens=False)["input_ids"][1:]  # drop a cut first token
        if len(ids) >= prompt + cont:
            out.append(ids[:prompt + cont])
    return out


def segments(config, prompt: int, total: int, phase: int) -> list[int]:
    """The logical lengths where kvsieve's decode events fall due while `total` tokens are fed
    after a `prompt`-token prefill (nothing evicted before the first), and the end."""
    ends, logical, cached = [], prompt, prompt
    while logical < total:
        logical, cached = logical + 1, cached + 1
        p = config.plan(logical, cached, 0, BLOCK, phase)
        if p.released_blocks or logical == total:
            ends.append(logical)
            cached = int(p.kept_tokens)
    return ends


class Rule:
    """An offline prototype of another decode SnapKV rule, in torch over the library's scores
    (`kvsieve_compress(rescore=...)`: the library scores, selects with sinks and the recent tail
    kept, and compacts; only the scores it ranks by change). Not in the library: measured here
    before anything is built. SPEC, one or both joined by "+":
    - `sum:G` scores carried across events: a kept token's score is this event's plus G times
      what it had at the last event (tokens new since then carry 0);
    - `max:G` the same with max(this event's, G x last);
    - `rkv:L` R-KV's redundancy term: rank by L x the head's normalized (carried) score minus
      (1 - L) x a softmax over each key's mean cosine similarity to the keys (its own taken as
      0; near-duplicates rank lower); what is carried is the score before this term. The
      similarities are a [heads, cached, cached] matrix: fine at these budgets, not at 32k."""

    def __init__(self, spec: str):
        self.carry = self.rkv = None
        for part in spec.split("+"):
            mode, _, arg = part.partition(":")
            try:
                value = float(arg)
            except ValueError:
                value = None
            if mode in ("sum", "max") and value is not None and self.carry is None:
                self.carry = (mode, value)
            elif mode == "rkv" and value is not None and self.rkv is None:
                self.rkv = value
            else:
                raise SystemExit(f"--rule {spec!r}: the rule is sum:G or max:G, rkv:L, or one of each joined by +")
        self.carried: dict = {}
        self.now: dict = {}

    def scores(self, layer: int, s, keys) -> None:
        import torch

        prev = self.carried.get(layer)
        if self.carry is not None and prev is not None:
            mode, gamma = self.carry
            c = torch.zeros_like(s)
            c[:, :prev.shape[1]] = gamma * prev
            s.copy_(s + c if mode == "sum" else torch.maximum(s, c))
        self.now[layer] = s.clone()
        if self.rkv is not None:
            kn = torch.nn.functional.normalize(keys, dim=-1)  # [heads, length, dim]
            sim = kn @ kn.transpose(1, 2)
            sim.diagonal(dim1=1, dim2=2).zero_()
            red = torch.softmax(sim.mean(-1), -1)
            s.copy_(self.rkv * s / s.sum(-1, keepdim=True) - (1 - self.rkv) * red)

    def kept(self, layer: int, s, keep) -> None:
        self.carried[layer] = self.now.pop(layer).gather(1, keep.long())


def run_kvsieve(model, data: list, runs: dict, prompt: int, rules: dict | None = None) -> dict:
    """Dense and each kvsieve run: per sample, NLL per position and argmax per position (`rules`:
    run name -> a `Rule` spec, for the runs that rank by a prototype rule)."""

    from kvsieve_vllm.lib import PHASE_DECODE, CpuKernels, load
    from quality import kvsieve_compress

    lib = load()
    kernels = CpuKernels(lib)
    out: dict = {}
    for name, text in [("dense", None)] + list(runs.items()):
        config = lib.config_from_str(text) if text else None
        window = config.params(PHASE_DECODE).window if config else 1
        per_sample = []
        t0 = time.time()
        for ids in data:
            rule = Rule(rules[name]) if rules and name in rules else None
            # The sequence's carried scores (`[decode] carry`), as the worker keeps them; a
            # prototype rule ranks by its own instead, over the library's scores.
            carried = {} if rule is None else None
            ends = segments(config, prompt, len(ids) - 1, PHASE_DECODE) if config else [len(ids) - 1]
            nll, argmax, kept = forced(model, ids, prompt, ends, window,
                                       (lambda cache, q, logical: kvsieve_compress(lib, kernels, config, cache, q,
                                                                                   BLOCK, logical, PHASE_DECODE, rule,
                                                                                   carried))
                                       if config else None)
            per_sample.append({"nll": nll, "argmax": argmax, "events": len(kept), "kept": sorted(set(kept))})
        out[name] = per_sample
        print(f"[decode-quality] {name}: {time.time() - t0:.0f} s", flush=True)
    return out


def forced(model, ids: list[int], prompt: int, ends: list[int], window: int, compress) -> tuple:
    """Teacher-force `ids` after a `prompt`-token prefill in segments ending at `ends` (logical
    lengths), calling `compress(cache, queries, logical)` after every segment but the last (None:
    nothing, as for dense and for kvpress, whose press compresses inside the forward).
    Returns per-position NLLs of ids[prompt:], the argmax there, and the kept counts."""
    import torch
    from transformers.models.llama import modeling_llama

    recorded: list = []
    real = modeling_llama.apply_rotary_pos_emb

    def recording(q, k, *args, **kwargs):
        q2, k2 = real(q, k, *args, **kwargs)
        recorded.append(q2[0, :, -window:, :].transpose(0, 1).float().contiguous())
        return q2, k2

    logits, kept = [], []
    modeling_llama.apply_rotary_pos_emb = recording
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids[:prompt]]), use_cache=True)
            cache, start = out.past_key_values, prompt
            logits.append(out.logits[0, -1:])
            for end in ends:
                recorded.clear()
                out = model(torch.tensor([ids[start:end]]), position_ids=torch.arange(start, end)[None],
                            past_key_values=cache, use_cache=True)
                logits.append(out.logits[0])
                cache, start = out.past_key_values, end
                if compress is not None and end != ends[-1]:
                    kept.append(compress(cache, list(recorded), end))
    finally:
        modeling_llama.apply_rotary_pos_emb = real
    lg = torch.cat(logits, 0)[:len(ids) - prompt].double()  # predicts ids[prompt:]
    target = torch.tensor(ids[prompt:])
    nll = -torch.log_softmax(lg, -1).gather(1, target[:, None])[:, 0]
    return nll.tolist(), lg.argmax(-1).tolist(), kept


KVPRESS_CHILD = r"""
import json, sys, torch
import kvpress
from transformers import LlamaForCausalLM
spec = json.loads(sys.stdin.read())
sys.path.insert(0, spec["bench"])
from decode_quality import forced  # the same segments, fed the same way as kvsieve's runs
model = LlamaForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
scorers = {"snapkv": lambda: kvpress.SnapKVPress(window_size=spec["window"]), "knorm": lambda: kvpress.KnormPress(),
           "streaming": lambda: kvpress.StreamingLLMPress(), "tova": lambda: kvpress.TOVAPress(),
           "keydiff": lambda: kvpress.KeyDiffPress(), "expected_attention": lambda: kvpress.ExpectedAttentionPress()}
if spec.get("sorted"):
    # Keep each press's selection in position order (its top-k comes in score order), so that
    # index-based steps of later compressions (pooling, StreamingLLM's pruning) see positions.
    real = kvpress.presses.scorer_press.ScorerPress.compress

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        n_kept = kvpress.utils.compute_n_kept(keys.shape[2], self.compression_ratio)
        idx = scores.topk(n_kept, dim=-1).indices.sort(-1).values
        idx = idx.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
        return keys.gather(2, idx).contiguous(), values.gather(2, idx).contiguous()

    kvpress.presses.scorer_press.ScorerPress.compress = compress
out = {}
for job in spec["jobs"]:
    press = kvpress.DecodingPress(base_press=scorers[job["press"]](), compression_interval=1,
                                  target_size=job["budget"], hidden_states_buffer_size=job["buffer"])
    with press(model):  # compresses inside each segment's forward, from the first after the prompt
        nll, argmax, _ = forced(model, job["ids"], job["prompt"], job["ends"], 1, None)
    out.setdefault(job["name"], []).append({"nll": nll, "argmax": argmax})
    print(f"[kvpress] {job['name']}", file=sys.stderr, flush=True)
from importlib.metadata import version
print("RESULT" + json.dumps({"runs": out, "version": version("kvpress")}))
"""


def run_kvpress(model_dir: Path, data: list, prompt: int, budgets: list[int], interval: int, presses: list[str],
                ends_of: dict, sorted_: bool = False) -> dict:
    """kvpress's DecodingPress over the same segments as kvsieve's streaming run at each budget
    (the segment ends depend on the budget and interval only); `sorted_`: with each selection
    kept in position order (runs named kvpress-sorted:...)."""
    tag = "kvpress-sorted" if sorted_ else "kvpress"
    jobs = [{"name": f"{tag}:{p}@{b}", "press": p, "budget": b, "buffer": interval, "ids": ids, "prompt": prompt,
             "ends": ends_of[b][i]}
            for b in budgets for p in presses for i, ids in enumerate(data)]
    spec = {"model": str(model_dir), "jobs": jobs, "window": WINDOW, "sorted": sorted_, "bench": str(HERE)}
    return child.run(KVPRESS_CHILD, spec, child.kvpress_env(), "kvpress run",
                     relay=lambda line: print(line, flush=True))


def summarize(runs: dict) -> dict:
    dense = runs["dense"]
    out = {}
    for name, per in runs.items():
        nll = [sum(s["nll"]) / len(s["nll"]) for s in per]
        agree = []
        for s, d in zip(per, dense):
            n = next((i for i, (a, b) in enumerate(zip(s["argmax"], d["argmax"])) if a != b), len(d["argmax"]))
            agree.append(n)
        base = [sum(d["nll"]) / len(d["nll"]) for d in dense]
        out[name] = {"nll": sum(nll) / len(nll), "nll_increase": sum(a - b for a, b in zip(nll, base)) / len(nll),
                     "agreement_tokens": sum(agree) / len(agree), "agreement_per_sample": agree,
                     "events": [s.get("events") for s in per]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (below every budget)")
    ap.add_argument("--continuation", type=int, default=2048, help="teacher-forced tokens after the prompt")
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--interval", type=int, default=64, help="[decode] interval, a multiple of the block (32)")
    ap.add_argument("--policies", default="snapkv,knorm,streaming")
    ap.add_argument("--presses", default="snapkv,knorm,streaming,tova,keydiff",
                    help="kvpress scorers wrapped in DecodingPress ('' for none)")
    ap.add_argument("--kvpress-sorted", action="store_true",
                    help="keep kvpress's selections in position order (as shipped they are in score order)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=SETTINGS",
                    help="also run snapkv with these settings ('pool_kernel = 5; pool = \"avg\"'; [decode]'s as "
                         "'decode.carry = 0')")
    ap.add_argument("--rule", action="append", default=[], metavar="LABEL=SPEC[;SETTINGS]",
                    help="also run snapkv ranked by an offline prototype rule (see Rule: sum:G, max:G, rkv:L), "
                         "with these settings (as --variant's; the rule replaces [decode] carry)")
    ap.add_argument("--seed", type=int, default=0, help="which passages (0: the reported run; others: tuning)")
    ap.add_argument("--name", default="decode-quality")
    a = ap.parse_args(argv)
    budgets = [int(b) for b in a.budgets.split(",")]
    if a.interval % BLOCK or any(b % BLOCK for b in budgets) or a.prompt >= min(budgets):
        raise SystemExit(f"budgets and --interval must be multiples of {BLOCK}, and --prompt below every budget")

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    import smollm2
    from kvsieve_vllm.lib import PHASE_DECODE, load

    torch.set_num_threads(2)
    model_dir = smollm2.ensure()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = passages(tok, a.samples, a.prompt, a.continuation, a.seed)
    runs = {f"kvsieve:{p}@{b}": config_text(p, b, a.interval) for b in budgets for p in a.policies.split(",") if p}
    for v in a.variant:
        label, _, settings = v.partition("=")
        runs.update({f"kvsieve:snapkv-{label}@{b}": config_text("snapkv", b, a.interval, settings) for b in budgets})
    rules = {}
    for v in a.rule:
        label, _, rest = v.partition("=")
        spec, _, settings = rest.partition(";")
        Rule(spec)  # refuses a bad spec before any run
        if f"kvsieve:snapkv-{label}@{budgets[0]}" in runs:
            raise SystemExit(f"--rule {v!r}: the label {label!r} names another run already")
        for b in budgets:
            runs[f"kvsieve:snapkv-{label}@{b}"] = config_text("snapkv", b, a.interval, settings)
            rules[f"kvsieve:snapkv-{label}@{b}"] = spec
    t0 = time.time()
    result = run_kvsieve(model, data, runs, a.prompt, rules)
    presses = [p for p in a.presses.split(",") if p]
    kvpress_version = None
    if presses:
        lib = load()
        ends_of = {b: [segments(lib.config_from_str(config_text("streaming", b, a.interval)), a.prompt, len(ids) - 1,
                                PHASE_DECODE) for ids in data] for b in budgets}
        got = run_kvpress(model_dir, data, a.prompt, budgets, a.interval, presses, ends_of, a.kvpress_sorted)
        result.update(got["runs"])
        kvpress_version = got["version"]
    summary = summarize(result)
    for name, s in summary.items():
        print(f"{name:28s} NLL {s['nll']:.4f} (+{s['nll_increase']:.4f})  agreement {s['agreement_tokens']:.0f} tokens")
    doc = {"what": __doc__.split("\n\n")[0], "samples": a.samples, "prompt_tokens": a.prompt,
           "continuation_tokens": a.continuation, "budgets": budgets, "interval": a.interval, "block_size": BLOCK,
           "configs": runs, "prototype_rules": {k: f"{v}: see Rule in bench/decode_quality.py" for k, v in rules.items()},
           "kvpress": {"version": kvpress_version, "presses": presses,
                                        "wrapper": "DecodingPress(compression_interval=1, target_size=budget)",
                                        "sorted": a.kvpress_sorted,
                                        "note": "selections kept in position order (--kvpress-sorted)" if a.kvpress_sorted
                                        else "as shipped: top-k kept in score order, so StreamingLLMPress (prunes by "
                                             "index) drops arbitrary tokens and SnapKVPress pools over score-ordered "
                                             "neighbours from the second compression on"},
           "summary": summary, "seconds": round(time.time() - t0),
           "per_sample": {k: [{"nll_mean": sum(s["nll"]) / len(s["nll"]), "events": s.get("events")} for s in v]
                          for k, v in result.items()},
           "provenance": provenance.record(model=model_dir, model_name="SmolLM2-135M-Instruct", seed=a.seed,
                                           engine="HF transformers + libkvsieve's kernels (kvsieve runs); kvpress")}
    path = HERE / "results" / f"{a.name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"[decode-quality] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
