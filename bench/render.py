"""The figures of README.md and bench/README.md, rendered from the result files.

Two kinds of places in the Markdown are owned by this script:
- blocks between `<!-- render:NAME -->` and `<!-- /render:NAME -->`: a table rendered whole
  (NAME: `summary`, `demo`, `ci`, `serving:FILE` for one result's full serving table, or
  `accuracy:`, `accuracy-lengths:`, `accuracy-paired:`, `accuracy-tokens:FILE` for accuracy tables,
  `decode-quality:FILE` for bench/decode_quality.py's);
- inline quotes: a number followed by `<!-- q FILE:PATH|FORMAT -->`, e.g.
  `1.43x<!-- q demo.json:ratios/kvsieve/output_tokens_per_s/median|{:.2f}x -->`: PATH is
  keys (or list indices) into bench/results/FILE separated by `/`, FORMAT a Python format
  string; a last key `@found` sums an accuracy cell tree ({task: {length: [found, of]}}) to
  its found count, `@of` to its prompt count.

    python bench/render.py            # rewrite both files from bench/results/
    python bench/render.py --check    # exit 1 naming every figure that differs from its file

`bench/tests/test_render.py` runs the check, so a quoted figure cannot drift from its file.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS = [ROOT / "README.md", HERE / "README.md", ROOT / "benches" / "README.md"]
sys.path.insert(0, str(HERE))

BLOCK = re.compile(r"(<!-- render:(\S+) -->\n)(.*?)(<!-- /render:\2 -->)", re.S)
QUOTE = re.compile(r"([0-9][0-9.,]*[a-zA-Z%]*)<!-- q ([\w.\-]+):(\S+?)\|(.+?) -->")
BLOCK_NAMES = "summary, demo, ci, kernels, serving:FILE, accuracy:FILE, accuracy-lengths:FILE, accuracy-paired:FILE, soak:FILE,FILE..."

# The headline rows: result file, run label, what the workload is, the kvsieve setting.
SUMMARY = [
    ("long-prompt-qa.json", "kvsieve@25%", "long-prompt QA (4k-8k prompt, 128-256 out; generated model)"),
    ("long-prompt-qa.json", "kvsieve@10%", "long-prompt QA, 10% budget"),
    ("mixed.json", "kvsieve", "mixed (512-7k prompt, 64-1k out; generated model)"),
    ("long-generation.json", "kvsieve", "long generation (128-512 prompt, 2k out; generated model)"),
    ("demo-generated.json", "kvsieve", "demo-generated (2k-4k prompt, 128-192 out; `demo.sh --quick`)"),
    ("demo.json", "kvsieve", "demo: SmolLM2 questions and continuations (2k-4k prompts; `demo.sh`)"),
    ("long-answer.json", "kvsieve@50%", "SmolLM2 long answers (1k-4k prompt, 256-1k out)"),
    ("long-answer.json", "kvsieve@25%", "SmolLM2 long answers, 25% budget"),
    ("multi-turn-cached.json", "kvsieve@25%", "SmolLM2 multi-turn chat, prefix caching on, 630 blocks"),
]


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def cells_total(tree: dict) -> tuple[int, int]:
    """Found and prompt counts over an accuracy cell tree {task: {length: [found, of]}}, or one
    task's {length: [found, of]}."""
    pairs = [kn for v in tree.values() for kn in (v.values() if isinstance(v, dict) else [v])]
    return sum(k for k, _ in pairs), sum(n for _, n in pairs)


def lookup(data, path: str):
    for key in path.split("/"):
        if key in ("@found", "@of"):
            return cells_total(data)[0 if key == "@found" else 1]
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def setting(result: dict, label: str) -> str:
    """The kvsieve setting of a run, from the file's provenance (defaults resolved)."""
    resolved = ((result.get("provenance") or {}).get("config") or {}).get("resolved") or {}
    parts = []
    sp = resolved.get("sparsity")
    if sp and sp.get("min_length", 0) < 10**6:
        budget = label.split("@", 1)[1] if "@" in label else (
            f"{sp['budget_ratio']:.0%}" if sp["budget_ratio"] else f"{sp['budget_tokens']} tokens")
        pool = f", pool {sp['pool_kernel']}" if sp["policy"] == "snapkv" else ""
        parts.append(f"{sp['policy']} {budget}{pool}")
    dec = resolved.get("decode")
    if dec:
        parts.append(f"decode {dec['policy']} to {dec['budget_tokens'] or dec['budget_ratio']} every {dec['interval']}")
    if resolved.get("prefill"):
        parts.append(f"between chunks {resolved['prefill']['policy']}")
    return "; ".join(parts) or "-"


