"""Quest block selection on the worker (`[selection]`): each decode step, every layer from
`dense_layers` on reads only the blocks whose keys can matter most to the row's query. Nothing is
evicted; the KV cache, its writes and the scheduler are untouched.

- Metadata: per selected layer, float32 `[num_blocks, key_ranges, kv_heads, head_dim]` min and
  max keys per physical block (`selection.key_ranges` runs of slots each, 1 by default), on the
  cache's device, made with the KV cache. A block's entry is
  computed after the step whose forward filled it (`after_forward`, from that step's own
  attention metadata: the blocks each row completed) and after an event rewrote it
  (`rewritten`). Full blocks never change otherwise, so blocks shared through the prefix cache
  stay valid, and a block handed to another request is recomputed when it is full again. The
  last block of a row (partial, the one being written) is always read and needs none.
- Per step (`Step`, made by the first hooked forward): the decode rows (one query token, not
  opted out) longer than the budget read `keep` blocks (`kvs_plan_selection`, the same count for
  every layer), so the reduced sequence lengths and the backend's per-step metadata (CPU_ATTN's
  scheduler metadata) are built once; per layer (`Selector.metadata_for`) only those rows of
  the block table differ, written by one `kvs_quest_select` call from the layer's query.
  The layer gets a copy of the attention metadata; vLLM's own object is never changed.
- Never breaks the forward: a failure logs once, counts, and that layer (or step) reads every
  block, which is what stock vLLM does.
- Devices: the same code on CUDA (FLASH_ATTN, TRITON_ATTN; the backend adapter makes the copy),
  where the step's lengths cross to the host once per step; it needs attention to run outside
  CUDA graphs (PIECEWISE or eager, checked at start-up).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from .lib import QuestRows

logger = logging.getLogger("vllm.kvsieve")

# The runner's selector while its step's forward runs (set with `capture.ACTIVE`).
ACTIVE: "Selector | None" = None

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str, position: int) -> int:
    """The model layer a cache layer belongs to ("model.layers.7.self_attn.attn" -> 7); its
    position in cache order when the name carries no number."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else position


@dataclass
class Counters:
    """What selection did since the last report (rides on the step's StepAcks)."""

    steps: int = 0
    rows: int = 0  # decode rows that read a selection (counted once per step, not per layer)
    blocks_read: int = 0  # of those rows, per step
    blocks_total: int = 0
    seconds: float = 0.0
    failed: int = 0  # layers (or steps) that fell back to reading every block

    def take(self) -> dict | None:
        if not (self.steps or self.failed):
            return None
        out = dict(self.__dict__)
        self.__init__()
        return out


@dataclass
class Step:
    """One step's selection, shared by its layers. `rows` are batch rows (int64) and `tokens`
    their query token; `quest` points into `table`/`blocks`/`keep`, kept alive here."""

    metadata: object  # the attention metadata it was planned from (layers of another object: untouched)
    rows: object
    tokens: object
    table: object  # int32 [n, stride]: the decode rows of the step's block table
    blocks: object  # int32 [n]
    keep: object  # int32 [n]
    quest: QuestRows
    seq_lens: object  # the step's sequence lengths with the selected rows reduced
    backend_state: object  # what the backend adapter rebuilt for those lengths
    every_row: bool  # the selected rows are the whole batch, in order
    workspace: object


