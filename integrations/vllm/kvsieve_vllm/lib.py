"""ctypes binding of libkvsieve's C ABI (include/kvsieve.h).

Every call checks its status and raises `KvsieveError` carrying the status name and the
library's own message (`kvs_last_error`), so a bad config or argument reads the same from
Python as from C.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, Structure, byref, c_char_p, c_size_t, c_uint32, c_uint64, c_void_p
from pathlib import Path

from . import faults

ABI_VERSION = 5  # KVS_ABI_VERSION of the header this binding mirrors

PHASE_PREFILL, PHASE_DECODE, PHASE_PREFILL_CHUNK = 0, 1, 2
DTYPE = {"float32": 0, "float16": 1, "bfloat16": 2}
LAYOUT = {"nhd": 0, "hnd": 1, "vllm_cpu_vec": 2, "vllm_cpu_amx": 3}
DEVICE = {"cpu": 0, "cuda": 1}  # kvs_device, by torch device type
POLICY_NAMES = {0: "none", 1: "streaming", 2: "snapkv", 3: "knorm", 4: "quest"}


class KvsieveError(RuntimeError):
    """A kvsieve call failed: `status` is the KVS_STATUS_* name, the message says why."""

    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class SequenceLengths(Structure):
    _fields_ = [("logical_len", c_uint64), ("cached_len", c_uint64),
                ("protected_len", c_uint64), ("block_size", c_uint32)]


class KeepPlan(Structure):
    _fields_ = [("kept_tokens", c_uint64), ("evicted_tokens", c_uint64),
                ("released_blocks", c_uint64), ("selected_tokens", c_uint64)]


class PolicyParams(Structure):
    _fields_ = [("policy", c_uint32), ("budget_tokens", c_uint32), ("budget_ratio", ctypes.c_double),
                ("sink_tokens", c_uint32), ("protected_tail", c_uint32), ("window", c_uint32),
                ("pool_kernel", c_uint32), ("pool", c_uint32), ("min_length", c_uint32),
                ("interval", c_uint32), ("carry", ctypes.c_float)]


class SelectionParams(Structure):
    _fields_ = [("policy", c_uint32), ("budget_tokens", c_uint32), ("budget_ratio", ctypes.c_double),
                ("min_length", c_uint32), ("dense_layers", c_uint32), ("spread", ctypes.c_float),
                ("key_ranges", c_uint32)]


class QuestRows(Structure):
    _fields_ = [("table", c_void_p), ("num_rows", c_uint32), ("stride", c_uint32), ("blocks", c_void_p),
                ("keep", c_void_p), ("sink_blocks", c_uint32), ("spread", ctypes.c_float)]


class RequestArgs(Structure):
    _fields_ = [("opt_out", c_uint32), ("budget_tokens", c_uint32), ("budget_ratio", ctypes.c_double)]


class KvCache(Structure):
    _fields_ = [("k", c_void_p), ("v", c_void_p), ("dtype", c_uint32), ("layout", c_uint32),
                ("device", c_uint32), ("num_blocks", c_uint32), ("block_size", c_uint32),
                ("num_kv_heads", c_uint32), ("head_dim", c_uint32), ("block_stride", c_uint64),
                ("token_stride", c_uint64), ("head_stride", c_uint64)]


class Sequence(Structure):
    _fields_ = [("row", c_void_p), ("row_len", c_uint32), ("cached_len", c_uint32),
                ("protected_len", c_uint32)]


class TokenSelect(Structure):
    _fields_ = [("cached_len", c_uint32), ("protected_len", c_uint32), ("sink_tokens", c_uint32),
                ("protected_tail", c_uint32), ("selected", c_uint32)]


class SnapKvArgs(Structure):
    _fields_ = [("queries", c_void_p), ("queries_dtype", c_uint32), ("window", c_uint32),
                ("num_q_heads", c_uint32), ("pool_kernel", c_uint32), ("pool", c_uint32)]


def _candidates() -> list[Path]:
    env = os.environ.get("KVSIEVE_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    return [here / "libkvsieve.so", here.parent / "libkvsieve.so"]


class Library:
    """libkvsieve, loaded and checked against the ABI version this binding was written for."""

    def __init__(self, path: str | os.PathLike | None = None):
        paths = [Path(path)] if path else _candidates()
        found = next((p for p in paths if p.is_file()), None)
        if found is None:
            raise KvsieveError(
                "KVS_STATUS_IO",
                "libkvsieve.so not found (looked at: " + ", ".join(map(str, paths)) + "); "
                "build it with `cargo build --release` and set KVSIEVE_LIB=/path/to/libkvsieve.so",
            )
        self.path = found
        self._lib = lib = ctypes.CDLL(str(found))
        lib.kvs_version.restype = c_char_p
        lib.kvs_abi_version.restype = c_uint32
        lib.kvs_status_str.restype = c_char_p
        lib.kvs_status_str.argtypes = [c_uint32]
        lib.kvs_last_error.restype = c_char_p
        for name, args in {
            "kvs_config_from_str": [c_char_p, c_size_t, POINTER(c_void_p)],
            "kvs_config_from_file": [c_char_p, POINTER(c_void_p)],
            "kvs_config_policy_params": [c_void_p, c_uint32, POINTER(PolicyParams)],
            "kvs_config_for_request": [c_void_p, POINTER(RequestArgs), POINTER(c_void_p)],
            "kvs_config_selection_params": [c_void_p, POINTER(SelectionParams)],
            "kvs_plan_selection": [c_void_p, c_void_p, c_uint32, c_uint32, c_void_p, c_void_p],
            "kvs_plan_keep_count": [c_void_p, c_uint32, POINTER(SequenceLengths), POINTER(KeepPlan)],
            "kvs_plan_prefill_chunk": [c_void_p, POINTER(SequenceLengths), c_uint64, POINTER(KeepPlan)],
            "kvs_config_max_cached_tokens": [c_void_p, c_uint64, c_uint64, c_uint32, POINTER(c_uint64)],
            "kvs_kv_cache_offset": [POINTER(KvCache), c_uint32, c_uint32, c_uint32, c_uint32,
                                    c_uint32, POINTER(c_uint64)],
            "kvs_kernels_new_cpu": [POINTER(c_void_p)],
            "kvs_kernels_new_cuda": [c_uint32, c_void_p, POINTER(c_void_p)],
            "kvs_kernels_synchronize": [c_void_p],
            "kvs_kernels_reserve": [c_void_p, POINTER(KvCache), c_uint32, c_uint32, c_uint32],
            "kvs_score_knorm": [c_void_p, POINTER(KvCache), POINTER(Sequence), c_void_p, c_size_t],
            "kvs_score_snapkv": [c_void_p, POINTER(KvCache), POINTER(Sequence), POINTER(SnapKvArgs),
                                 c_void_p, c_size_t],
            "kvs_select_tokens": [c_void_p, c_void_p, c_size_t, c_uint32, POINTER(TokenSelect),
                                  c_void_p, c_size_t],
            "kvs_compact": [c_void_p, POINTER(KvCache), POINTER(Sequence), c_void_p, c_size_t,
                            c_uint32, c_void_p, c_size_t, POINTER(c_uint32)],
            "kvs_compact_check": [c_void_p, POINTER(KvCache), POINTER(Sequence), c_void_p, c_size_t,
                                  c_uint32, c_size_t],
            "kvs_compact_into": [c_void_p, POINTER(KvCache), POINTER(Sequence), c_void_p, c_size_t,
                                 c_uint32, c_void_p, c_uint32],
            "kvs_compact_into_check": [c_void_p, POINTER(KvCache), POINTER(Sequence), c_void_p, c_size_t,
                                       c_uint32, c_void_p, c_uint32],
            "kvs_quest_update_blocks": [c_void_p, POINTER(KvCache), c_void_p, c_void_p, c_uint32, c_void_p,
                                        c_void_p, c_size_t],
            "kvs_quest_select": [c_void_p, POINTER(KvCache), POINTER(QuestRows), c_void_p, c_uint32, c_uint32,
                                 c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_uint32,
                                 ctypes.c_int32],
        }.items():
            fn = getattr(lib, name, None)
            if fn is None:
                raise KvsieveError(
                    "KVS_STATUS_UNSUPPORTED",
                    f"{found} has no {name} (an older libkvsieve); install the library built from the same "
                    "kvsieve version as this package, or point KVSIEVE_LIB at it",
                )
            fn.argtypes = args
            fn.restype = c_uint32
        lib.kvs_config_free.argtypes = [c_void_p]
        lib.kvs_config_free.restype = None
        lib.kvs_kernels_free.argtypes = [c_void_p]
        lib.kvs_kernels_free.restype = None
        abi = lib.kvs_abi_version()
        if abi != ABI_VERSION:
            raise KvsieveError(
                "KVS_STATUS_UNSUPPORTED",
                f"{found} has ABI version {abi}, this kvsieve_vllm expects {ABI_VERSION}; "
                "install matching versions of the library and the package",
            )
        self.version = lib.kvs_version().decode()

    def check(self, status: int) -> None:
        if status != 0:
            name = self._lib.kvs_status_str(status).decode()
            raise KvsieveError(name, self._lib.kvs_last_error().decode())

    def config_from_str(self, text: str) -> "Config":
        raw = text.encode()
        handle = c_void_p()
        self.check(self._lib.kvs_config_from_str(raw, len(raw), byref(handle)))
        return Config(self, handle)

    def config_from_file(self, path: str | os.PathLike) -> "Config":
        handle = c_void_p()
        self.check(self._lib.kvs_config_from_file(os.fsencode(path), byref(handle)))
        return Config(self, handle)

    def kv_cache_offset(self, cache: KvCache, kind: int, block: int, head: int, slot: int, d: int) -> int:
        out = c_uint64()
        self.check(self._lib.kvs_kv_cache_offset(byref(cache), kind, block, head, slot, d, byref(out)))
        return out.value


class CpuKernels:
    """The CPU backend (`kvs_kernels`) with the score / select / compact calls on host tensors.
    Tensors are passed by address: callers keep them alive and contiguous for the call.

    Both backends take the same calls: on CUDA they only enqueue, and `synchronize` reports
    what the device found (a no-op here, where every call reports synchronously). Code that
    calls `synchronize` once per batch of calls runs unchanged on either."""

    def __init__(self, lib: Library):
        self._lib = lib
        self._handle = c_void_p()
        lib.check(lib._lib.kvs_kernels_new_cpu(byref(self._handle)))

    def __del__(self):
        if getattr(self, "_handle", None) and self._handle.value:
            self._lib._lib.kvs_kernels_free(self._handle)
            self._handle = c_void_p()

    def _call(self, name: str, *args) -> None:
        if faults.hit("lib"):
            raise KvsieveError("KVS_STATUS_INVALID_ARGUMENT", f"{name}: injected fault (KVSIEVE_FAULTS lib)")
        self._lib.check(getattr(self._lib._lib, name)(self._handle, *args))

    def synchronize(self) -> None:
        """Wait for the enqueued calls; KvsieveError naming every call whose device-side checks
        failed since the last synchronize (those wrote nothing)."""
        self._lib.check(self._lib._lib.kvs_kernels_synchronize(self._handle))

    def reserve(self, cache: KvCache, max_cached_len: int, window: int = 0, num_q_heads: int = 0) -> None:
        """Reserve the backend's own scratch for sequences of up to `max_cached_len` tokens of
        `cache`'s geometry (only the descriptor is read); CUDA allocates it now, CPU keeps none."""
        self._call("kvs_kernels_reserve", byref(cache), max_cached_len, window, num_q_heads)

    def score_knorm(self, cache: KvCache, seq: Sequence, scores_ptr: int, n: int) -> None:
        self._call("kvs_score_knorm", byref(cache), byref(seq), scores_ptr, n)

    def score_snapkv(self, cache: KvCache, seq: Sequence, args: SnapKvArgs, scores_ptr: int, n: int) -> None:
        self._call("kvs_score_snapkv", byref(cache), byref(seq), byref(args), scores_ptr, n)

    def select_tokens(self, scores_ptr: int | None, n_scores: int, heads: int, sel: TokenSelect,
                      keep_ptr: int, keep_len: int) -> None:
        self._call("kvs_select_tokens", scores_ptr, n_scores, heads, byref(sel), keep_ptr, keep_len)

    def compact_enqueue(self, cache: KvCache, seq: Sequence, keep_ptr: int, keep_len: int, selected: int,
                        released_ptr: int, released_cap: int) -> c_uint32:
        """Enqueue `kvs_compact`; the returned count is written by the next `synchronize` (keep
        it alive until then; on CPU it is written already)."""
        n = c_uint32()
        self._call("kvs_compact", byref(cache), byref(seq), keep_ptr, keep_len, selected, released_ptr,
                   released_cap, byref(n))
        return n

    def compact(self, cache: KvCache, seq: Sequence, keep_ptr: int, keep_len: int, selected: int,
                released_ptr: int, released_cap: int) -> int:
        """Compact and wait: the number of blocks released."""
        n = self.compact_enqueue(cache, seq, keep_ptr, keep_len, selected, released_ptr, released_cap)
        self.synchronize()
        return n.value

    def compact_check(self, cache: KvCache, seq: Sequence, keep_ptr: int, keep_len: int, selected: int,
                      released_cap: int) -> None:
        """Validate `compact` with the same arguments without moving anything."""
        self._call("kvs_compact_check", byref(cache), byref(seq), keep_ptr, keep_len, selected, released_cap)

    def compact_into(self, cache: KvCache, seq: Sequence, keep_ptr: int, keep_len: int, selected: int,
                     dest_ptr: int, dest_len: int) -> None:
        """Out of place: the kept tokens to positions 0.. of the `dest` blocks (int32, fresh,
        none in the row); the row is only read."""
        self._call("kvs_compact_into", byref(cache), byref(seq), keep_ptr, keep_len, selected, dest_ptr, dest_len)

    def compact_into_check(self, cache: KvCache, seq: Sequence, keep_ptr: int, keep_len: int, selected: int,
                           dest_ptr: int, dest_len: int) -> None:
        """Validate `compact_into` with the same arguments without writing anything."""
        self._call("kvs_compact_into_check", byref(cache), byref(seq), keep_ptr, keep_len, selected, dest_ptr,
                   dest_len)

    def quest_update_blocks(self, cache: KvCache, blocks, filled, block_min, block_max) -> None:
        """Recompute the Quest min/max keys of `blocks` (int32) holding `filled` (int32) slots
        each, into one layer's `block_min`/`block_max` (float32 [num_blocks, key_ranges, kv_heads,
        head_dim]: the key ranges are what their length holds)."""
        self._call("kvs_quest_update_blocks", byref(cache), blocks.data_ptr(), filled.data_ptr(), blocks.numel(),
                   block_min.data_ptr(), block_max.data_ptr(), block_min.numel())

    def quest_select(self, cache: KvCache, rows: QuestRows, query, num_q_heads: int, block_min, block_max,
                     workspace, out, out_stride: int, pad: int = 0) -> None:
        """One layer's selection for a batch of decode rows: `query` [rows, q_heads, head_dim]
        (float32, float16 or bfloat16, contiguous) against the metadata; each row's kept blocks in
        sequence order into `out` (int32, row r at r * out_stride), the rest `pad`."""
        self._call("kvs_quest_select", byref(cache), byref(rows), query.data_ptr(),
                   DTYPE[str(query.dtype).removeprefix("torch.")], num_q_heads, block_min.data_ptr(),
                   block_max.data_ptr(), block_min.numel(), workspace.data_ptr(), workspace.numel(), out.data_ptr(),
                   out.numel(), out_stride, pad)

    def select(self, cache: KvCache, seq: Sequence, policy: str, params: PolicyParams, sel: TokenSelect,
               queries, scores, keep, n_scores: int | None = None, n_keep: int | None = None,
               rank=None) -> None:
        """One layer of one sequence: score by `policy` (snapkv with `queries`, float32
        [window, q_heads, head_dim]; knorm; streaming needs no scores) into `scores` and keep
        `sel.selected` tokens per KV head into `keep` (caller-owned: heads * cached_len float32,
        heads * selected int32; `n_scores`/`n_keep` when the buffers are longer). `rank`, when
        given, rewrites the scores before the selection reads them (`rank(scores[:n_scores])`,
        in place; decode SnapKV's carried scores)."""
        n_scores = scores.numel() if n_scores is None else n_scores
        n_keep = keep.numel() if n_keep is None else n_keep
        scores_ptr = None
        if policy == "knorm":
            self.score_knorm(cache, seq, scores.data_ptr(), n_scores)
            scores_ptr = scores.data_ptr()
        elif policy == "snapkv":
            args = SnapKvArgs(queries=queries.data_ptr(), queries_dtype=DTYPE["float32"], window=queries.shape[0],
                              num_q_heads=queries.shape[1], pool_kernel=params.pool_kernel, pool=params.pool)
            self.score_snapkv(cache, seq, args, scores.data_ptr(), n_scores)
            scores_ptr = scores.data_ptr()
        elif policy != "streaming":
            raise KvsieveError("KVS_STATUS_INVALID_ARGUMENT", f"policy {policy!r} does not evict tokens")
        if rank is not None and scores_ptr is not None:
            rank(scores[:n_scores])
        self.select_tokens(scores_ptr, n_scores, cache.num_kv_heads, sel, keep.data_ptr(), n_keep)

    def compress(self, cache: KvCache, seq: Sequence, policy: str, params: PolicyParams, sel: TokenSelect,
                 queries, scores, keep, released) -> int:
        """`select`, then compact the kept tokens to the front of the row (`released`: row_len
        int32). Returns the number of blocks released."""
        self.select(cache, seq, policy, params, sel, queries, scores, keep)
        return self.compact(cache, seq, keep.data_ptr(), keep.numel(), sel.selected, released.data_ptr(),
                            released.numel())