def ratio(result: dict, label: str, key: str = "output_tokens_per_s") -> str:
    r = (result.get("ratios") or {}).get(label, {}).get(key)
    if r:
        return f"**{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f}, {r['n']} runs)"
    runs = result["runs"]
    return f"**{runs[label][key] / runs['stock'][key]:.2f}x** (1 run)"


def _pair(result: dict, label: str, key: str, spec: str) -> str:
    s, k = result["runs"]["stock"].get(key), result["runs"][label].get(key)
    return "-" if s is None or k is None else f"{format(s, spec)} -> {format(k, spec)}"


def measured(result: dict) -> str:
    p = result.get("provenance") or {}
    when = str(p.get("date", "?"))[:10]
    commit = str(p.get("commit", "?"))
    commit = commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")
    return f"{when}, {commit}" + (" (recovered)" if p.get("recovered") else "")


def render_summary() -> str:
    head = ("| workload | kvsieve | output tokens/s vs stock: median (range, runs) | mean TTFT (s) stock -> kvsieve "
            "| p99 TTFT (s) | mean TPOT (ms) | p99 TPOT (ms) | KV blocks per running request | largest batch "
            "| measured (date, commit) |")
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for name, label, what in SUMMARY:
        if not (RESULTS / name).is_file():
            continue
        r = load(name)
        if label not in r["runs"]:
            continue
        lines.append(" | ".join([
            f"| {what}", setting(r, label), ratio(r, label),
            _pair(r, label, "ttft_mean_s", ".1f"), _pair(r, label, "ttft_p99_s", ".1f"),
            _pair(r, label, "tpot_mean_ms", ".0f"), _pair(r, label, "tpot_p99_ms", ".0f"),
            _pair(r, label, "kv_blocks_per_request", ".1f"), _pair(r, label, "max_running", "d"),
            measured(r)]) + " |")
    return "\n".join(lines) + "\n"


def render_demo() -> str:
    r = load("demo.json")
    runs = r["runs"]
    labels = list(runs)
    rows = [("output tokens/s", "output_tokens_per_s", ".1f"), ("mean TTFT (s)", "ttft_mean_s", ".1f"),
            ("p99 TTFT (s)", "ttft_p99_s", ".1f"), ("mean time per output token (ms)", "tpot_mean_ms", ".0f"),
            ("p99 time per output token (ms)", "tpot_p99_ms", ".0f"),
            ("KV blocks per running request", "kv_blocks_per_request", ".1f"),
            ("largest batch", "max_running", "d"), ("preemptions", "preemptions", "d")]
    lines = ["| " + " | ".join(["demo run", *labels]) + " |", "|" + " --- |" * (len(labels) + 1)]
    for title, key, spec in rows:
        lines.append(f"| {title} | " + " | ".join("-" if runs[l].get(key) is None else format(runs[l][key], spec)
                                                  for l in labels) + " |")
    ratios = r.get("ratios") or {}
    lines.append("| output tokens/s vs stock: median (range) | 1.00x | " + " | ".join(
        f"{ratios[l]['output_tokens_per_s']['median']:.2f}x ({ratios[l]['output_tokens_per_s']['min']:.2f}-"
        f"{ratios[l]['output_tokens_per_s']['max']:.2f})" if l in ratios else
        f"{runs[l]['output_tokens_per_s'] / runs['stock']['output_tokens_per_s']:.2f}x" for l in labels[1:]) + " |")
    if r.get("accuracy"):
        lines.append("| answers found (exact match) | " + " | ".join(
            f"{r['accuracy'][l][0]}/{r['accuracy'][l][1]}" for l in labels) + " |")
    if all(runs[l].get("goodput") for l in labels):
        slo = r["slo"]
        lines.append(f"| goodput: requests/s within TTFT {slo['ttft_s']:.0f} s, TPOT {slo['tpot_ms']:.0f} ms | "
                     + " | ".join(f"{runs[l]['goodput']['requests_per_s']:.3f} ({runs[l]['goodput']['requests_met']}"
                                  f"/{runs[l]['goodput']['requests']})" for l in labels) + " |")
    p = r["provenance"]
    agree = r.get("greedy_agreement_full_budget")
    foot = [f"\n`{p['command']}`, {p.get('repeats', 1)} repeats, {measured(r)}, {p['machine']['cores']} cores"
            + (f"; greedy outputs at full budget identical to stock for {agree['identical']} of {agree['requests']}"
               if agree else "") + "; `bench/results/demo.json`"]
    return "\n".join(lines + foot) + "\n"


