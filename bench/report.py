"""Figures from engine runs: per-run summary, the side-by-side table, the plot."""

from __future__ import annotations

import math
from pathlib import Path


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


TIME_TERMS = ("per step", "prompt tokens (projections, MLP)", "prompt attention (query-key pairs)",
              "decode tokens (projections, MLP, sampling)", "decode KV reads (tokens read)")


def attribute_time(records: list) -> dict | None:
    """Where the step time goes, estimated by a least-squares fit over the run's steps:
    seconds = a + b*prompt tokens + c*prompt query-key pairs + d*decode tokens + e*KV tokens the
    decodes read. Returns each term's share of the total step time (terms with a negative fit are
    dropped and the rest refit), or None with too few steps."""
    import numpy as np

    if len(records) < 20:
        return None
    r = np.array(records, dtype=float)
    y, x = r[:, 0], np.column_stack([np.ones(len(r)), r[:, 1:]])
    keep = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
        neg = [k for k, c in zip(keep, coef) if c < 0]
        if not neg:
            break
        keep.remove(neg[0])
    total = float(y.sum())
    seconds = dict.fromkeys(TIME_TERMS, 0.0)
    for k, c in zip(keep, coef):
        seconds[TIME_TERMS[k]] = float(c * x[:, k].sum())
    fitted = sum(seconds.values())
    return {"total_s": total, "fitted_s": fitted, "seconds": seconds,
            "r2": float(1 - ((y - x[:, keep] @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum())}


def summarize(run: dict, requests: list) -> dict:
    """Serving figures of one engine run (`engine_run.py`'s RESULT)."""
    times = run["token_times"]
    wall = run["wall_s"]
    out_tokens = sum(len(t) for t in run["tokens"])
    for (prompt, max_tokens, *_), got in zip(requests, run["tokens"]):
        if len(got) != max_tokens:
            raise ValueError(f"a request produced {len(got)} tokens, expected {max_tokens}")
    # A follower's prompt (a chat's next turn) is only known once it arrived: the run reports it.
    prompt_lens = run.get("prompt_lens") or [len(r[0]) for r in requests]
    ttft = [t[0] for t in times]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1]
    prof = run["profile"]
    kv = run.get("kvsieve") or {}
    return {
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "output_tokens_per_s": out_tokens / wall,
        "total_tokens_per_s": (out_tokens + sum(prompt_lens)) / wall,
        "prompt_tokens": sum(prompt_lens),
        # Share of prompt tokens the prefix cache held (vLLM's num_cached_tokens per request).
        "prefix_cache_hit_rate": sum(run["cached_tokens"]) / max(1, sum(prompt_lens)) if "cached_tokens" in run
        else None,
        "ttft_mean_s": sum(ttft) / len(ttft), "ttft_p99_s": percentile(ttft, 99),
        "tpot_mean_ms": 1e3 * sum(tpot) / len(tpot) if tpot else None,
        "tpot_p99_ms": 1e3 * percentile(tpot, 99) if tpot else None,
        "peak_kv_blocks": prof["peak_blocks"], "kv_blocks": run["total_blocks"],
        "mean_kv_blocks": prof["blocks_in_use_sum"] / max(1, prof["steps"]),
        # Averaged over steps, weighted by running requests: what one request holds.
        "kv_blocks_per_request": prof["blocks_in_use_sum"] / max(1, prof["running_sum"]),
        "max_running": prof["max_running"], "max_decode_batch": prof["max_decode_batch"],
        "preemptions": prof["preemptions"], "recomputed_tokens": prof["recomputed_tokens"],
        "profile": {
            "steps": prof["steps"], "prefill_steps": prof["prefill_steps"], "decode_steps": prof["decode_steps"],
            "prefill_step_s": prof["prefill_step_s"], "decode_step_s": prof["decode_step_s"],
            "forward_s": prof["forward_s"], "schedule_s": prof["schedule_s"],
            "prompt_tokens_computed": prof["prompt_tokens_computed"], "decode_tokens": prof["decode_tokens"],
            "kvsieve_worker_s": kv.get("worker", {}).get("seconds_in_kvsieve", 0.0),
            "kvsieve_scheduler_s": kv.get("scheduler", {}).get("seconds_in_kvsieve", 0.0),
            # Block selection's time inside the forward (planning the step, selecting per layer).
            "kvsieve_selection_s": kv.get("scheduler", {}).get("selection", {}).get("seconds", 0.0),
        },
        "kvsieve": {"compressions": kv.get("worker", {}).get("compressions", 0),
                    "kept_ratio": kv.get("worker", {}).get("kept_ratio"),
                    "blocks_released": kv.get("scheduler", {}).get("blocks_released", 0),
                    "selection": kv.get("scheduler", {}).get("selection") if
                    kv.get("scheduler", {}).get("selection", {}).get("steps") else None} if kv else None,
        "time_attribution": attribute_time(prof.get("step_records", [])),
        "engine_init_s": run["init_s"],
        "ttft_s": ttft, "tpot_s": tpot,
        # Per request, in request order (None where one token gives no time per output token).
        "tpot_by_request_s": [(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None for t in times],
        "output_tokens_by_request": [len(t) for t in run["tokens"]],
    }


def goodput(s: dict, slo: dict) -> dict | None:
    """Requests (and their output tokens) per second of wall time that met both latency limits:
    TTFT <= slo["ttft_s"] and time per output token <= slo["tpot_ms"]."""
    if slo.get("ttft_s") is None or slo.get("tpot_ms") is None or "tpot_by_request_s" not in s:
        return None
    met = [i for i, (ttft, tpot) in enumerate(zip(s["ttft_s"], s["tpot_by_request_s"]))
           if ttft <= slo["ttft_s"] and (tpot is None or 1e3 * tpot <= slo["tpot_ms"])]
    return {"requests_met": len(met), "requests": len(s["ttft_s"]),
            "requests_per_s": len(met) / s["wall_s"],
            "output_tokens_per_s": sum(s["output_tokens_by_request"][i] for i in met) / s["wall_s"]}


COMPACT = ("wall_s", "output_tokens_per_s", "requests_per_s", "ttft_mean_s", "ttft_p99_s", "tpot_mean_ms",
           "tpot_p99_ms", "peak_kv_blocks", "kv_blocks_per_request", "max_running", "preemptions", "goodput")


def compact(s: dict) -> dict:
    """The figures of one repeat that a ratio or a range is computed from."""
    return {k: s.get(k) for k in COMPACT}


def median_index(xs: list[float]) -> int:
    """Index of the median value (the lower middle one for an even count)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    return order[(len(xs) - 1) // 2]


def spread(xs: list[float]) -> dict:
    ys = sorted(xs)
    n = len(ys)
    med = ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2
    return {"median": med, "min": ys[0], "max": ys[-1], "values": xs, "n": n}


RATIO_KEYS = {"output_tokens_per_s": "higher", "ttft_mean_s": "lower", "ttft_p99_s": "lower",
              "tpot_mean_ms": "lower", "tpot_p99_ms": "lower"}


def paired_ratios(stock: list[dict], runs: list[dict]) -> dict:
    """Per figure, the ratios run_i / stock_i of the runs made in the same round: median, range."""
    out = {}
    for key in RATIO_KEYS:
        pairs = [(r.get(key), s.get(key)) for r, s in zip(runs, stock)]
        if all(x is not None and y for x, y in pairs):
            out[key] = spread([x / y for x, y in pairs])
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def serving_table(result: dict) -> str:
    """Markdown table: one column per run, ratios against stock in the last rows."""
    runs = result["runs"]
    labels = list(runs)
    stock = runs.get("stock")  # absent when stock vLLM refused the workload (result["stock_refused"])
    rows = [
        ("requests/s", "requests_per_s", ".3f"),
        ("output tokens/s", "output_tokens_per_s", ".1f"),
        ("mean TPOT (ms)", "tpot_mean_ms", ".1f"),
        ("p99 TPOT (ms)", "tpot_p99_ms", ".1f"),
        ("mean TTFT (s)", "ttft_mean_s", ".1f"),
        ("p99 TTFT (s)", "ttft_p99_s", ".1f"),
        ("peak KV blocks in use", "peak_kv_blocks", "d"),
        ("mean KV blocks in use", "mean_kv_blocks", ".0f"),
        ("KV blocks per running request", "kv_blocks_per_request", ".1f"),
        ("largest batch (running requests)", "max_running", "d"),
        ("largest decode batch", "max_decode_batch", "d"),
        ("preemptions", "preemptions", "d"),
        ("prompt tokens recomputed", "recomputed_tokens", "d"),
    ]
    if result.get("engine", {}).get("enable_prefix_caching") and \
            all(runs[l].get("prefix_cache_hit_rate") is not None for l in labels):
        rows.append(("prefix-cache hit rate (prompt tokens)", "prefix_cache_hit_rate", ".1%"))
    head = "| metric | " + " | ".join(labels) + " |"
    lines = [head, "|" + " --- |" * (len(labels) + 1)]
    for title, key, spec in rows:
        lines.append(f"| {title} | " + " | ".join(_fmt(runs[l][key], spec) for l in labels) + " |")
    prof_rows = [("time in steps with prompt tokens (s)", "prefill_step_s"),
                 ("time in decode-only steps (s)", "decode_step_s"),
                 ("model forward + sampling (s)", "forward_s"),
                 ("kvsieve worker: score+select+compact (s)", "kvsieve_worker_s"),
                 ("kvsieve scheduler: block-list rewrites (s)", "kvsieve_scheduler_s")]
    for title, key in prof_rows:
        lines.append(f"| {title} | " + " | ".join(f"{runs[l]['profile'][key]:.2f}" for l in labels) + " |")
    if any(runs[l]["profile"].get("kvsieve_selection_s") for l in labels):
        # Block selection shortens decode steps (what it is for) at a cost inside the forward.
        lines.append("| kvsieve selection: plan + select, inside the forward (s) | " + " | ".join(
            f"{runs[l]['profile'].get('kvsieve_selection_s', 0.0):.2f}" for l in labels) + " |")
        lines.append("| mean decode-only step (ms) | " + " | ".join(
            f"{1e3 * runs[l]['profile']['decode_step_s'] / max(1, runs[l]['profile']['decode_steps']):.1f}"
            for l in labels) + " |")
    if all(runs[l].get("time_attribution") for l in labels):
        for term in TIME_TERMS:
            lines.append(f"| est. step time: {term} (s) | " + " | ".join(
                f"{runs[l]['time_attribution']['seconds'][term]:.1f}" for l in labels) + " |")
    slo = result.get("slo") or {}
    if all(runs[l].get("goodput") for l in labels):
        lines.append(f"| goodput: requests/s with TTFT <= {slo['ttft_s']:.1f} s and TPOT <= {slo['tpot_ms']:.0f} ms "
                     "| " + " | ".join(f"{runs[l]['goodput']['requests_per_s']:.3f} "
                                        f"({runs[l]['goodput']['requests_met']}/{runs[l]['goodput']['requests']})"
                                        for l in labels) + " |")
    ratios = result.get("ratios") or {}
    if stock and ratios:
        n = len(result["repeats"]["stock"])
        lines.append(f"| output throughput vs stock (median of {n} paired runs, range) | 1.00x | " + " | ".join(
            f"{ratios[l]['output_tokens_per_s']['median']:.2f}x ({ratios[l]['output_tokens_per_s']['min']:.2f}-"
            f"{ratios[l]['output_tokens_per_s']['max']:.2f})" if l in ratios else "-" for l in labels[1:]) + " |")
    elif stock:
        lines.append("| output throughput vs stock | " + " | ".join(
            f"{runs[l]['output_tokens_per_s'] / stock['output_tokens_per_s']:.2f}x" for l in labels) + " |")
        lines.append("| KV blocks per request vs stock | " + " | ".join(
            f"{stock['kv_blocks_per_request'] / runs[l]['kv_blocks_per_request']:.2f}x fewer" for l in labels) + " |")
    w = result["workload"]
    m = result["model"]
    agree = result.get("greedy_agreement_full_budget")
    # A follower's prompt holds the turns before it: the runs report what was served.
    prompt_tokens = runs[labels[0]].get("prompt_tokens") or w["total_prompt_tokens"]
    arrival = ("followers (a chat's next turn, questions after a document) arriving when the request they follow "
               "finished, the rest at t=0; prefix caching on") if w.get("prefix_caching") else "all arriving at t=0"
    foot = [
        "",
        f"workload {w['name']}: {w['requests']} requests, prompts {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} "
        f"tokens, outputs {w['output_tokens'][0]}-{w['output_tokens'][1]} ({prompt_tokens} prompt / "
        f"{w['total_output_tokens']} output tokens in all), {arrival}",
        f"model {m['layers']} layers, {m['q_heads']} query / {m['kv_heads']} KV heads of {m['head_dim']}, "
        f"{m['dtype']}; KV space {result['engine']['num_gpu_blocks_override']} blocks of "
        f"{result['engine']['block_size']} tokens ({result['kv_bytes_per_block'] / 2**10:.0f} KiB each)",
    ]
    if result.get("kvsieve_config"):
        cfg = "; ".join(l for l in result["kvsieve_config"].splitlines() if l.strip())
        foot.append(f"kvsieve config ({Path(result.get('kvsieve_config_file', '')).name}): {cfg}"
                    + ("; kvsieve@X% runs set sparsity.budget_ratio = X" if any("@" in l and l != "kvsieve@100%" for l in labels) else ""))
    if result.get("stock_refused"):
        foot.append(f"stock vLLM refused to start: {result['stock_refused']}")
    if agree:
        foot.append(f"greedy outputs at full budget (kvsieve@100%) identical to stock: {agree['identical']}/"
                    f"{agree['requests']} requests")
    return "\n".join(lines + foot)


def plot_serving(result: dict, path) -> None:
    """Output throughput, largest batch and KV blocks per request against budget (stock dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    sieve = sorted(((float(l.split("@")[1].rstrip("%")), r) for l, r in runs.items() if l.startswith("kvsieve@")),
                   key=lambda x: x[0])
    stock = runs.get("stock")
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.6))
    metrics = ((a1, "output_tokens_per_s", "output tokens/s"), (a2, "max_running", "largest batch (running requests)"),
               (a3, "kv_blocks_per_request", "KV blocks per running request"))
    if "kvsieve" in runs or len(sieve) < 2:
        # One kvsieve config (no budget sweep): bars per run.
        labels = list(runs)
        for ax, key, title in metrics:
            ax.bar(range(len(labels)), [runs[l][key] for l in labels],
                   color=["gray" if l == "stock" else "C0" for l in labels])
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_title(title)
            ax.grid(alpha=0.3, axis="y")
    else:
        for ax, key, title in metrics:
            ax.plot([b for b, _ in sieve], [r[key] for _, r in sieve], "o-", label="vLLM + kvsieve")
            if stock:
                ax.axhline(stock[key], ls="--", color="gray", label="stock vLLM")
            ax.set_xlabel("kvsieve budget (% of prompt kept)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        a2.legend(fontsize=8)
    for ax in (a1, a2, a3):
        ax.set_ylim(bottom=0)
    w = result["workload"]
    fig.suptitle(f"{w['name']}: {w['requests']} requests, {w['prompt_tokens'][0]}-{w['prompt_tokens'][1]} prompt, "
                 f"{w['output_tokens'][0]}-{w['output_tokens'][1]} output tokens"
                 + ("; stock vLLM refused to start" if result.get("stock_refused") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    # Re-print the table and redraw the plot of a saved result: python bench/report.py RESULT.json
    import json
    import sys
    from pathlib import Path

    for arg in sys.argv[1:]:
        saved = json.loads(Path(arg).read_text())
        print(serving_table(saved))
        plot_serving(saved, Path(arg).with_suffix(".png"))
