"""`kvsieve-check CONFIG [--model DIR] [--kv-blocks N] [--chunk N]`: validate a kvsieve config and
show what it does to requests before a server runs with it.

For a few prompt lengths it plans each request's events with the library's own planner (what
the plugin's scheduler calls): the tokens and KV blocks a request holds while its prompt is
prefilled (compressed between chunks with `[prefill]`), once it is compressed and at the end of
its answer (decode re-compression included), against stock vLLM, and the largest batch a KV
space of N blocks holds with and without kvsieve. With every request bounded, it prints the
bound vLLM then starts and admits by (prompts longer than the KV space are served). Needs the
library only (no vLLM): exit status 0 for a valid config, 2 with the library's message otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .lib import PHASE_DECODE, PHASE_PREFILL, PHASE_PREFILL_CHUNK, POLICY_NAMES, KvsieveError, load

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def request_profile(config, prompt: int, output: int, block_size: int, chunk: int) -> dict:
    """Cached tokens of one request: at its largest while prefilling in `chunk`-token steps
    (chunk events as they fall due; as in the plugin's scheduler, none in a step that computes
    part of the prefill-end SnapKV window or the prompt's last token), after the prefill event,
    and at its largest while decoding `output` tokens (decode events as they fall due)."""
    logical = cached = peak_prefill = 0
    chunked = config.params(PHASE_PREFILL_CHUNK).policy != 0
    end = config.params(PHASE_PREFILL)
    window = end.window if POLICY_NAMES[end.policy] == "snapkv" else 0
    while logical < prompt:
        step = min(chunk, prompt - logical)
        logical, cached = logical + step, cached + step
        peak_prefill = max(peak_prefill, cached)
        if chunked and logical < prompt and logical <= prompt - window:
            cached = int(config.plan_chunk(logical, cached, 0, block_size, prompt).kept_tokens)
    p = config.plan(prompt, cached, 0, block_size, PHASE_PREFILL)
    cached = int(p.kept_tokens)
    after_prefill, peak = cached, cached
    dec = config.params(PHASE_DECODE)
    # Decode SnapKV, as the scheduler runs it: the queries of a step go to the ring while an
    # event falls due within the window, and the event waits until the ring holds the window.
    ring = dec.window if POLICY_NAMES[dec.policy] == "snapkv" else 0
    ring_from = None
    for n in range(1, output + 1):
        cached += 1
        peak = max(peak, cached)
        if ring:
            if not config.plan(prompt + n + ring - 1, cached + ring - 1, 0, block_size, PHASE_DECODE).released_blocks:
                ring_from = None
                continue
            ring_from = prompt + n - 1 if ring_from is None else ring_from
            if prompt + n - ring_from < ring:
                continue
        d = config.plan(prompt + n, cached, 0, block_size, PHASE_DECODE)
        cached = int(d.kept_tokens)
    return {"prompt": prompt, "peak_prefill": peak_prefill, "kept_after_prefill": after_prefill,
            "peak_decoding": peak, "at_end": cached}


def largest_batch(kv_blocks: int, prefill_blocks: int, running_blocks: int) -> int:
    """Requests a KV space holds: one prompt prefilling at its largest, the rest at their
    decoding peak."""
    if kv_blocks < prefill_blocks:
        return 0
    return 1 + (kv_blocks - prefill_blocks) // max(running_blocks, 1)


def _selection_table(config, sel, lengths: list[int], out: int, bs: int, info: dict | None,
                     kv_blocks: int | None) -> None:
    """What `[selection]` reads per decode step against stock, and what its metadata costs."""
    print(f"\nBlock selection: KV blocks one decode step reads per selected layer (at the prompt's length and at "
          f"the end of a {out}-token answer); nothing is evicted, so the batch is stock's:")
    print("| prompt | blocks stock | blocks read | read share | at the end: stock | read |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in lengths:
        (k0, _), (k1, _) = config.selection_blocks([n, n + out], bs)
        b0, b1 = math.ceil(n / bs), math.ceil((n + out) / bs)
        print(f"| {n} | {b0} | {k0} | {k0 / max(b0, 1):.0%} | {b1} | {k1} |")
    if info is not None:
        selected = max(info["layers"] - sel.dense_layers, 0)
        per_block = selected * sel.key_ranges * info["kv_heads"] * info["head_dim"] * 2 * 4
        total = f" = {kv_blocks * per_block / 2**20:.1f} MiB for {kv_blocks} blocks" if kv_blocks else ""
        print(f"Metadata (float32 min and max keys per block, key range, KV head and selected layer): {per_block} "
              f"bytes per block{total}, allocated beside the KV cache.")
    print("Select or evict: selection keeps every token (a later question, or one asked before the document, can "
          "still use any of them) and makes decode steps read less, but saves no memory; eviction frees KV blocks, "
          "so more requests fit, at the cost of the tokens it drops (chosen by the prompt's end). Both together: "
          "selection reads among the blocks eviction kept. Measured: bench/README.md, \"Block selection\".")


def model_info(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {"layers": cfg["num_hidden_layers"], "kv_heads": cfg.get("num_key_value_heads", heads),
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
            "max_len": cfg.get("max_position_embeddings"), "dtype": str(cfg.get("torch_dtype", "float16"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvsieve-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="kvsieve TOML config")
    ap.add_argument("--model", type=Path, help="HF model directory (config.json): KV bytes per block, max length")
    ap.add_argument("--kv-blocks", type=int, help="KV space in blocks (vLLM logs it at start: 'GPU KV cache size')")
    ap.add_argument("--block-size", type=int, default=16, help="vLLM's --block-size (default 16)")
    ap.add_argument("--chunk", type=int, default=2048,
                    help="prefill tokens per step: vLLM's --max-num-batched-tokens (default 2048)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="prompt lengths, comma-separated")
    ap.add_argument("--output-tokens", type=int, default=256, help="answer length per request (default 256)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="KV dtype (default: the model's)")
    a = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--lengths: {a.lengths!r} is not a comma-separated list of token counts")
    if a.block_size <= 0 or a.chunk <= 0 or a.output_tokens < 0 or (a.kv_blocks is not None and a.kv_blocks <= 0):
        ap.error("--block-size, --chunk and --kv-blocks must be positive, --output-tokens at least 0")
    try:
        lib = load()
        config = lib.config_from_file(a.config)
    except KvsieveError as e:
        print(f"kvsieve-check: {e.message}", file=sys.stderr)
        return 2
    pre, dec, chunks = config.params(PHASE_PREFILL), config.params(PHASE_DECODE), config.params(PHASE_PREFILL_CHUNK)

    def budget(p) -> str:
        return f"{p.budget_tokens} tokens" if p.budget_tokens else f"{p.budget_ratio:g} of the sequence"

    sel = config.selection()
    print(f"{a.config}: valid (libkvsieve {lib.version} at {lib.path})")
    if pre.policy:
        print(f"  prefill: {POLICY_NAMES[pre.policy]}, budget {budget(pre)}, sink {pre.sink_tokens}, "
              f"tail kept {pre.protected_tail}, min_length {pre.min_length}")
    else:
        print("  eviction: none (no [sparsity]): every token stays cached")
    if chunks.policy:
        print(f"  between prefill chunks: {POLICY_NAMES[chunks.policy]}, budget {budget(chunks)} of the prompt, "
              f"once the cache is {chunks.interval} token(s) past it")
    else:
        print("  between prefill chunks: nothing (the prompt is held whole until its prefill ends)")
    if dec.policy:
        scored = ""
        if POLICY_NAMES[dec.policy] == "snapkv":
            scored = f", scored with the queries of the last {dec.window} generated tokens"
            if dec.carry:
                scored += f" and {dec.carry:g} x each kept token's score at the event before (decode.carry)"
        print(f"  decode:  {POLICY_NAMES[dec.policy]}, budget {budget(dec)}, every {dec.interval} tokens past it{scored}")
    else:
        print("  decode:  no re-compression while generating")
    if sel.policy:
        print(f"  selection: {POLICY_NAMES[sel.policy]}, each decode step reads {budget(sel)} (whole blocks, the "
              f"first and the last always) of sequences from {sel.min_length} tokens, in every layer from layer "
              f"{sel.dense_layers} on (the first {sel.dense_layers} read every block), blocks ranked by "
              f"{sel.spread:g} of their keys' range (1: Quest's bound)"
              + (f", {sel.key_ranges} key ranges per block (a block scores as its best run of slots; "
                 f"{sel.key_ranges}x the metadata)" if sel.key_ranges > 1 else ""))
    bytes_per_block = None
    info = None
    max_len = max(lengths) + a.output_tokens
    if a.model:
        info = model_info(a.model)
        size = DTYPE_BYTES.get(a.dtype or info["dtype"], 2)
        bytes_per_block = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * a.block_size * size
        print(f"  model:   {a.model} ({info['layers']} layers x {info['kv_heads']} KV heads x {info['head_dim']}, "
              f"{a.dtype or info['dtype']}): {bytes_per_block / 1024:.0f} KiB per {a.block_size}-token block")
        if info["max_len"]:
            lengths = [n for n in lengths if n + a.output_tokens <= info["max_len"]] or lengths
            max_len = info["max_len"]
    bs, out = a.block_size, a.output_tokens
    bound = config.max_cached_tokens(max_len, a.chunk, bs)
    if bound < max_len:
        print(f"  bounded: one request holds at most {bound} tokens ({math.ceil(bound / bs)} blocks) at "
              f"max_model_len {max_len}, chunk {a.chunk}; vLLM starts and admits by that, so prompts longer than "
              "the KV space are served")
    else:
        print(f"  unbounded: a request may hold up to max_model_len ({max_len}) tokens; vLLM's KV space must hold "
              "one such request (bounding needs [prefill], [decode] and [requests] allow_opt_out = false with "
              "max_budget_ratio and max_budget_tokens below the whole sequence)")
    head = ["prompt", "largest while prefilling", "kept after prefill", "blocks stock", "blocks kvsieve",
            "kept share"]
    if a.kv_blocks:
        head += [f"batch in {a.kv_blocks} blocks: stock", "kvsieve"]
    print(f"\nPer request ({out} output tokens, block size {bs}, {a.chunk}-token prefill chunks; tokens at the "
          "largest while prefilling, blocks at the largest while decoding):")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    batches = []
    for n in lengths:
        prof = request_profile(config, n, out, bs, a.chunk)
        stock = math.ceil((n + out) / bs)
        mine = math.ceil(prof["peak_decoding"] / bs)
        row = [str(n), str(prof["peak_prefill"]), str(prof["kept_after_prefill"]), str(stock), str(mine),
               f"{mine / stock:.0%}"]
        if a.kv_blocks:
            batches.append((largest_batch(a.kv_blocks, stock, stock),
                            largest_batch(a.kv_blocks, math.ceil(prof["peak_prefill"] / bs),
                                          math.ceil(prof["peak_decoding"] / bs))))
            row += [str(b) for b in batches[-1]]
        print("| " + " | ".join(row) + " |")
    if bytes_per_block and a.kv_blocks:
        print(f"\nKV space: {a.kv_blocks} blocks = {a.kv_blocks * bytes_per_block / 2**30:.2f} GiB")
    if sel.policy:
        _selection_table(config, sel, lengths, out, bs, info, a.kv_blocks)
        if bs % sel.key_ranges:
            print(f"\nerror: selection.key_ranges = {sel.key_ranges} does not divide the block size {bs}: the plugin "
                  "refuses this at start-up; choose a divisor of --block-size (or 1)", file=sys.stderr)
            return 1
    if batches and any(mine > stock > 0 for stock, mine in batches):
        # The batch the longest prompt here allows stock vLLM: the cap that keeps its latency.
        least, most = min(s for s, _ in batches), max(s for s, _ in batches)
        stock = str(most) if least == most else f"{least}-{most}"
        print(f"\nLatency: with kvsieve up to {max(m for _, m in batches)} requests run at once where stock vLLM runs "
              f"{stock}. Throughput rises, and so does the time per output token: each running request gets one token "
              "per step, and more of the steps also carry other requests' prefill chunks. To keep time per output "
              "token near stock's, cap the batch at stock's for your usual prompt length (--max-num-seqs, the "
              f"'batch ... stock' column: {stock} here); kvsieve then saves KV space and KV reads rather than adding "
              "batch slots (bench/README.md, \"Latency at stock's: capping the batch\").")
    print("\nPer request (vllm_xargs): {\"kvsieve\": \"off\"}, {\"kvsieve_budget_ratio\": R} or "
          "{\"kvsieve_budget_tokens\": N}, within the config's [requests] bounds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