def render_ci() -> str:
    r = load("ci-run.json")
    c, e, p = r["counts"], r.get("emulated_cuda"), r["provenance"]
    steps = {s["command"]: s["seconds"] for s in r["steps"]}

    def mmss(s: int) -> str:
        return f"{s // 60} min {s % 60} s"

    py = sum(v for k, v in steps.items() if "pytest" in k)
    out = [f"| clean clone, `{p['command']}` | passed | failed | skipped | emulated CUDA | wall time | of which pytest |",
           "| --- | --- | --- | --- | --- | --- | --- |",
           f"| {str(p['commit'])[:7]}, {str(p['date'])[:10]}, {p['machine']['cores']} cores | {c['passed']} | "
           f"{c['failed']} | {c['skipped']} | {e['passed'] if e else '-'} passed, {e['failed'] if e else '-'} failed "
           f"| {mmss(r['seconds'])} | {mmss(py)} |"]
    return "\n".join(out) + "\n"


def render_kernels() -> str:
    r = load("kernels-cpu.json")
    p = r["provenance"]

    def t(ns: float) -> str:
        return f"{ns / 1e6:.2f} ms" if ns >= 1e6 else f"{ns / 1e3:.0f} us"

    lines = ["| kernel | bound | shape | kernel | bound | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {x['what']} | {x['against']} | {x['shape']} | {t(x['kernel_ns'])} | {t(x['bound_ns'])} | "
              f"{x['ratio']:.2f} |" for x in r["rows"]]
    m = p["machine"]
    lines.append(f"\n`{p['command']}` then `python bench/kernels.py --no-run`; {m['cpu']}, {m['cores']} cores "
                 f"({', '.join(m['isa'])}), {measured(r)}; `bench/results/kernels-cpu.json`")
    return "\n".join(lines) + "\n"


def render_serving(name: str) -> str:
    from report import serving_table

    return serving_table(load(name)) + "\n"


ACCURACY_ROWS = [("dense vLLM", "prefix_caching_off", "dense"),
                 ("vLLM + kvsieve SnapKV", "prefix_caching_off", "kvsieve:snapkv:{b}"),
                 ("vLLM + kvsieve knorm", "prefix_caching_off", "kvsieve:knorm:{b}"),
                 ("vLLM + kvsieve StreamingLLM", "prefix_caching_off", "kvsieve:streaming:{b}"),
                 ("kvpress KeyDiff", "kvpress", "kvpress:keydiff:{b}"), ("kvpress TOVA", "kvpress", "kvpress:tova:{b}"),
                 ("kvpress Knorm", "kvpress", "kvpress:knorm:{b}"),
                 ("kvpress StreamingLLM", "kvpress", "kvpress:streaming:{b}"),
                 ("kvpress SnapKV", "kvpress", "kvpress:snapkv:{b}"),
                 ("kvpress SnapKV, kvsieve's window 32 and pool 31", "kvpress", "kvpress:snapkv_w32_k31:{b}"),
                 ("kvpress AdaKV(SnapKV)", "kvpress", "kvpress:adakv_snapkv:{b}"),
                 ("kvpress ExpectedAttention", "kvpress", "kvpress:expected_attention:{b}"),
                 ("prefix caching on: dense", "prefix_caching_on", "dense"),
                 ("prefix caching on: kvsieve SnapKV", "prefix_caching_on", "kvsieve:snapkv:{b}"),
                 ("prefix caching on: kvsieve knorm", "prefix_caching_on", "kvsieve:knorm:{b}"),
                 ("prefix caching on: kvsieve StreamingLLM", "prefix_caching_on", "kvsieve:streaming:{b}")]


