"""An independent reference for compressed decoding: a plain transformers forward that holds
exactly the kept K/V of each (layer, KV head) at their logical positions.

The prompt runs with full causal attention (as in vLLM's prefill); then each layer's cache is
cut per KV head to the tokens the policy keeps, computed here in torch from the cached keys
(not by kvsieve), and decoding continues with logical RoPE positions. Every head keeps the same
count, so the cut cache stays rectangular; attention over keys ignores their order."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def rotated_queries():
    """Within it, every Llama layer's rotated queries ([Hq, tokens, D], batch 0) are appended, in
    layer order, to the list it yields: recorded from the model's own RoPE call."""
    from transformers.models.llama import modeling_llama

    recorded: list = []
    real = modeling_llama.apply_rotary_pos_emb

    def recording(q, k, *args, **kwargs):
        q2, k2 = real(q, k, *args, **kwargs)
        recorded.append(q2[0].detach().clone())
        return q2, k2

    modeling_llama.apply_rotary_pos_emb = recording
    try:
        yield recorded
    finally:
        modeling_llama.apply_rotary_pos_emb = real


def keep_indices(keys: torch.Tensor, policy: str, selected: int, sink: int, tail: int,
                 protected: int = 0) -> torch.Tensor:
    """[H, selected] kept positions per KV head of keys [H, C, D]: the protected prefix
    [0, protected), positions below `sink` and the last `tail` always, the rest by highest
    score (knorm: -||K||; streaming: recency), ties to the earlier position, ascending.
    `selected` counts the protected prefix."""
    h, c, _ = keys.shape
    sink_end = min(max(sink, protected), c)
    tail_start = max(c - tail, sink_end)
    need = selected - sink_end - (c - tail_start)
    out = []
    for head in range(h):
        middle = torch.arange(sink_end, tail_start)
        if policy == "knorm":
            score = -keys[head, sink_end:tail_start].double().norm(dim=-1)
            # Stable sort on -score keeps the earlier position first among equal scores.
            order = torch.sort(-score, stable=True).indices
            chosen = middle[order[:need]]
        elif policy == "streaming":
            chosen = middle[len(middle) - need:]
        else:
            raise ValueError(policy)
        kept = torch.cat([torch.arange(0, sink_end), chosen, torch.arange(tail_start, c)])
        out.append(torch.sort(kept).values)
    return torch.stack(out)


@torch.no_grad()
def compressed_logprobs(model, prompt: list[int], continuation: list[int], policy: str, selected: int,
                        sink: int, tail: int) -> list[float]:
    """Log-probabilities the reference assigns to `continuation` (greedy tokens from vLLM) after
    a prompt whose cache was cut to `selected` tokens per head."""
    out = model(torch.tensor([prompt]), use_cache=True)
    _cut(out.past_key_values, policy, selected, sink, tail)
    return _continue(model, out, len(prompt), continuation)


