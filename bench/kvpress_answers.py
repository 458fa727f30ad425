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
  its answer decodes. bench/tests/test_accuracy.py checks both ways give the same tokens.
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
            for job, _, cache, masks in list(active):
                for layer, m in zip(layers, masks):
                    layer.masked_key_indices = m
                toks = decode(model, cache, first, len(prompt), job["max_tokens"], eos)
                for layer in layers:
                    layer.masked_key_indices = None
                out.setdefault(job["run"], []).append({"id": job["id"], "tokens": toks})
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
