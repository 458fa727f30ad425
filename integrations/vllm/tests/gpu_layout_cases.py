"""Checks of the GPU backends' layout (`kvsieve_vllm.backends.flash_layout`) that run on any
torch device: the CPU tests (`test_gpu_layouts.py`) and, on a GPU machine that may have PyTorch
but no vLLM and no pytest, `scripts/torch_adapter_check.py`. Each check raises AssertionError or KvsieveError.

Caches come from vLLM's own allocation code (`create_kv_cache_views`, every `KVCacheLayout`)
where vLLM is installed, else from the two orders FlashInfer names (NHD `[blocks, tokens,
heads, C]`, HND `[blocks, heads, tokens, C]`) permuted to vLLM's logical `[blocks, heads,
tokens, 2 * head_size]` view. Writes use vLLM's `reshape_and_cache_flash` where its CUDA op is
available, else that op's indexing in torch (`write_like_vllm`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from kvsieve_vllm.backends import flash_layout
from kvsieve_vllm.layout import verify_flash_layout
from kvsieve_vllm.lib import DEVICE, CpuKernels, CudaKernels, KvsieveError, Sequence, TokenSelect, load
from reference import quest_scores

BS, HEADS, HEAD, BLOCKS, LAYERS = 16, 2, 64, 12, 2


def layouts() -> list[str]:
    """Names of the physical orders to check: vLLM's KVCacheLayout members, or NHD and HND."""
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout

        return [x.name for x in KVCacheLayout]
    except ImportError:
        return ["NHD", "HND"]