def _keep(layer, idx: torch.Tensor) -> None:
    """Cut one layer's cache ([1, H, C, D], RoPE applied) to the positions idx [H, k]."""
    gather = idx[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
    layer.keys = torch.gather(layer.keys, 2, gather).contiguous()
    layer.values = torch.gather(layer.values, 2, gather).contiguous()


def _cut(cache, policy: str, selected: int, sink: int, tail: int, protected: int = 0) -> None:
    for layer in cache.layers:
        _keep(layer, keep_indices(layer.keys[0], policy, selected, sink, tail, protected))


def _continue(model, prefill, pos: int, continuation: list[int]) -> list[float]:
    """Log-probabilities of `continuation` given the prompt's forward `prefill` (its cache as cut):
    the first from the prompt's last logits, the rest decoded one token at a time at logical
    positions from `pos`."""
    cache = prefill.past_key_values
    logprobs = [torch.log_softmax(prefill.logits[0, -1].double(), -1)[continuation[0]].item()]
    for j in range(len(continuation) - 1):
        step = model(torch.tensor([[continuation[j]]]), position_ids=torch.tensor([[pos + j]]),
                     past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        logprobs.append(torch.log_softmax(step.logits[0, -1].double(), -1)[continuation[j + 1]].item())
    return logprobs


@torch.no_grad()
def evicting_logprobs(model, prompt: list[int], continuation: list[int], plan, phases: dict,
                      protected: int = 0) -> tuple[list[float], int]:
    """Like `compressed_logprobs`, with events wherever `plan(logical, cached, phase)` (the
    library's count, from lengths alone) releases blocks: after the prompt (phase 0) and after
    each decoded token (phase 1). `phases[phase] = (policy, sink, tail)` is the selection rule.
    `protected` leading tokens are never evicted (prefix-cache sharing).
    Returns the log-probabilities of `continuation` and the number of events."""
    out = model(torch.tensor([prompt]), use_cache=True)
    cache, events = out.past_key_values, 0
    logprobs = [torch.log_softmax(out.logits[0, -1].double(), -1)[continuation[0]].item()]
    logical = cached = len(prompt)

    def event(phase: int) -> None:
        nonlocal cached, events
        p = plan(logical, cached, phase, protected)
        if p.released_blocks:
            policy, sink, tail = phases[phase]
            _cut(cache, policy, int(p.kept_tokens), sink, tail, protected)
            cached, events = int(p.kept_tokens), events + 1

    event(0)
    for j in range(len(continuation) - 1):
        step = model(torch.tensor([[continuation[j]]]), position_ids=torch.tensor([[logical]]),
                     past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        logical, cached = logical + 1, cached + 1
        logprobs.append(torch.log_softmax(step.logits[0, -1].double(), -1)[continuation[j + 1]].item())
        if 1 in phases:
            event(1)
    return logprobs, events


def snapkv_scores(keys: torch.Tensor, queries: torch.Tensor, pool_kernel: int) -> torch.Tensor:
    """SnapKV scores [H, C] from the definition: keys [H, C, D] and the window's queries
    [Hq, W, D] (query i at position C - W + i, causal), softmax per query, summed over the window
    and the query heads of each KV head's group, max-pooled over the tokens before the window."""
    h, c, d = keys.shape
    hq, w, _ = queries.shape
    group = hq // h
    k = keys.double().repeat_interleave(group, dim=0)  # [Hq, C, D]
    logits = torch.einsum("hwd,hcd->hwc", queries.double(), k) / d ** 0.5
    visible = torch.arange(c)[None, :] <= (c - w + torch.arange(w))[:, None]
    probs = logits.masked_fill(~visible[None], float("-inf")).softmax(-1)
    acc = probs.sum(1).view(h, group, c).sum(1)  # [H, C]
    n = c - w
    pooled = torch.nn.functional.max_pool1d(acc[None, :, :n], pool_kernel, stride=1, padding=pool_kernel // 2)[0]
    return torch.cat([pooled, acc[:, n:]], dim=1)


def keep_by_scores(scores: torch.Tensor, selected: int, sink: int, tail: int, protected: int = 0) -> torch.Tensor:
    """[H, selected] kept positions: [0, max(sink, protected)), the last `tail`, and the top
    scores of the rest (ties to the earlier position), ascending."""
    h, c = scores.shape
    sink_end = min(max(sink, protected), c)
    tail_start = max(c - tail, sink_end)
    need = selected - sink_end - (c - tail_start)
    out = []
    for head in range(h):
        middle = torch.arange(sink_end, tail_start)
        order = torch.sort(-scores[head, sink_end:tail_start], stable=True).indices
        kept = torch.cat([torch.arange(0, sink_end), middle[order[:need]], torch.arange(tail_start, c)])
        out.append(torch.sort(kept).values)
    return torch.stack(out)


@torch.no_grad()
def snapkv_logprobs(model, prompt: list[int], continuation: list[int], selected: int, sink: int, tail: int,
                    window: int, pool_kernel: int) -> list[float]:
    """compressed_logprobs for SnapKV: the prompt's rotated queries are recorded from the
    model's own RoPE call, the last `window` of them score each layer's keys."""
    with rotated_queries() as recorded:
        out = model(torch.tensor([prompt]), use_cache=True)
    assert len(recorded) == len(out.past_key_values.layers)
    for layer, q in zip(out.past_key_values.layers, recorded):
        q = q[:, -window:]  # [Hq, W, D]
        _keep(layer, keep_by_scores(snapkv_scores(layer.keys[0], q, pool_kernel), selected, sink, tail))
    return _continue(model, out, len(prompt), continuation)


@torch.no_grad()
def replay_logprobs(model, prompt: list[int], continuation: list[int], timeline: list, phases: dict,
                    pool_kernel: int = 0) -> list[float]:
    """Log-probabilities of `continuation` under the exact history kvsieve reports for a request
    (`timeline`, in order):
    - `["event", logical_len, phase, kept_tokens, protected, window_start]`: once the sequence
      has `logical_len` tokens computed, every layer's cache is cut to `kept_tokens` per head
      with `phases[phase] = (policy, sink, tail[, carry[, pool]])`; SnapKV scores with the rotated queries of
      positions [window_start, logical_len) (`pool` wide, else `pool_kernel`), computed by one forward (the
      prompt's) or by several (decode steps: the generated tokens' queries). Events of phase 2 (between
      prefill chunks) split the prompt: the tokens after one attend to what it kept.
    - `["recompute", length]`: a preemption of a request with `length` tokens (prompt and output
      so far; all but the last computed): the cache is dropped and the `length` tokens computed
      again from scratch, with the events that follow it.
    Decode SnapKV with `carry` G > 0 (`[decode] carry`): each token the last decode event kept
    ranks by max(its score, G x the score it was ranked by then); a recompute forgets them. The
    cache keeps its protected prefix first, so position p of the next event is column p here,
    as it is column p - protected of the engine's (which carries the selected tokens only).
    Prompt (and recompute) tokens are computed in one forward per piece, decoded tokens one at
    a time at their logical positions. A token's log-probability comes from the first forward
    that computed its predecessor (vLLM samples it then; a recompute only rebuilds the KV)."""
    tokens = list(prompt) + list(continuation)
    first, last = len(prompt) - 1, len(tokens) - 2
    got: dict[int, float] = {}
    cache, pos, dense_until = None, 0, len(prompt)
    # Each position's rotated queries per layer ([Hq, D]) from the last forward that computed it
    # (a recompute replaces them, as it rebuilds the engine's windows).
    history: dict[int, list] = {}
    carried: dict[int, torch.Tensor] = {}  # layer -> [H, kept] scores the last decode event ranked by

    def forward(end: int) -> None:
        nonlocal cache, pos
        while pos < end:
            stop = end if pos < dense_until else pos + 1
            stop = min(stop, max(dense_until, pos + 1))
            held = cache.get_seq_length() if cache is not None else 0
            with rotated_queries() as recorded:
                # Logical positions for RoPE; the causal mask over the cache as held.
                out = model(torch.tensor([tokens[pos:stop]]), position_ids=torch.arange(pos, stop)[None],
                            cache_position=torch.arange(held, held + stop - pos), past_key_values=cache,
                            use_cache=True)
            for i in range(pos, stop):
                if first <= i <= last and i not in got:
                    got[i] = torch.log_softmax(out.logits[0, i - pos].double(), -1)[tokens[i + 1]].item()
                history[i] = [q[:, i - pos] for q in recorded]
            cache, pos = out.past_key_values, stop

    for entry in timeline:
        if entry[0] == "recompute":
            # Preempted with `length` tokens, all but the last computed (the last was sampled).
            forward(entry[1] - 1)
            cache, pos, dense_until = None, 0, entry[1]
            carried.clear()
            continue
        _, length, phase, kept, protected = entry[:5]
        forward(length)
        policy, sink, tail, *rest = phases[phase]
        gamma = rest[0] if rest and phase == 1 else 0.0
        pool = rest[1] if len(rest) > 1 else pool_kernel
        if policy == "snapkv":
            start = entry[5]
            for i, layer in enumerate(cache.layers):
                q = torch.stack([history[p][i] for p in range(start, length)], dim=1)  # [Hq, W, D]
                scores = snapkv_scores(layer.keys[0], q, pool)
                if gamma and i in carried:
                    n = carried[i].shape[1]  # the tokens kept last time lead the cache
                    scores[:, :n] = torch.maximum(scores[:, :n], gamma * carried[i])
                keep = keep_by_scores(scores, kept, sink, tail, protected)
                if gamma:
                    carried[i] = scores.gather(1, keep)
                _keep(layer, keep)
        else:
            _cut(cache, policy, kept, sink, tail, protected)
    forward(len(tokens) - 1)
    return [got[i] for i in range(first, last + 1)]


def quest_scores(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spread: float) -> torch.Tensor:
    """Quest's per-head block scores [kv heads, group, blocks] of queries q [kv heads, group, D]
    against the blocks' key ranges lo, hi [kv heads, blocks, D]: sum_d q_d * c_d + spread *
    |q_d| * w_d, c and w the range's centre and half-width (at spread 1, sum_d max(q_d * lo_d,
    q_d * hi_d), the upper bound of q.k over the block)."""
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    return (q[:, :, None] * centre[:, None] + spread * q[:, :, None].abs() * half[:, None]).sum(-1)


@torch.no_grad()
def selected_logprobs(model, prompt: list[int], continuation: list[int], kept: dict, block_size: int,
                      spread: float = 1.0, ranks: int | None = None, keep: int = 0, dense_layers: int = 0,
                      margins: list | None = None, key_ranges: int = 1):
    """Block selection's reference (`model` loaded with attn_implementation="eager"): the prompt
    runs dense, then each decode step attends, in layer `i`, only to the blocks `kept[(L, i)]`
    (logical block indices; absent: every block) of the `L` tokens the step's query sees.
    Masked, not gathered: the other positions get -inf before the softmax.

    With `ranks` set, the reference selects by itself, as tensor parallelism does: the KV heads
    split into `ranks` contiguous shards, and each shard's heads (and their query heads) attend
    to the `keep` blocks its own scores rank highest (the first and last always) in every layer
    from `dense_layers` on, when the sequence has more than `keep` blocks; `margins`, when given,
    receives each such choice's gap between the last block kept and the best block dropped.

    Returns the log-probabilities of `continuation` and, per (L, layer), Quest's score of every
    block computed here from the reference's own rotated keys and query: max over query heads of
    sum_d (q_d * c_d + spread * |q_d| * w_d), c and w the centre and half-width of the block's
    keys' range per channel (float64; at spread 1, sum_d max(q_d * min_d, q_d * max_d)); with
    `key_ranges` R, a block's ranges are per block_size / R tokens and it scores as its best."""
    import math

    from transformers.models.llama import modeling_llama

    real = modeling_llama.eager_attention_forward
    bounds: dict = {}

    def attention(module, query, key, value, attention_mask, scaling, **kwargs):
        L = key.shape[2]
        if query.shape[2] == 1 and L > len(prompt):  # a decode step
            layer, bs = module.layer_idx, block_size
            k = key[0].double()  # [kv heads, L, D]
            nb = math.ceil(L / bs)
            span = bs // key_ranges
            parts = math.ceil(L / span)
            kmin = torch.stack([k[:, p * span:min((p + 1) * span, L)].amin(1) for p in range(parts)], 1)
            kmax = torch.stack([k[:, p * span:min((p + 1) * span, L)].amax(1) for p in range(parts)], 1)
            q = query[0, :, 0].double().view(k.shape[0], -1, k.shape[2])  # [kv heads, group, D]
            per_part = quest_scores(q, kmin, kmax, spread)  # [kv heads, group, parts]: a block's best part
            per_part = torch.nn.functional.pad(per_part, (0, nb * key_ranges - parts), value=float("-inf"))
            per_head = per_part.unflatten(-1, (nb, key_ranges)).amax(-1)
            bounds[(L, layer)] = per_head.amax((0, 1))
            allow = None  # [query heads or 1, L]
            if ranks and layer >= dense_layers and nb > keep:
                assert q.shape[0] % ranks == 0, "each rank holds its own KV heads (none replicated)"
                group, per_rank = q.shape[1], q.shape[0] // ranks
                allow = torch.zeros(q.shape[0] * group, L, dtype=torch.bool)
                for r in range(ranks):
                    score = per_head[r * per_rank:(r + 1) * per_rank].amax((0, 1))
                    if margins is not None:
                        top = score[1:-1].sort(descending=True).values
                        margins.append(float(top[keep - 3] - top[keep - 2]))  # keep - 2 middle blocks
                    score[0] = score[-1] = float("inf")
                    heads = slice(r * per_rank * group, (r + 1) * per_rank * group)  # its query heads
                    for b in score.topk(keep).indices.tolist():
                        allow[heads, b * bs:(b + 1) * bs] = True
            elif kept.get((L, layer)) is not None:
                allow = torch.zeros(1, L, dtype=torch.bool)
                for b in kept[(L, layer)]:
                    allow[:, b * bs:(b + 1) * bs] = True
            if allow is not None:
                extra = torch.where(allow, 0.0, float("-inf")).to(query.dtype)[None, :, None, :]
                attention_mask = extra if attention_mask is None else attention_mask + extra
        return real(module, query, key, value, attention_mask, scaling, **kwargs)

    modeling_llama.eager_attention_forward = attention
    try:
        out = model(torch.tensor([prompt]), use_cache=True)
        logprobs = _continue(model, out, len(prompt), continuation)
    finally:
        modeling_llama.eager_attention_forward = real
    return logprobs, bounds
