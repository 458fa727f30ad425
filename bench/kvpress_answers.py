"""kvpress's greedy answers to prompts, each compressed by a press to a given kept count, on HF
transformers. Run as a child of bench/accuracy.py (its stdin is a JSON spec, its result one
`RESULT{json}` line), with kvpress's site dir on PYTHONPATH.

Two ways to the same answers:
- `direct`: kvpress's own path, one prefill per press inside the press's context manager.
- `shared` (the suite's): one prefill per prompt serves every press. A press compresses a
  layer's cache after that layer's attention ran on the whole prompt, so the prefill's hidden
  states do not depend on the press, and each press's `compress()` can run on the same keys and
  values into its own cache: what kvpress's forward hook does, once per press. AdaKV masks
  rather than prunes: its per-layer masks are kept and put back on the attention modules while
  its answer decodes. Presses whose caches have the same length in every layer (pruning presses
  at one kept count) decode their answers as one batch: a decode step of this small model costs
  about the same for 6 rows as for 1 on CPU, and the suite has 7 presses per prompt and budget.
  bench/tests/test_accuracy.py checks both ways give the same tokens.
"""

import json
import sys

import kvpress
import torch
from kvpress.presses.base_press import is_prefilling
from kvpress.utils import extract_keys_and_values
from transformers import DynamicCache, LlamaForCausalLM

PRESSES = {
    "snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
    "knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
    "streaming": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
    "expected_attention": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
    "keydiff": lambda r: kvpress.KeyDiffPress(compression_ratio=r),
    "tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
    "adakv_snapkv": lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)),
    # SnapKV with kvsieve's window and pool width (kvpress pools by average and has no sink or
    # recent window to keep): the like-for-like comparison of the held-out split.
    "snapkv_w32_k31": lambda r: kvpress.SnapKVPress(compression_ratio=r, window_size=32, kernel_size=31),
}


def press_for(job: dict, prompt_len: int):
    """The job's press at the ratio that keeps `kept` tokens (kvpress keeps int(n * (1 - ratio)));
    None when kvsieve kept the whole prompt (under its min_length)."""
    if job["kept"] is None or job["kept"] >= prompt_len:
        return None
    return PRESSES[job["press"]]((prompt_len - job["kept"] - 0.5) / prompt_len)


def decode(model, cache, logits, pos: int, max_tokens: int, eos: int) -> list[int]:
    toks = []
    for _ in range(max_tokens):
        t = int(logits.argmax())
        toks.append(t)
        if t == eos:
            break
        step = model(torch.tensor([[t]]), position_ids=torch.tensor([[pos]]), past_key_values=cache, use_cache=True)
        logits, pos = step.logits[0, -1], pos + 1
    return toks


def decode_batch(model, caches: list, logits, pos: int, limits: list[int], eos: int) -> list[list[int]]:
    """`decode` for several caches of equal length off the same prompt: one row each, stacked on
    the batch axis; a row stops at its own EOS or limit (later steps still run it, unread)."""
    n = len(caches)
    if n == 1:
        return [decode(model, caches[0], logits, pos, limits[0], eos)]
    cache = DynamicCache()
    for i in range(len(caches[0].layers)):
        ks = [c.layers[i].keys for c in caches]
        vs = [c.layers[i].values for c in caches]
        cache.update(torch.cat(ks), torch.cat(vs), i)
    toks: list[list[int]] = [[] for _ in range(n)]
    live = [True] * n
    step_logits = logits.expand(n, -1)
    for _ in range(max(limits)):
        nxt = step_logits.argmax(-1).tolist()
        for r, t in enumerate(nxt):
            if live[r]:
                toks[r].append(t)
                live[r] = t != eos and len(toks[r]) < limits[r]
        if not any(live):
            break
        step = model(torch.tensor(nxt).view(n, 1), position_ids=torch.full((n, 1), pos), past_key_values=cache,
                     use_cache=True)
        step_logits, pos = step.logits[:, -1], pos + 1
    return toks


def direct(model, jobs: list[dict], eos: int) -> dict:
    out = {}
    for job in jobs:
        prompt, cache = job["prompt"], DynamicCache()
        press = press_for(job, len(prompt))
        with torch.no_grad():
            if press is None:
                o = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
            else:
                with press(model):
                    o = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
            toks = decode(model, cache, o.logits[0, -1], len(prompt), job["max_tokens"], eos)
        out.setdefault(job["run"], []).append({"id": job["id"], "tokens": toks})
    return out


def shared(model, jobs: list[dict], eos: int) -> dict:
    layers = [layer.self_attn for layer in model.model.layers]
    active = []  # (job, press, cache, masks) for the prompt being prefilled

    def hook(module, args, kwargs, output):
        hs = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hs.shape[1]):
            return output
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for _, press, cache, masks in active:
            k, v = (keys, values) if press is None else press.compress(module, hs, keys, values, output[1], kwargs)
            masks.append(getattr(module, "masked_key_indices", None))
            module.masked_key_indices = None
            cache.update(k.contiguous(), v.contiguous(), module.layer_idx)
        return output

    for layer in layers:
        layer.rotary_emb = model.model.rotary_emb  # as kvpress's press context does (ExpectedAttention reads it)
        layer.register_forward_hook(hook, with_kwargs=True)
    by_prompt: dict[str, list] = {}
    for job in jobs:
        by_prompt.setdefault(job["id"], []).append(job)
    out = {}
    for sid, group in by_prompt.items():
        prompt = group[0]["prompt"]
        active.clear()
        for job in group:
            press = press_for(job, len(prompt))
            if press is not None:
                press.post_init_from_model(model)
            active.append((job, press, DynamicCache(), []))
        with torch.no_grad():
            first = model(torch.tensor([prompt]), past_key_values=DynamicCache(), use_cache=True).logits[0, -1]
            batches: dict = {}  # same per-layer lengths and no masks -> one batch; masking presses alone
            for i, (job, _, cache, masks) in enumerate(active):
                masked = any(m is not None for m in masks)
                key = ("masked", i) if masked else tuple(layer.keys.shape[-2] for layer in cache.layers)
                batches.setdefault(key, []).append((job, cache, masks))
            for rows in batches.values():
                for layer, m in zip(layers, rows[0][2]):
                    layer.masked_key_indices = m
                toks = decode_batch(model, [c for _, c, _ in rows], first, len(prompt),
                                    [j["max_tokens"] for j, _, _ in rows], eos)
                for layer in layers:
                    layer.masked_key_indices = None
                for (job, _, _), t in zip(rows, toks):
                    out.setdefault(job["run"], []).append({"id": job["id"], "tokens": t})
        active.clear()
        print(f"[accuracy] kvpress {sid}: {len(group)} presses", file=sys.stderr, flush=True)
    return out


def main() -> None:
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec.get("threads", 2))
    model = LlamaForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32).eval()
    run = shared if spec.get("mode", "shared") == "shared" else direct
    print("RESULT" + json.dumps(run(model, spec["jobs"], spec["eos"])))


if __name__ == "__main__":
    main()
