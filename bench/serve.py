"""End-to-end serving benchmark: the same workload on stock vLLM and on vLLM with kvsieve.

Each configuration runs in its own process (`engine_run.py`; kvsieve's config is fixed per
process): stock vLLM, then (unless --no-agreement) kvsieve at a full budget, whose greedy
outputs must equal stock's, then kvsieve at each budget. Prints a side-by-side table, writes
`<out>/<name>.json` (every figure, per-request timings, step profiles) and `<out>/<name>.png`
(output throughput and peak KV blocks against budget).

    python bench/serve.py --workload long-prompt-qa --budgets 0.1,0.25,0.5
    python bench/serve.py --model /path/to/hf-llama --config my-kvsieve.toml --requests 8

Requests all arrive at t=0 (offline batch), sampling is greedy with a fixed output length
(ignore_eos), and the KV space is given in blocks (--kv-blocks) so that stock vLLM is limited by
it: by default it holds --kv-requests requests of the longest prompt plus output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import child  # noqa: E402
from model import generate, shape_of  # noqa: E402
import provenance  # noqa: E402
from report import compact, goodput, median_index, paired_ratios, plot_serving, serving_table, summarize  # noqa: E402
from workloads import WORKLOADS, TextWorkload  # noqa: E402

PROSE = ROOT / "models" / "byte-llama-5m" / "val.txt"  # held-out prose for text workloads

BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32
# The library this checkout built, unless the caller points elsewhere (engine processes inherit it).
if (ROOT / "target" / "release" / "libkvsieve.so").is_file():
    os.environ.setdefault("KVSIEVE_LIB", str(ROOT / "target" / "release" / "libkvsieve.so"))


def kvsieve_config(base: dict, budget: float | None, full: bool = False) -> str:
    """TOML text of `base` ({table: {key: value}}) with the budget of its `[sparsity]` and
    `[selection]` set to the ratio `budget` (None: unchanged); `full` keeps everything (budget
    1.0, no decode re-compression): the hooks run but nothing is evicted or left unread."""
    cfg = {t: dict(v) for t, v in base.items() if not (full and t == "decode")}
    if full:
        budget = 1.0
    if budget is not None:
        for section in ("sparsity", "selection"):
            if section in cfg:
                cfg[section].pop("budget_tokens", None)
                cfg[section]["budget_ratio"] = budget
    lines = []
    for table, kv in cfg.items():
        lines.append(f"[{table}]")
        for k, v in kv.items():
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def run_engine(engine: dict, requests: list, config_text: str | None, workdir: Path, label: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KVSIEVE_CONFIG"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # overridden by num_gpu_blocks_override
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_V2_MODEL_RUNNER="0")
    if config_text is not None:
        path = workdir / f"{label}.toml"
        path.write_text(config_text)
        env["KVSIEVE_CONFIG"] = str(path)
    print(f"[bench] {label}: {len(requests)} requests, starting the engine ...", file=sys.stderr, flush=True)

    def relay(text: str) -> None:
        if text.startswith("[progress]"):
            print(f"[bench] {label}: {text[len('[progress] '):].rstrip()}", file=sys.stderr, flush=True)

    res = child.run(HERE / "engine_run.py", {"engine": engine, "requests": requests}, env,
                    f"[bench] {label}: the engine run", relay)
    if res["free_after"] != res["total_blocks"]:
        raise SystemExit(f"[bench] {label}: {res['total_blocks'] - res['free_after']} KV blocks were not returned")
    return res


def refusal(failure: str) -> str:
    """The engine's own reason from a failed engine run's output (its last error line)."""
    errors = [l.strip() for l in failure.splitlines() if "Error:" in l]
    return (errors[-1] if errors else failure.strip().splitlines()[-1])[:600]


def sample_answers(tokenizer, requests: list, answers: list, runs: dict, limit: int = 3) -> str:
    """A few questions with what stock vLLM and each kvsieve run answered, for a person to read."""
    lines = []
    for i in [j for j, a in enumerate(answers) if a is not None][:limit]:
        text = tokenizer.decode(requests[i][0][-120:])
        question = text.split("\n\n")[-1].split("<|im_end|>")[0].strip()
        lines.append(f"\nQ{i}: {question}\n  expected: {', '.join(answers[i])}")
        for label, r in runs.items():
            said = " ".join(tokenizer.decode(r["tokens"][i], skip_special_tokens=True).split())
            lines.append(f"  {label:>14}: {said[:100]}")
    return "\n".join(lines)


def full_lengths(requests: list) -> list[int]:
    """Prompt plus output tokens of each request; a chat turn's prompt holds the turns before it."""
    out: list[int] = []
    for ids, n, *follow in requests:
        head = 0
        if follow and follow[0].get("extend"):
            head = out[follow[0]["after"]]
        out.append(head + len(ids) + n)
    return out