def render_accuracy(name: str) -> str:
    """Found (exact match) per run and budget, with the 95% Wilson interval of the share."""
    from accuracy import wilson

    r = load(name)
    budgets = sorted({float(k.rsplit(":", 1)[1]) for src in r["scores"].values() for k in src if k.count(":") == 2})
    lines = ["| run: found of prompts (95% interval of the share) | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|" + " --- |" * (len(budgets) + 1)]
    for title, src, key in ACCURACY_ROWS:
        cells = []
        for b in budgets:
            tree = r["scores"].get(src, {}).get(key.format(b=b))
            if tree is None:
                cells.append("-")
                continue
            k, n = cells_total(tree)
            lo, hi = wilson(k, n)
            cells.append(f"{k}/{n} ({lo:.2f}-{hi:.2f})")
        if any(c != "-" for c in cells):
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    p = r.get("provenance") or {}
    lines.append(f"\n`bench/results/{name}`, {measured(r)}, {len(r['samples'])} prompts; SnapKV pool width "
                 f"{(p.get('config') or {}).get('defaults_then', {}).get('pool_kernel', 31)} where not set")
    return "\n".join(lines) + "\n"


def render_accuracy_lengths(name: str) -> str:
    """Found per prompt length (all tasks), per run and budget, with the 95% interval."""
    from accuracy import wilson

    r = load(name)
    budgets = sorted({float(k.rsplit(":", 1)[1]) for src in r["scores"].values() for k in src if k.count(":") == 2})
    lengths = sorted({int(L) for src in r["scores"].values() for tree in src.values() for t in tree.values()
                      for L in t})
    lines = ["| run | budget | " + " | ".join(f"{L // 1024}k tokens" for L in lengths) + " |",
             "|" + " --- |" * (len(lengths) + 2)]
    for title, src, key in ACCURACY_ROWS:
        for b in budgets if "{b}" in key else [None]:
            tree = r["scores"].get(src, {}).get(key.format(b=b))
            if tree is None:
                continue
            cells = []
            for L in lengths:
                k = sum(t.get(str(L), [0, 0])[0] for t in tree.values())
                n = sum(t.get(str(L), [0, 0])[1] for t in tree.values())
                lo, hi = wilson(k, n)
                cells.append(f"{k}/{n} ({lo:.2f}-{hi:.2f})")
            lines.append(f"| {title} | {'-' if b is None else f'{b:.0%}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_accuracy_paired(name: str) -> str:
    """Prompt by prompt against dense vLLM: of the prompts dense answered, how many each run
    answered too (and lost); of those dense missed, how many it answered."""
    from ruler import score

    r = load(name)
    samples = r["samples"]

    def found(src: str, run: str) -> list[int]:
        return [score(t, s["answers"]) for t, s in zip(r["texts"][src][run], samples)]

    dense = found("prefix_caching_off", "dense")
    budgets = sorted({float(k.rsplit(":", 1)[1]) for src in r["scores"].values() for k in src if k.count(":") == 2})
    lines = [f"| run | budget | of the {sum(dense)} dense answered: answered too | lost | of the {len(dense) - sum(dense)} "
             "dense missed: answered |", "| --- | --- | --- | --- | --- |"]
    for title, src, key in ACCURACY_ROWS:
        for b in budgets if "{b}" in key else []:
            if key.format(b=b) not in r["texts"].get(src, {}):
                continue
            got = found(src, key.format(b=b))
            both = sum(d and g for d, g in zip(dense, got))
            gained = sum(g and not d for d, g in zip(dense, got))
            lines.append(f"| {title} | {b:.0%} | {both} | {sum(dense) - both} | {gained} |")
    return "\n".join(lines) + "\n"


def render_accuracy_tokens(name: str) -> str:
    """The token-budget runs (block selection and eviction at the same token counts) beside
    dense: by task, by length, and the Quest goal (`accuracy.token_report`)."""
    from accuracy import token_report

    r = load(name)
    body = token_report(r).strip("\n").replace("#### ", "")
    return body + f"\n\n`bench/results/{name}`, {measured(r)}, {len(r['samples'])} prompts\n"


def render_decode_quality(name: str) -> str:
    """Decode-time eviction on teacher-forced long generations (bench/decode_quality.py): per
    budget, each run's NLL increase over the dense cache and its greedy-agreement length."""
    r = load(name)
    s = r["summary"]
    runs = sorted({k.split("@")[0] for k in s if "@" in k}, key=lambda k: (not k.startswith("kvsieve"), k))
    lines = ["| budget (tokens) | " + " | ".join(runs) + " |", "|" + " --- |" * (len(runs) + 1)]
    for b in r["budgets"]:
        cells = [f"+{s[f'{k}@{b}']['nll_increase']:.4f} ({s[f'{k}@{b}']['agreement_tokens']:.0f})"
                 if f"{k}@{b}" in s else "-" for k in runs]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return ("\n".join(lines) + f"\n\nNLL increase per token over dense (dense: {s['dense']['nll']:.4f} nats), in "
            f"brackets the mean greedy-agreement length in tokens; {r['samples']} passages x "
            f"{r['continuation_tokens']} teacher-forced tokens after a {r['prompt_tokens']}-token prompt, events every "
            f"{r['interval']} tokens; kvpress {r['kvpress']['version']}; `bench/results/{name}`, {measured(r)}\n")


def render_soak(names: list[str]) -> str:
    """The soak runs: load, requests and their outcomes, tokens, preemptions, memory, blocks back."""
    lines = ["| run | measured (date, commit) | load | requests | completed valid (whole + streamed) | hung up mid-stream "
             "| failed | output tokens | preemptions | slowest request | RSS MiB start / warm / max / end "
             "| every block back |", "|" + " --- |" * 12]
    for name in names:
        r = load(name)
        c, m = r["client"], r["rss_mib"]
        run = "stock vLLM" if "stock" in name else "kvsieve" + (", --mix" if c.get("own_budget_or_off") else "")
        slowest = r.get("slowest_request_s")
        lines.append(f"| {run} | {measured(r)} | {r['load_s']:.0f} s | {c['requests']} | {c['complete_ok']} + "
                     f"{c['stream_ok']} | {c['disconnected']} | {c['invalid'] + c['http_errors'] + c['exceptions']} "
                     f"| {c['tokens']:,} | {r['preemptions']:.0f} | {'-' if slowest is None else f'{slowest:.1f} s'} "
                     f"| {m['start']} / {m['warm']} / {m['max']} / {m['end']} "
                     f"| {'yes' if r['checks'].get('every block back') else 'no'} |")
    return "\n".join(lines) + "\n"


def render_block(name: str) -> str:
    if name.startswith("soak:"):
        return render_soak(name.split(":", 1)[1].split(","))
    if name.startswith("serving:"):
        return render_serving(name.split(":", 1)[1])
    if name.startswith("accuracy:"):
        return render_accuracy(name.split(":", 1)[1])
    if name.startswith("accuracy-paired:"):
        return render_accuracy_paired(name.split(":", 1)[1])
    if name.startswith("accuracy-tokens:"):
        return render_accuracy_tokens(name.split(":", 1)[1])
    if name.startswith("decode-quality:"):
        return render_decode_quality(name.split(":", 1)[1])
    if name.startswith("accuracy-lengths:"):
        return render_accuracy_lengths(name.split(":", 1)[1])
    return {"summary": render_summary, "demo": render_demo, "ci": render_ci, "kernels": render_kernels}[name]()


def render_text(text: str, where: str, problems: list[str]) -> str:
    def block(m: re.Match) -> str:
        try:
            body = render_block(m[2])
        except (OSError, KeyError, ValueError) as e:
            problems.append(f"{where}: render:{m[2]}: {type(e).__name__}: {e}")
            return m[0]
        if body != m[3]:
            problems.append(f"{where}: the block render:{m[2]} differs from its result files")
        return m[1] + body + m[4]

    def quote(m: re.Match) -> str:
        try:
            value = m[4].format(lookup(load(m[2]), m[3]))
        except (OSError, KeyError, IndexError, ValueError, TypeError) as e:
            problems.append(f"{where}: {m[0]!r}: {type(e).__name__}: {e}")
            return m[0]
        if value != m[1]:
            problems.append(f"{where}: quotes {m[1]} where {m[2]}:{m[3]} gives {value}")
        return value + m[0][len(m[1]):]

    return QUOTE.sub(quote, BLOCK.sub(block, text))


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    problems: list[str] = []
    for doc in DOCS:
        text = doc.read_text()
        new = render_text(text, str(doc.relative_to(ROOT)), problems)
        if not check and new != text:
            doc.write_text(new)
    if check:
        print("\n".join(problems) or "every rendered table and quoted figure matches its result file")
        return 1 if problems else 0
    print("\n".join(f"updated: {p}" for p in problems) or "nothing to update")
    return 0


if __name__ == "__main__":
    sys.exit(main())