@dataclass
class Selector:
    """A runner's selection state: settings, per selected layer its metadata, this step."""

    config: object  # lib.Config
    dense_layers: int
    block_size: int
    device: object
    kernels: object  # callable -> the runner's kernels handle
    adapter: object  # backends.cpu_attn
    spread: float  # selection.spread: how much of a block's key range its score counts
    dtype: object = None  # the model's dtype (the backend's per-step metadata is built for it)
    layers: dict = field(default_factory=dict)  # name -> (desc, block_min, block_max)
    metadata_bytes: int = 0
    step: Step | None = None
    planned: bool = False
    dense_req_ids: set = field(default_factory=set)  # this step's opted-out requests
    req_ids: list | None = None  # this step's requests in row order
    broken: str = ""  # metadata upkeep failed: selection is off from then on
    filled: list = field(default_factory=list)  # (blocks, filled) int32 tensors of this step
    counters: Counters = field(default_factory=Counters)
    logged: set = field(default_factory=set)

    @staticmethod
    def make(config, params, names: list, descs: list, model_layers: int, device, kernels, adapter,
             dtype=None) -> "Selector":
        """Allocate the metadata of every selected layer; refuses (ValueError naming the key) a
        `dense_layers` that leaves no layer to select."""
        import torch

        ranges = max(int(params.key_ranges), 1)
        if descs[0].block_size % ranges:
            raise ValueError(f"selection.key_ranges = {ranges} does not divide this engine's block size "
                             f"({descs[0].block_size}): each block is split into that many equal runs of slots; "
                             f"choose a divisor of {descs[0].block_size} (or 1, Quest's one range per block)")
        if params.dense_layers >= model_layers:
            raise ValueError(f"selection.dense_layers = {params.dense_layers} leaves all {model_layers} layers of "
                             f"this model dense, so selection would do nothing; set it below {model_layers} "
                             "(Quest's default is 2)")
        sel = Selector(config, params.dense_layers, descs[0].block_size, device, kernels, adapter, params.spread,
                       dtype)
        chosen = [(name, desc) for pos, (name, desc) in enumerate(zip(names, descs))
                  if layer_index(name, pos) >= params.dense_layers]
        # min and max, float32 each, per block, key range, KV head and dim of every selected layer.
        sel.metadata_bytes = need = sum(2 * 4 * d.num_blocks * ranges * d.num_kv_heads * d.head_dim
                                        for _, d in chosen)
        try:
            for name, desc in chosen:
                n = desc.num_blocks * ranges * desc.num_kv_heads * desc.head_dim
                lo = torch.zeros(n, dtype=torch.float32, device=device)
                hi = torch.zeros(n, dtype=torch.float32, device=device)
                sel.layers[name] = (desc, lo, hi)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or the host allocator's
            # Allocated after vLLM sized the KV cache: on a GPU the space must be left free.
            raise ValueError(f"the block selection metadata ({need / 2**20:.0f} MiB for {len(chosen)} layers) does "
                             f"not fit beside the KV cache on {device}; lower --gpu-memory-utilization by that much, "
                             "raise selection.dense_layers, or lower selection.key_ranges") from e
        return sel

    def _log_once(self, key: str, msg: str, *args) -> None:
        if key not in self.logged:
            self.logged.add(key)
            logger.warning(msg, *args)

    # -- the step --------------------------------------------------------------------------

    def begin_step(self, dense_req_ids) -> None:
        self.step, self.planned, self.filled = None, False, []
        self.dense_req_ids = set(dense_req_ids or ())
        self.req_ids = None

    def set_rows(self, req_ids) -> None:
        """The batch's requests in row order (from the runner's input preparation), so opted-out
        requests can be told apart."""
        self.req_ids = list(req_ids)

    def metadata_for(self, layer_name: str, impl, layer, query, md):
        """The attention metadata this layer's forward should read: `md` itself, or a copy whose
        decode rows read their selected blocks."""
        if md is None or self.broken:
            return md
        if not self.planned:
            self.planned = True
            t0 = time.perf_counter()
            try:
                lengths = self._lengths(md)
                self._completed_blocks(md, lengths)
            except Exception as e:
                self._break(f"finding the blocks this step completes failed: {type(e).__name__}: {e}")
                return md
            try:
                self._plan(impl, layer, md, lengths)
            except Exception as e:
                self.step = None
                self.counters.failed += 1
                self._log_once("plan", "kvsieve: planning this step's block selection failed (%s: %s); the step "
                               "reads every block (logged once)", type(e).__name__, e)
            self.counters.seconds += time.perf_counter() - t0
        entry = self.layers.get(layer_name)
        if self.step is None or entry is None or md is not self.step.metadata:
            return md
        t0 = time.perf_counter()
        try:
            out = self._select(entry, query, md)
        except Exception as e:
            self.counters.failed += 1
            self._log_once("select", "kvsieve: selecting blocks for layer %s failed (%s: %s); it reads every block "
                           "(logged once)", layer_name, type(e).__name__, e)
            out = md
        self.counters.seconds += time.perf_counter() - t0
        return out

    @staticmethod
    def _lengths(md):
        """(query start per row, int64 on the host; the rows' sequence lengths as given; the
        same as int64 on the host; tokens each row queries this step)."""
        import torch

        starts = md.query_start_loc.to("cpu", torch.int64)
        n = starts.numel() - 1
        seq_lens = md.seq_lens[:n]
        return starts, seq_lens, seq_lens.to("cpu", torch.int64), starts[1:] - starts[:-1]

    def _completed_blocks(self, md, lengths) -> None:
        """The blocks this step's forward completes, for `after_forward`: [(len - queried) // bs,
        len // bs) of each row's physical blocks."""
        import torch

        bs = self.block_size
        _, _, lens, queried = lengths
        first, end = (lens - queried) // bs, lens // bs
        done = [(i, int(a), int(b)) for i, (a, b) in enumerate(zip(first.tolist(), end.tolist())) if b > a]
        if done:
            # Only the rows that completed a block cross to the host (on CUDA the table is large).
            idx = torch.tensor([i for i, _, _ in done], dtype=torch.int64, device=md.block_table.device)
            rows = md.block_table.index_select(0, idx).to("cpu")
            # Host lists: the library reads block ids and fills on the host on either device.
            ids = torch.cat([rows[j, a:b] for j, (_, a, b) in enumerate(done)]).to(torch.int32)
            self.filled = [ids, torch.full_like(ids, bs)]

    def _plan(self, impl, layer, md, lengths) -> None:
        """The step's `Step` when a decode row is over its budget. A decode row is one that
        queries one token: a prefill whose last step is one token (a prefix-cache hit on all but
        one, a length of 1 past a chunk) is selected too, as Quest would."""
        import torch

        bs = self.block_size
        starts, seq_lens, lens, queried = lengths
        n = starts.numel() - 1
        table = md.block_table
        decode = queried == 1
        if self.req_ids is not None and self.dense_req_ids:
            for i, rid in enumerate(self.req_ids[:n]):
                if rid in self.dense_req_ids:
                    decode[i] = False
        rows = torch.nonzero(decode).flatten()
        if rows.numel() == 0:
            return
        row_lens = lens[rows].to(torch.int32).contiguous()
        keep = torch.empty_like(row_lens)
        reduced = torch.empty_like(row_lens)
        self.config.plan_selection(row_lens, bs, keep, reduced)
        blocks = (row_lens + bs - 1) // bs
        over = keep < blocks
        if not bool(over.any()):
            return
        rows, keep, reduced, blocks = rows[over], keep[over], reduced[over], blocks[over].to(torch.int32)
        dev = self.device
        new_lens = seq_lens.clone()
        new_lens[rows.to(new_lens.device)] = reduced.to(new_lens.device, new_lens.dtype)
        sub = table[rows.to(table.device)].contiguous()
        blocks, keep = blocks.to(dev).contiguous(), keep.to(dev).contiguous()
        quest = QuestRows(table=sub.data_ptr(), num_rows=rows.numel(), stride=sub.shape[1],
                          blocks=blocks.data_ptr(), keep=keep.data_ptr(), sink_blocks=1,
                          spread=self.spread)
        every_row = rows.numel() == n
        workspace = torch.empty(rows.numel() * sub.shape[1], dtype=torch.float32, device=dev)
        state = self.adapter.selection_state(impl, layer, md, new_lens, self.dtype)
        self.step = Step(md, rows.to(dev), starts[rows].to(dev), sub, blocks, keep, quest, new_lens, state, every_row,
                         workspace)
        c = self.counters
        c.steps += 1
        c.rows += rows.numel()
        c.blocks_read += int(keep.sum())
        c.blocks_total += int(blocks.sum())

    def _select(self, entry, query, md):
        import torch

        desc, lo, hi = entry
        st = self.step
        q = query.index_select(0, st.tokens).contiguous()
        stride = st.table.shape[1]
        # Padded up front: a row the device refuses is left as written here (a valid id).
        out = torch.zeros(st.table.shape, dtype=torch.int32, device=self.device)
        self.kernels().quest_select(desc, st.quest, q, q.shape[1], lo, hi, st.workspace, out, stride)
        if st.every_row:
            table = out
        else:
            table = md.block_table.clone()
            table[st.rows] = out
        return self.adapter.with_selection(md, table, st.seq_lens, st.backend_state)

    # -- metadata upkeep -------------------------------------------------------------------

    def after_forward(self) -> None:
        """The step's forward wrote its KV: compute the metadata of the blocks it completed."""
        if self.filled:
            self._update(*self.filled)
        self.filled, self.step = [], None

    def rewritten(self, row: list, cached: int) -> None:
        """An event rewrote `row` (now `cached` tokens): its full blocks' metadata again."""
        import torch

        full = row[: cached // self.block_size]
        if full:
            ids = torch.tensor(full, dtype=torch.int32)  # host, as in `_completed_blocks`
            self._update(ids, torch.full_like(ids, self.block_size))

    def _update(self, ids, filled) -> None:
        """Contained: metadata that could not be updated would select by stale keys, so a failure
        turns selection off for this runner (every block read, as stock vLLM) and says why."""
        if self.broken:
            return
        try:
            kernels = self.kernels()
            for desc, lo, hi in self.layers.values():
                kernels.quest_update_blocks(desc, ids, filled, lo, hi)
            kernels.synchronize()
        except Exception as e:
            self._break(f"updating the Quest metadata failed: {type(e).__name__}: {e}")

    def _break(self, why: str) -> None:
        """Metadata that missed an update would select by stale keys: selection is off in this
        worker from now on (every block read, as stock vLLM), loudly."""
        self.broken, self.step, self.filled = why, None, []
        self.counters.failed += 1
        logger.error("kvsieve: %s; block selection is off in this worker from now on, attention reads every block",
                     why)