def parse_range(text: str, flag: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected LO:HI tokens (e.g. 4096:8192) or one number") from None
    if not 1 <= lo_i <= hi_i:
        raise SystemExit(f"{flag} {text!r}: need 1 <= LO <= HI")
    return lo_i, hi_i


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workload", default="long-prompt-qa", choices=sorted(WORKLOADS))
    ap.add_argument("--model", type=Path, help="a Hugging Face Llama-family model dir (default: generate one)")
    ap.add_argument("--shape", default="bench-llama", help="shape of the generated model (bench/model.py)")
    ap.add_argument("--config", type=Path, help="kvsieve TOML config (default: the workload's, bench/configs/)")
    ap.add_argument("--budgets", help="comma-separated budget ratios to sweep (default: the config's)")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=CONFIG",
                    help="another kvsieve config to run in every round beside --config, labelled LABEL (e.g. "
                         "evict-1024=bench/configs/snapkv-1024.toml); repeatable")
    ap.add_argument("--requests", type=int, help="number of requests (default: the workload's)")
    ap.add_argument("--prompt-len", help="prompt tokens LO:HI (default: the workload's)")
    ap.add_argument("--output-len", help="output tokens LO:HI (default: the workload's)")
    ap.add_argument("--kv-blocks", type=int, help=f"KV cache blocks of {BLOCK_SIZE} tokens (default: --kv-requests)")
    ap.add_argument("--kv-requests", type=float, default=2.0,
                    help="size the KV space for this many of the longest requests (default: %(default)s)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-agreement", action="store_true", help="skip the full-budget greedy agreement run")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="turn vLLM's prefix caching on for every run (on by default for multi-turn, shared-doc)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run stock and every kvsieve budget this many times, in alternation; ratios are "
                         "the median (and range) of the paired runs (default: %(default)s)")
    ap.add_argument("--slo-ttft", type=float, help="goodput's TTFT limit in seconds (default: stock's p99 TTFT)")
    ap.add_argument("--slo-tpot", type=float, help="goodput's TPOT limit in ms (default: stock's p99 TPOT)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", help="result file name (default: the workload's)")
    a = ap.parse_args(argv)

    w = WORKLOADS[a.workload]
    if a.repeats < 1:
        raise SystemExit(f"--repeats {a.repeats}: at least 1")
    prompt = parse_range(a.prompt_len, "--prompt-len") if a.prompt_len else w.prompt
    output = parse_range(a.output_len, "--output-len") if a.output_len else w.output
    config_path = a.config or HERE / "configs" / w.config
    if not config_path.is_file():
        raise SystemExit(f"--config {config_path}: no such file")
    try:
        base = tomllib.loads(config_path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"--config {config_path}: not valid TOML ({e})") from None
    from kvsieve_vllm.lib import KvsieveError, load

    lib = load()
    try:
        budgets = [float(b) for b in a.budgets.split(",")] if a.budgets else [None]
    except ValueError:
        raise SystemExit(f"--budgets {a.budgets!r}: expected comma-separated ratios, e.g. 0.1,0.25") from None
    also = {}
    for spec in a.also:
        label, _, path = spec.partition("=")
        if not label or not path or not Path(path).is_file():
            raise SystemExit(f"--also {spec!r}: expected LABEL=CONFIG with an existing config file")
        if label == "stock" or label.startswith("kvsieve") or label in also:
            raise SystemExit(f"--also {spec!r}: the label {label!r} is taken (stock, kvsieve..., or given twice)")
        text = Path(path).read_text()
        try:
            lib.config_from_str(text)
        except KvsieveError as e:
            raise SystemExit(f"--also {spec}: {e}") from None
        also[label] = text
    # The library names a bad field (and the fix) before any engine starts.
    for b in [None, *budgets]:
        try:
            lib.config_from_str(kvsieve_config(base, b))
        except KvsieveError as e:
            where = f"--config {config_path}" + ("" if b is None else f" with --budgets {b}")
            raise SystemExit(f"{where}: {e}") from None

    answers = None
    if isinstance(w, TextWorkload):
        # Real text needs a real model and its tokenizer: SmolLM2-135M-Instruct unless --model.
        if not PROSE.is_file():
            raise SystemExit(f"--workload {w.name}: its prose ({PROSE}) is missing; it is part of the repository "
                             "(models/byte-llama-5m)")
        if a.model is None:
            import smollm2

            print("[bench] SmolLM2-135M-Instruct (fetched and converted on first use) ...", file=sys.stderr, flush=True)
            model_dir = smollm2.ensure()
            model_name = "SmolLM2-135M-Instruct"
        else:
            model_dir = a.model
            model_name = None
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--workload {w.name} needs a model with a tokenizer; {model_dir}: {e}") from None
        requests, answers = w.make(tokenizer, PROSE, seed=a.seed, requests=a.requests, prompt=prompt, output=output)
    else:
        model_dir = a.model or generate(ROOT / "build" / "models" / a.shape, a.shape, seed=a.seed)
        model_name = None if a.model else f"{a.shape} (generated by bench/model.py, seed {a.seed})"
        requests = w.make(shape_of(model_dir)["vocab"], seed=a.seed, requests=a.requests, prompt=prompt,
                          output=output)
    shape = shape_of(model_dir)
    longest = max(full_lengths(requests))
    max_model_len = BLOCK_SIZE * math.ceil(longest / BLOCK_SIZE)
    if shape["max_positions"] and max_model_len > shape["max_positions"]:
        raise SystemExit(f"the longest request ({longest} tokens) passes the model's max_position_embeddings "
                         f"({shape['max_positions']}); lower --prompt-len/--output-len")
    per_request = math.ceil(longest / BLOCK_SIZE)
    kv_blocks = a.kv_blocks or max(per_request + 1, int(a.kv_requests * per_request))
    # Prompts longer than the KV space: served only when kvsieve bounds every request (its
    # [prefill], [decode] and [requests] sections) below it; stock vLLM is expected to refuse.
    longer_than_kv = kv_blocks <= per_request
    if longer_than_kv:
        for b in budgets:
            bound = lib.config_from_str(kvsieve_config(base, b)).max_cached_tokens(
                max_model_len, a.max_batched_tokens, BLOCK_SIZE)
            if math.ceil(bound / BLOCK_SIZE) >= kv_blocks:
                raise SystemExit(
                    f"--kv-blocks {kv_blocks}: the longest request needs {per_request} blocks of {BLOCK_SIZE} and "
                    f"kvsieve's config (--config {config_path}"
                    + ("" if b is None else f", budget {b}") + f") holds up to {bound} tokens of one request; give "
                    f"at least {per_request + 1} blocks, or bound every request below the KV space ([prefill], "
                    "[decode] and [requests] allow_opt_out = false, bench/configs/longer-than-kv.toml)")
        a.no_agreement = True  # a full budget cannot fit
    prefix_caching = a.prefix_caching or getattr(w, "prefix_caching", False)
    engine = dict(model=str(model_dir), skip_tokenizer_init=True, dtype=a.dtype, max_model_len=max_model_len,
                  enforce_eager=True, block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching, seed=a.seed,
                  max_num_batched_tokens=a.max_batched_tokens, max_num_seqs=a.max_num_seqs,
                  num_gpu_blocks_override=kv_blocks)
    workdir = ROOT / "build" / "bench"
    workdir.mkdir(parents=True, exist_ok=True)

    # Every configuration once per round, rounds in turn, so a drift of the machine's speed
    # during the run reaches stock and kvsieve alike; each ratio pairs runs of the same round.
    all_runs: dict[str, list] = {}
    stock_refused = None
    for rnd in range(a.repeats):
        tag = "" if a.repeats == 1 else f" (round {rnd + 1} of {a.repeats})"
        if stock_refused is None:
            try:
                all_runs.setdefault("stock", []).append(run_engine(engine, requests, None, workdir, "stock" + tag))
            except SystemExit as e:
                if not longer_than_kv:
                    raise
                stock_refused = refusal(str(e))
                all_runs.pop("stock", None)
                print(f"[bench] stock: refused to start, as expected: {stock_refused}", file=sys.stderr, flush=True)
        if longer_than_kv and stock_refused is None:
            raise SystemExit("[bench] stock vLLM served prompts longer than its KV space; this benchmark expects "
                             "a refusal")
        if not a.no_agreement and rnd == 0:  # identity is checked once: greedy outputs do not vary
            all_runs["kvsieve@100%"] = [run_engine(engine, requests, kvsieve_config(base, None, full=True), workdir,
                                                   "kvsieve-full")]
        for b in budgets:
            label = "kvsieve" if b is None else f"kvsieve@{b:.0%}"
            all_runs.setdefault(label, []).append(run_engine(engine, requests, kvsieve_config(base, b), workdir,
                                                             label + tag))
        for label, text in also.items():
            all_runs.setdefault(label, []).append(run_engine(engine, requests, text, workdir, label + tag))
    summaries = {label: [summarize(r, requests) for r in rs] for label, rs in all_runs.items()}
    # Each label's table column is its median run (by output tokens/s); every run's figures are kept.
    pick = {label: median_index([s["output_tokens_per_s"] for s in ss]) for label, ss in summaries.items()}
    runs = {label: all_runs[label][pick[label]] for label in all_runs}

    result = {
        "workload": {"name": w.name, "what": w.what, "requests": len(requests), "prompt_tokens": list(prompt),
                     "output_tokens": list(output),
                     "total_prompt_tokens": sum(len(r[0]) for r in requests),
                     "total_output_tokens": sum(r[1] for r in requests), "prefix_caching": prefix_caching},
        "model": {"dir": str(model_dir), **shape, "dtype": a.dtype},
        "engine": {k: v for k, v in engine.items() if k != "model"},
        "kv_bytes_per_block": 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * BLOCK_SIZE
        * (4 if a.dtype == "float32" else 2),
        "kvsieve_config": kvsieve_config(base, None), "kvsieve_config_file": str(config_path),
        "also": also,
        "runs": {label: summaries[label][pick[label]] for label in runs},
    }
    slo = {"ttft_s": a.slo_ttft if a.slo_ttft is not None else
           (result["runs"]["stock"]["ttft_p99_s"] if "stock" in runs else None),
           "tpot_ms": a.slo_tpot if a.slo_tpot is not None else
           (result["runs"]["stock"]["tpot_p99_ms"] if "stock" in runs else None)}
    slo["source"] = "given" if a.slo_ttft is not None or a.slo_tpot is not None else "stock's p99 of its median run"
    for ss in summaries.values():
        for s in ss:
            s["goodput"] = goodput(s, slo)
    result["slo"] = slo
    result["repeats"] = {label: [compact(s) for s in ss] for label, ss in summaries.items()}
    if "stock" in summaries:
        result["ratios"] = {label: paired_ratios(summaries["stock"], ss) for label, ss in summaries.items()
                            if label != "stock" and len(ss) == len(summaries["stock"])}
    result["provenance"] = provenance.record(config_text=result["kvsieve_config"], model=model_dir,
                                             model_name=model_name, repeats=a.repeats)
    if stock_refused:
        result["stock_refused"] = stock_refused
    if "kvsieve@100%" in runs:
        stock_tokens = runs["stock"]["tokens"]
        same = sum(a_ == b_ for a_, b_ in zip(runs["kvsieve@100%"]["tokens"], stock_tokens))
        result["greedy_agreement_full_budget"] = {"identical": same, "requests": len(requests)}
    if answers is not None and any(x is not None for x in answers):
        from ruler import score

        # The answers served in each run, scored as the accuracy suite scores them.
        result["accuracy"] = {
            label: [sum(score(tokenizer.decode(t, skip_special_tokens=True), ans)
                        for t, ans in zip(r["tokens"], answers) if ans is not None),
                    sum(ans is not None for ans in answers)]
            for label, r in runs.items()}
    name = a.name or w.name
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot_serving(result, a.out / f"{name}.png")
    print(serving_table(result))
    if "accuracy" in result:
        print("\nanswers found (exact match): " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in result["accuracy"].items()))
        print(sample_answers(tokenizer, requests, answers, runs))
    print(f"\nwrote {a.out / (name + '.json')} and {a.out / (name + '.png')}")
    return result


if __name__ == "__main__":
    main()
