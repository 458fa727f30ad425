"""Decode SnapKV scores carried from one decode event to the next (`[decode] carry`).

A decode event scores with the queries of the last `window` generated tokens only, so a token
that mattered to the text a few windows back ranks as if it never had. With `carry` G > 0, a
token the last decode event kept ranks by max(its score now, G x the score it was ranked by
then): what earlier windows attended to fades by G per event instead of vanishing.

The state is, per request and layer, the ranking scores of the tokens that event kept, float32
[kv_heads, kept] on the cache's device, column j for the j-th kept token of each head. Compaction
packs each head's kept tokens, in position order, right after the protected prefix, so at the
next event column j is cached position `protected + j`. New tokens (generated since) carry
nothing. The state lives only while the KV it describes does: a request that recomputes
(preempted, torn) or whose event failed starts again without it.
"""

from __future__ import annotations


def bytes_per_request(layers: int, kv_heads: int, kept: int) -> int:
    """The most a request's carried scores hold: float32 per layer, KV head and kept token."""
    return layers * kv_heads * kept * 4


def fold(scores, prior, start: int, gamma: float) -> None:
    """Rank by the carried scores: `scores` [heads, cached] float32, in place, at positions
    [start, start + prior.shape[1]) becomes max(score, gamma x prior). ValueError when `prior`
    does not fit (a different head count, or more carried tokens than the cache holds there)."""
    import torch

    heads, cached = scores.shape
    if prior.shape[0] != heads or start + prior.shape[1] > cached:
        raise ValueError(f"carried scores {tuple(prior.shape)} do not fit a cache of {heads} heads x {cached} "
                         f"tokens from position {start}")
    view = scores[:, start:start + prior.shape[1]]
    torch.maximum(view, prior * gamma, out=view)


def kept_scores(scores, keep):
    """What the next event carries: the ranking scores [heads, cached] at the kept positions
    `keep` [heads, selected] (ascending per head), as a new [heads, selected] tensor."""
    return scores.gather(1, keep.long())
