"""The offline selection rules of bench/selection_sweep.py against brute force: the figures it
writes (which rule finds which needle) rest on these scores."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import selection_sweep as sweep  # noqa: E402  (bench/ is on sys.path, conftest.py)

BLOCK = 8


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(6, 16, generator=g)  # 6 query heads over 2 KV heads
    k = torch.randn(2, 5 * BLOCK + 3, 16, generator=g)  # a partial last block
    return q, k


def brute_logits(q, k):
    h, n, d = k.shape
    return torch.stack([q[i] @ k[i // (q.shape[0] // h)].T for i in range(q.shape[0])]) / math.sqrt(d)


def test_spread_one_is_an_upper_bound_of_every_key_in_the_block(qk):
    q, k = qk
    bound = sweep.block_scores(q, k, BLOCK, 1.0)
    best = sweep.oracle_scores(q, k, BLOCK, "max") * math.sqrt(k.shape[2])  # unscaled q.k
    assert bound.shape == best.shape == (math.ceil(k.shape[1] / BLOCK),)
    assert torch.all(bound >= best - 1e-4)
    assert torch.any(sweep.block_scores(q, k, BLOCK, 0.0) < best)  # spread 0 is no bound


def test_oracles_equal_brute_force(qk):
    q, k = qk
    logits = brute_logits(q, k)
    nb = math.ceil(k.shape[1] / BLOCK)
    parts = [slice(b * BLOCK, min((b + 1) * BLOCK, k.shape[1])) for b in range(nb)]
    want_max = torch.tensor([logits[:, p].max() for p in parts])
    probs = logits.softmax(-1)
    want_mass = torch.tensor([probs[:, p].sum() for p in parts])
    assert torch.allclose(sweep.oracle_scores(q, k, BLOCK, "max"), want_max, atol=1e-5)
    assert torch.allclose(sweep.oracle_scores(q, k, BLOCK, "mass"), want_mass, atol=1e-5)
    assert sweep.oracle_scores(q, k, BLOCK, "mass").sum().item() == pytest.approx(q.shape[0], rel=1e-5)


def test_sub_blocks_score_a_block_by_its_best_part(qk):
    q, k = qk
    assert torch.equal(sweep.sub_block_scores(q, k, BLOCK, BLOCK, 0.5), sweep.block_scores(q, k, BLOCK, 0.5))
    parts = sweep.block_scores(q, k, BLOCK // 4, 0.5)
    got = sweep.sub_block_scores(q, k, BLOCK, BLOCK // 4, 0.5)
    for b in range(got.numel()):
        assert got[b] == parts[4 * b: 4 * b + 4].max()
    # tighter ranges: at spread 1 a block's best part never scores above the whole block's bound
    assert torch.all(sweep.sub_block_scores(q, k, BLOCK, 2, 1.0) <= sweep.block_scores(q, k, BLOCK, 1.0) + 1e-5)


def test_per_head_tables_are_each_kv_heads_own_scores(qk):
    """`--per-head`: one row per KV head, scored over that head's query heads only; the shared
    table is their max (their sum for mass)."""
    q, k = qk
    h = k.shape[0]
    logits = brute_logits(q, k).view(h, -1, k.shape[1])  # [kv heads, group, keys]
    nb = math.ceil(k.shape[1] / BLOCK)
    parts = [slice(b * BLOCK, min((b + 1) * BLOCK, k.shape[1])) for b in range(nb)]
    want = torch.tensor([[logits[i][:, p].max() for p in parts] for i in range(h)])
    assert torch.allclose(sweep.oracle_scores(q, k, BLOCK, "max", per_head=True), want, atol=1e-5)
    mass = sweep.oracle_scores(q, k, BLOCK, "mass", per_head=True)
    assert torch.allclose(mass.sum(0), sweep.oracle_scores(q, k, BLOCK, "mass"), atol=1e-5)
    for spread in (1.0, 0.5):
        per = sweep.block_scores(q, k, BLOCK, spread, per_head=True)
        assert per.shape == (h, nb)
        assert torch.equal(per.amax(0), sweep.block_scores(q, k, BLOCK, spread))
        # each head's row is its own: a head's bound only moves with that head's keys
        k2 = k.clone()
        k2[1] += 3.0
        assert torch.equal(sweep.block_scores(q, k2, BLOCK, spread, per_head=True)[0], per[0])
    sub = sweep.sub_block_scores(q, k, BLOCK, BLOCK // 4, 0.5, per_head=True)
    assert torch.equal(sub.amax(0), sweep.sub_block_scores(q, k, BLOCK, BLOCK // 4, 0.5))