def make_caches(layout: str, dtype, device="cpu", heads=HEADS, head=HEAD, blocks=BLOCKS, layers=LAYERS) -> list:
    """Per-layer caches in physical order `layout`, as vLLM's model runner allocates them."""
    import torch

    if layout in ("NHD", "HND"):
        order = (0, 2, 1, 3) if layout == "NHD" else (0, 1, 2, 3)  # physical axes of [B, H, N, C]
        logical = (blocks, heads, BS, 2 * head)
        out = []
        for _ in range(layers):
            phys = torch.zeros([logical[i] for i in order], dtype=dtype, device=device)
            out.append(phys.permute(*[order.index(i) for i in range(4)]))
        return out
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheTensor, compute_layout_strides,
                                            create_kv_cache_views)
    from vllm.v1.kv_cache_layout import KVCacheLayout

    spec = FullAttentionSpec(block_size=BS, num_kv_heads=heads, head_size=head, dtype=dtype)
    strides = compute_layout_strides(spec, blocks, layers, KVCacheLayout[layout])
    shape = (layers, blocks, heads, BS, 2 * head * torch.finfo(dtype).bits // 8)
    size = max(s * n for s, n in zip(strides, shape))
    tensor = KVCacheTensor(size=size, layers=[f"layer.{i}" for i in range(layers)], layer_stride=strides[0],
                           block_stride=strides[1])
    raw = torch.zeros(size, dtype=torch.int8, device=device)
    return create_kv_cache_views(raw, spec, blocks, KVCacheLayout[layout], tensor)


def write_like_vllm(key, value, k_view, v_view, slot_mapping) -> None:
    """`reshape_and_cache_flash`'s effect: key/value [tokens, heads, head_size] to their slots."""
    bs = k_view.shape[1]
    b, t = slot_mapping // bs, slot_mapping % bs
    k_view[b, t] = key
    v_view[b, t] = value


def writer(device: str):
    """vLLM's own cache-write op on a GPU where vLLM is installed, else `write_like_vllm`;
    returns (write, name)."""
    if device != "cpu":
        try:
            return flash_layout.vllm_writer("FLASH_ATTN"), "vllm reshape_and_cache_flash"
        except ImportError:
            pass
    return write_like_vllm, "torch indexing (reshape_and_cache_flash semantics)"


def kernels_for(device: str):
    lib = load()
    return CpuKernels(lib) if device == "cpu" else CudaKernels(lib, 0, 0)


def check_self_check(layout: str, dtype, device="cpu") -> str:
    """The self-check accepts the layout; the descriptor is vLLM's own K/V views."""
    cache = make_caches(layout, dtype, device)[1]
    write, how = writer(device)
    verify_flash_layout(load(), cache, HEAD, write)
    d = flash_layout.describe(cache, HEAD)
    k, v = flash_layout.views(cache, HEAD)
    assert (d.k, d.v) == (k.data_ptr(), v.data_ptr()) and d.device == DEVICE[cache.device.type]
    assert (d.block_stride, d.token_stride, d.head_stride) == k.stride()[:3], (d.block_stride, k.stride())
    return how


def _fill(cache, rows, lengths, seed: int, write):
    """Random K/V per sequence written slot by slot; logical K, V [heads, tokens, head_size]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    k_view, v_view = flash_layout.views(cache, HEAD)
    out = []
    for row, n in zip(rows, lengths):
        key = torch.randn(n, HEADS, HEAD, generator=g).to(cache.dtype).to(cache.device)
        value = torch.randn(n, HEADS, HEAD, generator=g).to(cache.dtype).to(cache.device)
        slots = torch.tensor([row[t // BS] * BS + t % BS for t in range(n)], device=cache.device)
        write(key, value, k_view, v_view, slots)
        out.append((key.transpose(0, 1).clone(), value.transpose(0, 1).clone()))
    return out


def _read(cache, row, n: int):
    """Logical K, V [heads, n, head_size] of the first n positions of a row (vLLM's views)."""
    import torch

    k_view, v_view = flash_layout.views(cache, HEAD)
    idx = torch.tensor(row, device=cache.device)[torch.arange(n, device=cache.device) // BS]
    slot = torch.arange(n, device=cache.device) % BS
    return k_view[idx, slot].transpose(0, 1), v_view[idx, slot].transpose(0, 1)


def knorm_keep(key, k: int, sink: int, tail: int):
    """The `k` positions knorm keeps of one head's keys [n, head_size], ascending: the sinks, the
    tail, and the lowest key norms between them (ties to the earlier position)."""
    import torch

    n = key.shape[0]
    norms = key[sink:n - tail].double().norm(dim=-1).cpu()
    top = torch.sort(norms, stable=True).indices[:k - sink - tail] + sink
    return torch.cat([torch.arange(sink), torch.sort(top).values, torch.arange(n - tail, n)])


def check_knorm_compaction(layout: str, into: bool, device="cpu", dtype=None) -> None:
    """Two layers; one 70-token sequence in a scattered row keeps 24 per head by key norm (sink
    4, last 8): keep lists equal torch's ranking (lowest norms kept), and after compaction each
    head's first 24 positions hold exactly its kept K and V, bitwise; another sequence's blocks
    are untouched. In place, or into fresh blocks (the row then only read)."""
    import torch

    dtype = dtype or torch.bfloat16
    lib, kernels = load(), kernels_for(device)
    write, _ = writer(device)
    caches = make_caches(layout, dtype, device)
    row, other, n, k, sink, tail = [7, 2, 9, 4, 11], [5, 6], 70, 24, 4, 8
    dest = [0, 1] if into else None
    params = lib.config_from_str('[sparsity]\npolicy = "knorm"\nbudget_tokens = 24\nsink_tokens = 4\n'
                                 'recent_tokens = 8\n').params()
    for layer, cache in enumerate(caches):
        (key, value), (okey, ovalue) = _fill(cache, [row, other], [n, 20], layer, write)
        desc = flash_layout.describe(cache, HEAD)
        rows = torch.tensor(row, dtype=torch.int32, device=device)
        seq = Sequence(row=rows.data_ptr(), row_len=len(row), cached_len=n, protected_len=0)
        sel = TokenSelect(cached_len=n, protected_len=0, sink_tokens=sink, protected_tail=tail, selected=k)
        scores = torch.zeros(HEADS * n, dtype=torch.float32, device=device)
        keep = torch.zeros(HEADS * k, dtype=torch.int32, device=device)
        kernels.select(desc, seq, "knorm", params, sel, None, scores, keep)
        if device != "cpu":
            kernels.synchronize()
        keep = keep.view(HEADS, k)
        for h in range(HEADS):
            want = knorm_keep(key[h], k, sink, tail)
            assert torch.equal(keep[h].long().cpu(), want), (layout, layer, h, keep[h].tolist(), want.tolist())
        if into:
            d = torch.tensor(dest, dtype=torch.int32, device=device)
            kernels.compact_into(desc, seq, keep.data_ptr(), keep.numel(), k, d.data_ptr(), len(dest))
            if device != "cpu":
                kernels.synchronize()
            got_k, got_v = _read(cache, dest, k)
            assert all(torch.equal(a, b) for a, b in zip(_read(cache, row, n), (key, value))), "row written"
        else:
            released = torch.zeros(len(row), dtype=torch.int32, device=device)
            got = kernels.compact(desc, seq, keep.data_ptr(), keep.numel(), k, released.data_ptr(), released.numel())
            assert got == len(row) - math.ceil(k / BS), got
            got_k, got_v = _read(cache, row, k)
        for h in range(HEADS):
            idx = keep[h].long()
            assert torch.equal(got_k[h], key[h, idx]) and torch.equal(got_v[h], value[h, idx]), (layout, layer, h)
        assert all(torch.equal(a, b) for a, b in zip(_read(cache, other, 20), (okey, ovalue))), "other blocks"


def check_window_hook(device="cpu") -> None:
    """The window hook on a GPU backend's forward copies the asked rows of the query into the
    window's float32 buffer, taken before the forward on the query's own device (the forward
    allocates nothing); a layer whose forward never ran the hook leaves the window unusable."""
    from types import SimpleNamespace

    import torch

    from kvsieve_vllm import capture

    calls = []
    hooked = flash_layout.wrap_forward(lambda self, layer, query, *a, **kw: calls.append(query.shape) or "out")
    names = ["model.layers.0.attn", "model.layers.1.attn"]
    w = capture.Windows(2, 4, HEAD, torch.device(device))
    w.name_layers(names)
    w.reserve(32)
    w.reserve(32)  # profile_run, then initialize_kv_cache: still one buffer
    assert len(w.pool) == 1
    pooled = w.pool[0]
    window = w._new("r", 100, 132)
    assert window.buf is pooled and not w.pool, "the window takes the buffer reserved up front"
    window.lo, window.hi = 112, 132
    w.rows = [(window, 5, 20, 12)]  # batch rows 5..24 are window positions 112..131
    query = torch.randn(40, 4, HEAD, dtype=torch.bfloat16, device=device)
    capture.ACTIVE = w
    try:
        assert hooked(None, SimpleNamespace(layer_name=names[0]), query) == "out"
    finally:
        capture.ACTIVE = None
    buf = window.buf[0]
    assert buf.device == query.device and buf.dtype == torch.float32 and tuple(buf.shape) == (32, 4, HEAD)
    partial = w._new("p", 200, 210)  # a partial window (a short chunk) gets a full-capacity buffer
    assert partial.buf.shape[1] == 32
    w.forget(["p"])
    assert torch.equal(buf[12:32], query[5:25].float()) and calls == [query.shape]
    try:
        w.queries("r", 112, 132, names)
        raise AssertionError("a window missing layer 1's rows was used")
    except ValueError as e:
        assert "did not run the hook" in str(e), e
    got = w.queries("r", 112, 132, names[:1])[names[0]]
    assert got.is_contiguous() and torch.equal(got, query[5:25].float())
    w.forget(["r"])
    assert any(b is pooled for b in w.pool), "a finished window's buffer goes back to the pool"


class CountingKernels:
    """The kernels handle with its synchronize calls counted (the worker's host syncs)."""

    def __init__(self, inner) -> None:
        self.inner, self.syncs = inner, 0

    def synchronize(self) -> None:
        self.syncs += 1
        self.inner.synchronize()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class DeferredErrors(CountingKernels):
    """CPU kernels that report failures as the CUDA backend does: a failing call writes nothing
    and returns, the calls after it run, and the next synchronize raises naming each one."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.failed: list[str] = []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except KvsieveError as e:
                self.failed.append(f"{name}: {e.message}")

        return call

    def synchronize(self) -> None:
        self.syncs += 1
        failed, self.failed = self.failed, []
        if failed:
            raise KvsieveError("KVS_STATUS_INVALID_ARGUMENT", "; ".join(failed))


@contextmanager
def kvsieve_settings(toml: str):
    """kvsieve's process settings from config text for the block, then the ones before it (an
    engine of the same test process keeps its own)."""
    import os
    import tempfile

    from kvsieve_vllm import settings as settings_mod

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(toml)
    before = settings_mod._settings
    try:
        settings_mod.install(settings_mod.Settings(f.name))
        yield settings_mod.settings()
    finally:
        os.unlink(f.name)
        settings_mod.install(before)


KNORM = ('[sparsity]\npolicy = "knorm"\nbudget_tokens = 24\nsink_tokens = 4\nrecent_tokens = 8\n'
         'min_length = 0\n')


def check_worker_events(layout: str, into: bool, device="cpu", dtype=None, deferred: bool = False) -> None:
    """The worker's own event path (`worker.run_events`: plan, score, select and validate every
    layer, move, install the shortened row and the offset) on a flash-layout cache on `device`,
    for three requests compressed in one step with knorm, the middle one's row naming a block the
    cache does not have. The two good ones end with exactly torch's kept K and V in their new row
    (in place, or in the fresh blocks the events bring), bitwise, every layer; the bad one is
    FAILED with its KV untouched, and its failure (found on the device on CUDA) is not reported
    against the next event. The worker synchronizes twice per event (prepare, move), never per
    layer. `deferred`: on CPU, with failures reported at synchronize as CUDA reports them."""
    import torch

    with kvsieve_settings(KNORM):
        _run_worker_events(layout, into, device, dtype or torch.bfloat16, deferred)


def _run_worker_events(layout: str, into: bool, device, dtype, deferred: bool) -> None:
    from types import SimpleNamespace

    import torch

    from kvsieve_vllm import settings as settings_mod
    from kvsieve_vllm import worker
    from kvsieve_vllm.lib import PHASE_PREFILL
    from kvsieve_vllm.protocol import Event, Outcome, StepPlan
    from kvsieve_vllm.request_options import DEFAULT

    s = settings_mod.settings()
    caches = make_caches(layout, dtype, device, blocks=40, layers=3)
    write, _ = writer(device)
    reqs = {"a": ([7, 2, 9, 4, 11], 70), "bad": ([12, 13, 999], 40), "b": ([5, 6, 20, 1], 60)}
    fresh = iter([30, 31, 32, 33, 34, 35, 36, 37])
    names = [f"model.layers.{i}.attn" for i in range(len(caches))]
    logical = {}  # (req, layer) -> (K, V) [heads, n, head_size]
    for layer, cache in enumerate(caches):
        good = [r for r in reqs if r != "bad"]
        filled = _fill(cache, [reqs[r][0] for r in good], [reqs[r][1] for r in good], 10 + layer, write)
        logical.update({(r, layer): kv for r, kv in zip(good, filled)})
        _fill(cache, [[12, 13]], [32], 50 + layer, write)  # the bad row's real blocks
    untouched = [c.clone() for c in caches]
    config = s.requests.get(DEFAULT)
    events, plans = {}, {}
    for rid, (row, n) in reqs.items():
        p = plans[rid] = config.plan_event(PHASE_PREFILL, n, n, 0, BS, n)
        dest = tuple(next(fresh) for _ in range(math.ceil(int(p.selected_tokens) / BS))) if into else None
        events[rid] = Event(rid, PHASE_PREFILL, n, 0, 0, int(p.kept_tokens), int(p.released_blocks), dest=dest)
    added = []
    runner = SimpleNamespace(
        requests={rid: SimpleNamespace(num_computed_tokens=n, block_ids=(list(row),))
                  for rid, (row, n) in reqs.items()},
        input_batch=SimpleNamespace(req_id_to_index={rid: i for i, rid in enumerate(reqs)},
                                    block_table=SimpleNamespace(add_row=lambda ids, idx: added.append((ids, idx)))))
    buffers = worker.Buffers(device, len(caches), 2 * HEADS, HEAD)
    st = worker.WorkerState(list(zip(names, caches)), flash_layout, HEAD, buffers)
    counting = (DeferredErrors if deferred else CountingKernels)(st.kernels())
    buffers.kernels_by_stream[worker._stream(st.device)] = counting
    acks = worker.run_events(runner, st, SimpleNamespace(num_scheduled_tokens={}), StepPlan(events=events))
    # CPU names the id; the device check names its row index (2).
    named = "999" if device == "cpu" else "a block id of the row is out of range (row index 2"
    assert acks["bad"].outcome == Outcome.FAILED and named in acks["bad"].reason, acks["bad"]
    for rid in ("a", "b"):
        assert acks[rid].outcome == Outcome.DONE, (rid, acks[rid])
    assert counting.syncs == 2 * 3 - 1, f"{counting.syncs} synchronizes for 3 events (the bad one never moves)"
    sink, tail = s.params[PHASE_PREFILL].sink_tokens, s.params[PHASE_PREFILL].protected_tail
    for rid in ("a", "b"):
        row, n = reqs[rid]
        k = int(plans[rid].selected_tokens)
        new_row = runner.requests[rid].block_ids[0]
        assert new_row == (list(events[rid].dest) if into else row[:math.ceil(k / BS)]), (rid, new_row)
        assert st.offsets[rid] == int(plans[rid].evicted_tokens)
        for layer, cache in enumerate(caches):
            key, value = logical[(rid, layer)]
            got_k, got_v = _read(cache, new_row, k)
            for h in range(HEADS):
                idx = knorm_keep(key[h], k, sink, tail).to(cache.device)
                assert torch.equal(got_k[h], key[h, idx]) and torch.equal(got_v[h], value[h, idx]), (rid, layer, h)
    assert "bad" not in st.offsets and runner.requests["bad"].block_ids[0] == reqs["bad"][0]
    for layer, (cache, before) in enumerate(zip(caches, untouched)):
        k_now, v_now = flash_layout.views(cache, HEAD)
        k_was, v_was = flash_layout.views(before, HEAD)
        for b in (12, 13):
            assert torch.equal(k_now[b], k_was[b]) and torch.equal(v_now[b], v_was[b]), f"bad row moved (layer {layer})"


SNAPKV = ('[sparsity]\npolicy = "snapkv"\nbudget_tokens = 40\nsink_tokens = 4\nrecent_tokens = 8\nwindow = 8\n'
          'pool_kernel = 5\nmin_length = 0\n')


def check_worker_snapkv(layout: str, device="cpu", dtype=None) -> None:
    """SnapKV through the worker on a flash-layout cache: the window's queries are recorded by the
    GPU backends' forward hook over two steps (the window straddles a chunk boundary, its batch
    rows shifted by another request's tokens), then the event scores from them. Per layer and
    head, the kept tokens are the sinks, the tail and the top SnapKV scores of a float64 torch
    reference (within 1e-4 at the cut), and their K and V land bitwise in the shortened row."""
    import torch

    with kvsieve_settings(SNAPKV):
        _run_worker_snapkv(layout, device, dtype or torch.bfloat16)


def _run_worker_snapkv(layout: str, device, dtype) -> None:
    from types import SimpleNamespace as NS

    import numpy as np
    import torch

    import reference
    from kvsieve_vllm import capture, worker
    from kvsieve_vllm import settings as settings_mod
    from kvsieve_vllm.lib import PHASE_PREFILL
    from kvsieve_vllm.protocol import Capture, Event, Outcome, StepPlan
    from kvsieve_vllm.request_options import DEFAULT

    s = settings_mod.settings()
    params = s.params[PHASE_PREFILL]
    q_heads, n, row, layers = 2 * HEADS, 100, [7, 2, 9, 4, 11, 13, 14], 2
    w_start = n - params.window
    caches = make_caches(layout, dtype, device, blocks=20, layers=layers)
    write, _ = writer(device)
    names = [f"model.layers.{i}.attn" for i in range(layers)]
    logical = [_fill(cache, [row], [n], 70 + i, write)[0] for i, cache in enumerate(caches)]
    g = torch.Generator().manual_seed(5)
    window_q = [torch.randn(params.window, q_heads, HEAD, generator=g).to(dtype) for _ in range(layers)]
    buffers = worker.Buffers(device, layers, q_heads, HEAD)
    st = worker.WorkerState(list(zip(names, caches)), flash_layout, HEAD, buffers)
    st.windows.name_layers(names)
    hooked = flash_layout.wrap_forward(lambda self, layer, query, *a, **kw: None)
    # Step 1 computes [80, 96) of "r" after 5 tokens of "o"; step 2 computes [96, 100) alone.
    steps = [(["o", "r"], [100, 80], [5, 16], 92, 96), (["r"], [96], [4], 96, 100)]
    for req_ids, computed, scheduled, lo, hi in steps:
        starts = np.concatenate([[0], np.cumsum(scheduled)])
        caps = {"r": Capture("r", w_start, n, lo, hi)}
        st.windows.plan_step(capture.Batch(req_ids, starts, np.array(computed), np.array(scheduled)), caps)
        r = req_ids.index("r")
        for i, name in enumerate(names):
            query = torch.randn(int(starts[-1]), q_heads, HEAD, generator=g).to(dtype)
            first = int(starts[r]) + lo - computed[r]
            query[first:first + hi - lo] = window_q[i][lo - w_start:hi - w_start]
            capture.ACTIVE = st.windows
            try:
                hooked(None, NS(layer_name=name), query.to(device))
            finally:
                capture.ACTIVE = None
        if hi < n:
            st.windows.end_step(caps)  # the window is not complete yet: kept for the next step
    plan = s.requests.get(DEFAULT).plan_event(PHASE_PREFILL, n, n, 0, BS, n)
    k = int(plan.selected_tokens)
    ev = Event("r", PHASE_PREFILL, n, 0, 0, int(plan.kept_tokens), int(plan.released_blocks), window=(w_start, n))
    req = NS(num_computed_tokens=n, block_ids=(list(row),))
    runner = NS(requests={"r": req}, input_batch=NS(req_id_to_index={}, block_table=None))
    acks = worker.run_events(runner, st, NS(num_scheduled_tokens={}), StepPlan(events={"r": ev}))
    assert acks["r"].outcome == Outcome.DONE, acks["r"]
    new_row = req.block_ids[0]
    assert new_row == row[:math.ceil(k / BS)], new_row
    sink, tail = params.sink_tokens, params.protected_tail
    for i, cache in enumerate(caches):
        key, value = logical[i]
        scores = reference.snapkv_scores(key.cpu(), window_q[i].transpose(0, 1).cpu(), params.pool_kernel)
        got_k, got_v = _read(cache, new_row, k)
        for h in range(HEADS):
            # Which original position each kept slot holds (random rows are unique).
            match = (got_k[h].cpu()[:, None, :] == key[h].cpu()[None, :, :]).all(-1)
            assert bool((match.sum(1) == 1).all()), (i, h, "a kept row matches no single original")
            idx = match.float().argmax(1)
            assert bool((idx[1:] > idx[:-1]).all()), (i, h, idx.tolist())
            kept = set(idx.tolist())
            forced = set(range(sink)) | set(range(n - tail, n))
            assert forced <= kept, (i, h, sorted(forced - kept))
            middle = [t for t in range(sink, n - tail)]
            chosen = [t for t in middle if t in kept]
            dropped = [t for t in middle if t not in kept]
            assert len(chosen) == k - len(forced), (len(chosen), k)
            sc = scores[h]
            cut = 1e-4 * float(sc.abs().max())
            assert float(sc[chosen].min()) >= float(sc[dropped].max()) - cut, (i, h, "kept a lower SnapKV score")
            assert torch.equal(got_v[h], value[h, idx.to(value.device)]), (i, h, "V does not follow K")
    assert "r" not in st.windows.windows, "the window's buffer went back to the pool after its event"


def check_event_scratch_is_flat(device="cpu", steps: int = 6, events_per_step: int = 6) -> None:
    """Many events in one step, each at the largest budget a request may ask for (ratio 1.0 of
    `[requests]`' default bounds: everything but the last block kept, the longest keep lists
    possible), step after step: the worker's scratch after the first step is exactly what
    `Buffers.reserve` set aside for one event of the longest sequence, and it never grows (the
    events run one at a time through the one reserved keep buffer). Checked by tensor bytes."""
    with kvsieve_settings(KNORM):
        _run_flat_scratch(device, steps, events_per_step)


def _run_flat_scratch(device, steps: int, events_per_step: int) -> None:
    from types import SimpleNamespace

    import torch

    from kvsieve_vllm import settings as settings_mod
    from kvsieve_vllm import worker
    from kvsieve_vllm.lib import PHASE_PREFILL
    from kvsieve_vllm.protocol import Event, Outcome, StepPlan
    from kvsieve_vllm.request_options import Options

    s = settings_mod.settings()
    blocks_per_req, layers = 6, 3
    max_len = blocks_per_req * BS
    caches = make_caches(layouts()[0], torch.float16, device, blocks=blocks_per_req * events_per_step + 1,
                         layers=layers)
    names = [f"model.layers.{i}.attn" for i in range(layers)]
    buffers = worker.Buffers(device, layers, 2 * HEADS, HEAD)
    geo = worker.Geometry(layers=layers, kv_heads=HEADS, q_heads=2 * HEADS, head_size=HEAD, block_size=BS,
                          dtype=torch.float16, max_len=max_len)
    st = worker.WorkerState(list(zip(names, caches)), flash_layout, HEAD, buffers)
    buffers.reserve(geo, st.desc[0])

    def nbytes() -> dict:
        return {k: v.numel() * v.element_size() for k, v in st.scratch.bufs.items()}

    reserved = nbytes()
    widest = Options(budget_ratio=1.0)  # the largest budget [requests] allows by default
    config = s.requests.get(widest)
    seen = []
    for step in range(steps):
        reqs, events = {}, {}
        for i in range(events_per_step):
            rid = f"s{step}r{i}"
            row = list(range(i * blocks_per_req, (i + 1) * blocks_per_req))
            n = max_len - (step % 3)  # lengths vary a little between steps
            p = config.plan_event(PHASE_PREFILL, n, n, 0, BS, n)
            assert int(p.released_blocks) >= 0
            reqs[rid] = (row, n)
            events[rid] = Event(rid, PHASE_PREFILL, n, 0, 0, int(p.kept_tokens), int(p.released_blocks),
                                options=widest)
        runner = SimpleNamespace(
            requests={rid: SimpleNamespace(num_computed_tokens=n, block_ids=(list(row),))
                      for rid, (row, n) in reqs.items()},
            input_batch=SimpleNamespace(req_id_to_index={}, block_table=SimpleNamespace(add_row=None)))
        acks = worker.run_events(runner, st, SimpleNamespace(num_scheduled_tokens={}), StepPlan(events=events))
        assert all(a.outcome == Outcome.DONE for a in acks.values()), acks
        for rid in events:
            st.offsets.pop(rid, None)
        seen.append(nbytes())
    assert seen[0] == reserved, f"the first step grew the scratch: {reserved} -> {seen[0]}"
    assert all(x == reserved for x in seen), f"scratch after each step: {seen}"


QUEST = '[selection]\npolicy = "quest"\nbudget_tokens = 48\nmin_length = 0\ndense_layers = 0\n'


def check_selection(layout: str, device="cpu") -> None:
    """Block selection (`selection.Selector`) on flash-layout caches, as a GPU backend's forward
    sees it: a step whose forward completes the blocks of three sequences (70, 100 and 20 tokens;
    the first two over the 48-token budget, 3 blocks of 16) keeps their Quest metadata; the next
    step's decode rows then read, per layer, the first and last block and the block with the
    highest score computed here in torch from the keys in the cache (max over query heads of
    sum_d q_d c_d + spread |q_d| w_d, c and w the centre and half-width of the block's key range,
    spread the config's), in order, with the reduced lengths; the short one and the
    prefill row read everything; FLASH_ATTN's ahead-of-time scheduler metadata is dropped; vLLM's
    own metadata object is never changed."""
    import dataclasses

    import torch

    from kvsieve_vllm import selection

    caches = make_caches(layout, torch.float32, device, blocks=16)
    write, _ = writer(device)
    rows = [[3, 7, 1, 9, 5], [2, 0, 11, 4, 6, 8, 10], [12, 13]]
    lengths = [70, 100, 20]
    for i, cache in enumerate(caches):
        _fill(cache, rows, lengths, seed=10 + i, write=write)
    descs = [flash_layout.describe(c, HEAD) for c in caches]
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]

    @dataclasses.dataclass
    class Metadata:  # the fields the adapters read, as FlashAttentionMetadata names them
        query_start_loc: object
        seq_lens: object
        block_table: object
        scheduler_metadata: object = None

    kernels = kernels_for(device)
    with kvsieve_settings(QUEST) as s:
        sel = selection.Selector.make(s.config, s.config.selection(), names, descs, LAYERS, torch.device(device),
                                      lambda: kernels, flash_layout, torch.float32)
        spread = s.config.selection().spread
        table = torch.zeros(4, 8, dtype=torch.int32, device=device)
        for r, row in enumerate(rows):
            table[r, :len(row)] = torch.tensor(row, dtype=torch.int32)
        # Step 1: the three prompts computed (their lengths' complete blocks are now full).
        as_i32 = dict(dtype=torch.int32, device=device)
        prefill = Metadata(torch.tensor([0, 70, 170, 190], **as_i32), torch.tensor(lengths, **as_i32), table[:3])
        sel.begin_step(())
        q = torch.randn(190, 2 * HEADS, HEAD, device=device)
        for name in names:
            assert sel.metadata_for(name, None, None, q, prefill) is prefill, "a prefill step reads every block"
        sel.after_forward()
        # Step 2: each decodes one token (written first, as vLLM does), and a fourth row prefills.
        step_lens = [71, 101, 21, 16]
        rows.append([14])
        table[3, 0] = rows[3][0]
        g = torch.Generator().manual_seed(5)
        for cache in caches:
            k_view, v_view = flash_layout.views(cache, HEAD)
            for r, n in enumerate(step_lens[:3]):
                slot = torch.tensor([rows[r][(n - 1) // BS] * BS + (n - 1) % BS], device=device)
                kv = torch.randn(2, 1, HEADS, HEAD, generator=g).to(device)
                write(kv[0], kv[1], k_view, v_view, slot)
        md = Metadata(torch.tensor([0, 1, 2, 3, 19], **as_i32), torch.tensor(step_lens, **as_i32), table,
                      scheduler_metadata=torch.zeros(4, **as_i32))
        before = (md.block_table.clone(), md.seq_lens.clone())
        sel.begin_step(())
        q = torch.randn(19, 2 * HEADS, HEAD, device=device)
        for layer, name in enumerate(names):
            got = sel.metadata_for(name, None, None, q, md)
            assert got is not md and got.scheduler_metadata is None, "the copy drops FA3's AOT schedule"
            assert got.seq_lens.tolist() == [2 * BS + 71 - 4 * BS, 2 * BS + 101 - 6 * BS, 21, 16]
            assert got.block_table[2:].tolist() == table[2:].tolist(), "rows within the budget read everything"
            for r, n in enumerate(step_lens[:2]):
                keys, _ = _read(caches[layer], rows[r], n)  # [heads, n, head]
                blocks = math.ceil(n / BS)
                full = [keys[:, b * BS:(b + 1) * BS].double() for b in range(blocks - 1)]
                lo = torch.stack([f.amin(1) for f in full], 1)  # [heads, blocks - 1, head]
                hi = torch.stack([f.amax(1) for f in full], 1)
                qr = q[r].double().view(HEADS, 2, HEAD)
                best = int(quest_scores(qr, lo, hi, spread).amax((0, 1))[1:].argmax()) + 1
                want = [rows[r][0], rows[r][best], rows[r][blocks - 1]]
                assert got.block_table[r, :3].tolist() == want, (layout, layer, r, got.block_table[r].tolist(), want)
        sel.after_forward()
        assert md.block_table.tolist() == before[0].tolist() and md.seq_lens.tolist() == before[1].tolist()
        c = sel.counters.take()
        assert (c["rows"], c["blocks_read"], c["blocks_total"], c["failed"]) == (2, 6, 5 + 7, 0), c