def nvrtc_search_path() -> str:
    """What libkvsieve's CUDA backend tries for NVRTC (`KVSIEVE_NVRTC`, `:`-separated) when the
    user set nothing: the NVRTC libraries of this Python environment (torch's
    `nvidia-cuda-nvrtc-cu12` wheel, `nvidia/cuda_nvrtc/lib`; the CUDA 13 wheels' `nvidia/cu13/lib`),
    newest first, then the plain names for the dynamic loader. The library passes over any NVRTC
    newer than the driver."""
    import glob
    import sys

    found = []
    for base in sys.path:
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.1[0-9]"):
            found += glob.glob(os.path.join(base or ".", pattern))
    found = sorted(dict.fromkeys(found), key=lambda p: p.rsplit(".so.", 1)[-1], reverse=True)
    return ":".join(found + ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"])


class CudaKernels(CpuKernels):
    """The CUDA backend: the same calls with device pointers (tensors on the device), enqueued on
    `stream` (a CUstream handle, e.g. `torch.cuda.current_stream().cuda_stream`; 0 for the
    default stream). Checks of device-resident data and host out-params arrive at
    `synchronize`. KVS_STATUS_NOT_COMPILED from a library built without the `cuda` feature."""

    def __init__(self, lib: Library, ordinal: int = 0, stream: int = 0):
        self._lib = lib
        self._handle = c_void_p()
        os.environ.setdefault("KVSIEVE_NVRTC", nvrtc_search_path())
        lib.check(lib._lib.kvs_kernels_new_cuda(ordinal, c_void_p(stream or None), byref(self._handle)))


class Config:
    """A validated kvsieve config (`kvs_config`), freed with the object."""

    def __init__(self, lib: Library, handle: c_void_p):
        self._lib, self._handle = lib, handle

    def __del__(self):
        if getattr(self, "_handle", None) and self._handle.value:
            self._lib._lib.kvs_config_free(self._handle)
            self._handle = c_void_p()

    def params(self, phase: int = PHASE_PREFILL) -> PolicyParams:
        out = PolicyParams()
        self._lib.check(self._lib._lib.kvs_config_policy_params(self._handle, phase, byref(out)))
        return out

    def selection(self) -> SelectionParams:
        """`kvs_config_selection_params`: the `[selection]` section (policy "none" without one)."""
        out = SelectionParams()
        self._lib.check(self._lib._lib.kvs_config_selection_params(self._handle, byref(out)))
        return out

    def plan_selection(self, seq_lens, block_size: int, keep, reduced_lens) -> None:
        """`kvs_plan_selection`: per row of `seq_lens` (int32, host), the blocks a decode step
        reads (`keep`) and the tokens that makes (`reduced_lens`), both int32 of the same length."""
        self._lib.check(self._lib._lib.kvs_plan_selection(self._handle, seq_lens.data_ptr(), seq_lens.numel(),
                                                          block_size, keep.data_ptr(), reduced_lens.data_ptr()))

    def selection_blocks(self, seq_lens: list[int], block_size: int) -> list[tuple[int, int]]:
        """`plan_selection` on a list (no torch): per length, (blocks read, tokens read)."""
        n = len(seq_lens)
        lens, keep, reduced = (ctypes.c_int32 * n)(*seq_lens), (ctypes.c_int32 * n)(), (ctypes.c_int32 * n)()
        self._lib.check(self._lib._lib.kvs_plan_selection(self._handle, lens, n, block_size, keep, reduced))
        return list(zip(keep, reduced))

    def for_request(self, opt_out: bool = False, budget_tokens: int = 0, budget_ratio: float = 0.0) -> "Config":
        """`kvs_config_for_request`: this config with one request's own budget (or with
        compression off), refused outside the config's `[requests]` bounds."""
        args = RequestArgs(int(bool(opt_out)), budget_tokens, budget_ratio)
        handle = c_void_p()
        self._lib.check(self._lib._lib.kvs_config_for_request(self._handle, byref(args), byref(handle)))
        return Config(self._lib, handle)

    def plan(self, logical_len: int, cached_len: int, protected_len: int, block_size: int,
             phase: int = PHASE_PREFILL) -> KeepPlan:
        """`kvs_plan_keep_count`: what an event in `phase` does to a sequence of these lengths."""
        lens = SequenceLengths(logical_len, cached_len, protected_len, block_size)
        out = KeepPlan()
        self._lib.check(self._lib._lib.kvs_plan_keep_count(self._handle, phase, byref(lens), byref(out)))
        return out

    def plan_event(self, phase: int, logical_len: int, cached_len: int, protected_len: int, block_size: int,
                   prompt_len: int = 0) -> KeepPlan:
        """The plan of an event of any phase (the one call the scheduler and the workers both
        make, so they agree): chunk events also need the prompt's length."""
        if phase == PHASE_PREFILL_CHUNK:
            return self.plan_chunk(logical_len, cached_len, protected_len, block_size, prompt_len)
        return self.plan(logical_len, cached_len, protected_len, block_size, phase)

    def max_cached_tokens(self, max_len: int, chunk: int, block_size: int) -> int:
        """`kvs_config_max_cached_tokens`: the most tokens one sequence holds (max_len unless
        every phase is bounded)."""
        out = c_uint64()
        self._lib.check(self._lib._lib.kvs_config_max_cached_tokens(self._handle, max_len, chunk, block_size,
                                                                    byref(out)))
        return out.value

    def plan_chunk(self, logical_len: int, cached_len: int, protected_len: int, block_size: int,
                   prompt_len: int) -> KeepPlan:
        """`kvs_plan_prefill_chunk`: an event between prefill chunks of a `prompt_len` prompt."""
        lens = SequenceLengths(logical_len, cached_len, protected_len, block_size)
        out = KeepPlan()
        self._lib.check(self._lib._lib.kvs_plan_prefill_chunk(self._handle, byref(lens), prompt_len, byref(out)))
        return out


_default: Library | None = None


def load() -> Library:
    """The process-wide library (loaded once)."""
    global _default
    if _default is None:
        _default = Library()
    return _default
