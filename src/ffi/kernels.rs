//! `kvs_kernels`: the backend handle, and the score / select / compact entry points.
//!
//! Buffers are the caller's: scores, keep lists, released-block lists and page tables are
//! written into memory the engine owns, sized by the counts it passes. On the CPU backend every
//! pointer is host memory; on the CUDA backend tensor and buffer pointers are device memory and
//! the small parameter structs stay on the host.

use super::boundary::{check_ptr, check_typed_ptr, ffi_boundary, ffi_void_boundary};
use super::regions::{check_disjoint, Region};
use crate::config::Pooling;
use crate::error::{Error, Result};
use crate::kernels::compact::{check_released, check_shape, compact, Compaction};
use crate::kernels::page_table::check_row_len;
use crate::kernels::score::knorm::check_knorm;
use crate::kernels::score::knorm::score_knorm;
use crate::kernels::score::quest::{
    check_block_fill, check_block_list, check_bound_shape, check_quest_sizes, meta_ranges,
};
use crate::kernels::score::quest::{
    quest_bound, quest_select, quest_update_block, quest_update_blocks, QuestRows,
};
use crate::kernels::score::snapkv::{score_snapkv, SnapKv};
use crate::kernels::score::to_f32_vec;
use crate::kernels::select::{
    select_blocks_csr, select_blocks_row, select_tokens, BlockSelect, TokenSelect,
};
use crate::kernels::{DType, Device, KvCache, KvCacheDesc};
use crate::status::Status;
use std::ffi::c_void;

/// A kernel backend. The CPU backend holds no state; it is `Send + Sync` and one handle may
/// serve every thread.
pub struct KvsKernels {
    device: Device,
    #[cfg(feature = "cuda")]
    cuda: Option<crate::cuda::CudaBackend>,
}

impl KvsKernels {
    /// The CUDA backend, if this is a CUDA handle.
    #[cfg(feature = "cuda")]
    pub(super) fn cuda(&self) -> Option<&crate::cuda::CudaBackend> {
        self.cuda.as_ref()
    }

    pub(super) fn cpu() -> KvsKernels {
        KvsKernels {
            device: Device::Cpu,
            #[cfg(feature = "cuda")]
            cuda: None,
        }
    }
}

/// Device address of a caller pointer (CUDA entry points pass them through to kernels).
#[cfg(feature = "cuda")]
fn addr<T>(p: *const T) -> u64 {
    p as u64
}

/// One sequence as the kernels see it (`kvs_sequence`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SequenceDesc {
    /// The sequence's physical block ids in order (`row_len` of them).
    pub row: *const i32,
    pub row_len: u32,
    /// Tokens whose K/V are cached now.
    pub cached_len: u32,
    /// Leading cached tokens never selected or moved (whole blocks; 0 without prefix sharing).
    pub protected_len: u32,
}

/// SnapKV scoring inputs (`kvs_snapkv_args`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SnapKvArgs {
    /// `[window][num_q_heads][head_dim]` observation-window queries, RoPE applied.
    pub queries: *const c_void,
    /// A `kvs_dtype` for `queries`.
    pub queries_dtype: u32,
    pub window: u32,
    pub num_q_heads: u32,
    /// Odd pooling width.
    pub pool_kernel: u32,
    /// A `kvs_pooling`.
    pub pool: u32,
}

/// Token-selection counts (`kvs_token_select`); take `selected` from `kvs_keep_plan` and the
/// sink/tail from `kvs_policy_params`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenSelectArgs {
    pub cached_len: u32,
    pub protected_len: u32,
    pub sink_tokens: u32,
    pub protected_tail: u32,
    pub selected: u32,
}

/// Block-selection counts (`kvs_block_select`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockSelectArgs {
    pub keep_blocks: u32,
    pub sink_blocks: u32,
    pub recent_blocks: u32,
}

/// dtype numbers as `kvs_dtype`.
#[repr(u32)]
pub enum DTypeId {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

/// Layout numbers as `kvs_layout` (see `kvs_kv_cache`).
#[repr(u32)]
pub enum LayoutId {
    /// `[num_blocks, block_size, kv_heads, head_dim]`, strides overridable.
    Nhd = 0,
    /// `[num_blocks, kv_heads, block_size, head_dim]`, strides overridable.
    Hnd = 1,
    /// vLLM CPU_ATTN vector path (f32): per (block, head) K `[D][BS]` then V `[BS][D]`.
    VllmCpuVec = 2,
    /// vLLM CPU_ATTN AMX path (bf16): K `[BS/16][D/2][16][2]`, V `[D/16][BS/2][16][2]`.
    VllmCpuAmx = 3,
}

/// Device numbers as `kvs_device`.
#[repr(u32)]
pub enum DeviceId {
    Cpu = 0,
    Cuda = 1,
}

fn publish(k: KvsKernels, out: *mut *mut KvsKernels) {
    // SAFETY: checked by `arg_out!` before any work.
    unsafe { *out = Box::into_raw(Box::new(k)) };
}

/// Make the CPU backend.
///
/// # Safety
/// `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn kvs_kernels_new_cpu(out: *mut *mut KvsKernels) -> Status {
    ffi_boundary("kvs_kernels_new_cpu", || {
        let out = arg_out!(out, "out");
        publish(KvsKernels::cpu(), out);
        Ok(())
    })
}

/// Make the CUDA backend on device `ordinal`, launching on `stream` (a `CUstream`; NULL for the
/// default stream). With it, tensor and buffer pointers passed to the kernel entry points are
/// device pointers and calls only enqueue work on the stream. Everything checkable on the host
/// (shapes, counts, overlapping buffers) fails the call itself, which then enqueues nothing.
/// Problems in device-resident data (block ids, keep lists, CSR page tables) are found on the
/// device and reported by `kvs_kernels_synchronize`, per call: the call that found one writes
/// nothing (no device output, no host out-param), and the calls after it run normally. Host
/// out-params (`*num_released`, `*num_kept`) are written by `kvs_kernels_synchronize` for the
/// calls that passed, so keep them alive until it returns. Statuses: `KVS_STATUS_NOT_COMPILED`
/// (built without the `cuda` feature), `KVS_STATUS_NO_CUDA_DRIVER` (no libcuda / libnvrtc),
/// `KVS_STATUS_NO_DEVICE`, and `KVS_STATUS_CUDA_ERROR` when the start-up self-check finds the
/// kernels wrong on this device (a small probe scored, selected and compacted on the device and
/// by the CPU reference; the message names the call, dtype, layout, device and driver).
///
/// # Safety
/// `out` must be writable; `stream` must be NULL or a live stream of that device that outlives
/// the backend.
#[no_mangle]
pub unsafe extern "C" fn kvs_kernels_new_cuda(
    ordinal: u32,
    stream: *mut c_void,
    out: *mut *mut KvsKernels,
) -> Status {
    ffi_boundary("kvs_kernels_new_cuda", || {
        let out = arg_out!(out, "out");
        #[cfg(feature = "cuda")]
        {
            let backend = crate::cuda::CudaBackend::new(ordinal, stream)?;
            let handle = KvsKernels {
                device: Device::Cuda,
                cuda: Some(backend),
            };
            // No handle before the kernels proved themselves on this device.
            super::self_check::self_check(&handle)?;
            publish(handle, out);
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (ordinal, stream, out);
            Err(Error::new(
                Status::NotCompiled,
                "this libkvsieve was built without the `cuda` feature; rebuild with `cargo build --release --features cuda`",
            ))
        }
    })
}

/// Wait for the backend's work, write the host out-params of the calls that passed, and report
/// the calls since the last synchronize whose device-side checks failed
/// (`KVS_STATUS_INVALID_ARGUMENT`, naming each failed call by its number since the last
/// synchronize, its entry point and the offending index). A no-op on the CPU backend, whose
/// calls report everything synchronously.
///
/// # Safety
/// `kernels` must be a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvs_kernels_synchronize(kernels: *const KvsKernels) -> Status {
    ffi_boundary("kvs_kernels_synchronize", || {
        let _k = arg_ref!(kernels, "kernels");
        #[cfg(feature = "cuda")]
        if let Some(cu) = &_k.cuda {
            return cu.synchronize();
        }
        Ok(())
    })
}

/// Reserve, up front, the device scratch the backend's calls would otherwise grow on demand:
/// enough for any score / select / compact call on one sequence of up to `max_cached_len`
/// cached tokens of `cache`'s geometry (SnapKV with `window` queries of `num_q_heads` heads;
/// pass 0 for both without SnapKV), and block marks for `cache.num_blocks` blocks. An engine
/// calls it while it measures its own memory, before it sizes the KV cache, so the scratch is
/// counted; later calls within these bounds allocate nothing. Only `cache`'s geometry is read,
/// never its memory (any aligned non-NULL `k` will do before the cache exists). A check of the
/// arguments only on the CPU backend, which keeps no scratch.
///
/// # Safety
/// `kernels` a live handle; `cache` readable.
#[no_mangle]
pub unsafe extern "C" fn kvs_kernels_reserve(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    max_cached_len: u32,
    window: u32,
    num_q_heads: u32,
) -> Status {
    ffi_boundary("kvs_kernels_reserve", || {
        let k = arg_ref!(kernels, "kernels");
        let c = KvCache::new(arg_ref!(cache, "cache"))?;
        c.require_device(k.device)?;
        if (window == 0) != (num_q_heads == 0) {
            return Err(Error::invalid_arg(format!(
                "window = {window}, num_q_heads = {num_q_heads}: pass both for SnapKV, or both 0"
            )));
        }
        if num_q_heads != 0 && num_q_heads as usize % c.num_kv_heads != 0 {
            return Err(Error::invalid_arg(format!(
                "num_q_heads = {num_q_heads} is not a multiple of cache.num_kv_heads = {}",
                c.num_kv_heads
            )));
        }
        #[cfg(feature = "cuda")]
        if let Some(cu) = &k.cuda {
            return cu.reserve(
                &c,
                max_cached_len as usize,
                window as usize,
                num_q_heads as usize,
            );
        }
        let _ = max_cached_len;
        Ok(())
    })
}

/// Release a backend. NULL is a no-op.
///
/// # Safety
/// `kernels` must be NULL or a live handle, freed once.
#[no_mangle]
pub unsafe extern "C" fn kvs_kernels_free(kernels: *mut KvsKernels) {
    ffi_void_boundary("kvs_kernels_free", || {
        if !kernels.is_null() {
            // SAFETY: made by `publish`, freed once by contract.
            drop(unsafe { Box::from_raw(kernels) });
        }
    })
}

/// The backend's device (a `kvs_device`) into `*out`.
///
/// # Safety
/// Live handle, writable `out`.
#[no_mangle]
pub unsafe extern "C" fn kvs_kernels_device(kernels: *const KvsKernels, out: *mut u32) -> Status {
    ffi_boundary("kvs_kernels_device", || {
        let out = arg_out!(out, "out");
        let k = arg_ref!(kernels, "kernels");
        // SAFETY: checked.
        unsafe { *out = k.device as u32 };
        Ok(())
    })
}

/// The element offset (from the K or V base, in elements) of `(block, head, slot, d)` in a
/// cache, for `kind` 0 (K) or 1 (V). Lets an engine, or a test, check kvsieve's reading of a
/// layout against its own writes (vLLM's CPU packings are probed this way).
///
/// # Safety
/// `cache` readable, `out` writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_kv_cache_offset(
    cache: *const KvCacheDesc,
    kind: u32,
    block: u32,
    head: u32,
    slot: u32,
    d: u32,
    out: *mut u64,
) -> Status {
    ffi_boundary("kvs_kv_cache_offset", || {
        let out = arg_out!(out, "out");
        let c = KvCache::new(arg_ref!(cache, "cache"))?;
        let (b, h, s, e) = (block as usize, head as usize, slot as usize, d as usize);
        if b >= c.num_blocks || h >= c.num_kv_heads || s >= c.block_size || e >= c.head_dim {
            return Err(Error::invalid_arg(format!(
                "(block, head, slot, d) = ({b}, {h}, {s}, {e}) is outside ({}, {}, {}, {})",
                c.num_blocks, c.num_kv_heads, c.block_size, c.head_dim
            )));
        }
        let off = match kind {
            0 => c.k_offset(b, h, s, e),
            1 => c.v_offset(b, h, s, e),
            _ => {
                return Err(Error::invalid_arg(format!(
                    "kind = {kind}; use 0 for K or 1 for V"
                )))
            }
        };
        // SAFETY: checked by `arg_out!`.
        unsafe { *out = off as u64 };
        Ok(())
    })
}

/// The validated cache and sequence of a call, on the CPU backend.
fn host_inputs<'a>(
    kernels: &KvsKernels,
    cache: &KvCacheDesc,
    seq: &'a SequenceDesc,
) -> Result<(KvCache, &'a [i32])> {
    let cache = host_cache(kernels, cache)?;
    let row = arg_slice!(seq.row, seq.row_len, "seq.row");
    Ok((cache, row))
}

/// The cache of a host-backend call (CPU handle, host tensors), for entry points without a row.
fn host_cache(kernels: &KvsKernels, cache: &KvCacheDesc) -> Result<KvCache> {
    let cache = KvCache::new(cache)?;
    if kernels.device != Device::Cpu {
        return Err(Error::unsupported(
            "this entry point has no CUDA kernel in this build",
        ));
    }
    cache.require_device(Device::Cpu)?;
    Ok(cache)
}

/// SnapKV scores of one sequence and layer into `scores[num_kv_heads][cached_len]`.
///
/// # Safety
/// Pointers as documented on the structs; `scores` holds `scores_len` floats.
#[no_mangle]
pub unsafe extern "C" fn kvs_score_snapkv(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    seq: *const SequenceDesc,
    args: *const SnapKvArgs,
    scores: *mut f32,
    scores_len: usize,
) -> Status {
    ffi_boundary("kvs_score_snapkv", || {
        let (kernels, cache, seq, args) = (
            arg_ref!(kernels, "kernels"),
            arg_ref!(cache, "cache"),
            arg_ref!(seq, "seq"),
            arg_ref!(args, "args"),
        );
        let qdtype = DType::from_u32(args.queries_dtype, "args.queries_dtype")?;
        let pool = match args.pool {
            0 => Pooling::Max,
            1 => Pooling::Avg,
            v => {
                return Err(Error::invalid_arg(format!(
                    "args.pool = {v} is not a kvs_pooling (0 max, 1 avg)"
                )))
            }
        };
        let p = SnapKv {
            cached_len: seq.cached_len as usize,
            window: args.window as usize,
            num_q_heads: args.num_q_heads as usize,
            pool_kernel: args.pool_kernel as usize,
            pool,
        };
        let kv = KvCache::new(cache)?;
        let nq = p
            .window
            .saturating_mul(p.num_q_heads)
            .saturating_mul(kv.head_dim);
        let [k, v] = Region::kv(&kv, false);
        check_disjoint(&[
            k,
            v,
            Some(Region::read("seq.row", seq.row, seq.row_len as usize)),
            Some(Region::read(
                "args.queries",
                args.queries as *const u8,
                nq * qdtype.size(),
            )),
            Some(Region::write("scores", scores, scores_len)),
        ])?;
        // Pointer checks for both backends: a NULL on the device is a fault that poisons the
        // engine's whole CUDA context.
        check_ptr(seq.row, "seq.row")?;
        check_ptr(scores, "scores")?;
        check_typed_ptr(args.queries, qdtype, "args.queries")?;
        p.check(&kv, nq, scores_len)?;
        check_row_len(seq.row_len as usize, p.cached_len.div_ceil(kv.block_size))?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &kernels.cuda {
            let cache = kv;
            return cu.snapkv(
                &cache,
                addr(seq.row),
                seq.row_len as usize,
                addr(args.queries),
                qdtype as u64,
                &p,
                addr(scores),
                scores_len,
            );
        }
        let (cache, row) = host_inputs(kernels, cache, seq)?;
        // SAFETY: the caller promises window * num_q_heads * head_dim elements.
        let q = unsafe { to_f32_vec(args.queries as *const u8, qdtype, nq) };
        let out = arg_slice_mut!(scores, scores_len, "scores");
        // SAFETY: validated cache of live host tensors.
        unsafe { score_snapkv(&cache, row, &q, &p, out) }
    })
}

/// Key-norm scores (−‖K‖₂) of one sequence and layer into `scores[num_kv_heads][cached_len]`.
///
/// # Safety
/// Pointers as documented; `scores` holds `scores_len` floats.
#[no_mangle]
pub unsafe extern "C" fn kvs_score_knorm(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    seq: *const SequenceDesc,
    scores: *mut f32,
    scores_len: usize,
) -> Status {
    ffi_boundary("kvs_score_knorm", || {
        let (kernels, cache, seq) = (
            arg_ref!(kernels, "kernels"),
            arg_ref!(cache, "cache"),
            arg_ref!(seq, "seq"),
        );
        let kv = KvCache::new(cache)?;
        let [k, v] = Region::kv(&kv, false);
        check_disjoint(&[
            k,
            v,
            Some(Region::read("seq.row", seq.row, seq.row_len as usize)),
            Some(Region::write("scores", scores, scores_len)),
        ])?;
        check_ptr(seq.row, "seq.row")?;
        check_ptr(scores, "scores")?;
        check_knorm(
            &kv,
            seq.row_len as usize,
            seq.cached_len as usize,
            scores_len,
        )?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &kernels.cuda {
            let cache = KvCache::new(cache)?;
            return cu.knorm(
                &cache,
                addr(seq.row),
                seq.row_len as usize,
                seq.cached_len as usize,
                addr(scores),
                scores_len,
            );
        }
        let (cache, row) = host_inputs(kernels, cache, seq)?;
        let out = arg_slice_mut!(scores, scores_len, "scores");
        // SAFETY: validated cache of live host tensors.
        unsafe { score_knorm(&cache, row, seq.cached_len as usize, out) }
    })
}

/// Choose, per KV head, the `args.selected` cached positions to keep: sinks and the protected
/// tail always, the rest by top score (ties to the earlier position). `scores` is
/// `[num_kv_heads][cached_len]`, or NULL for streaming (keep the most recent). Writes
/// `keep[num_kv_heads][selected]`, each row ascending.
///
/// # Safety
/// `scores` NULL or `scores_len` floats; `keep` holds `keep_len` entries.
#[no_mangle]
pub unsafe extern "C" fn kvs_select_tokens(
    kernels: *const KvsKernels,
    scores: *const f32,
    scores_len: usize,
    num_kv_heads: u32,
    args: *const TokenSelectArgs,
    keep: *mut u32,
    keep_len: usize,
) -> Status {
    ffi_boundary("kvs_select_tokens", || {
        let _kernels = arg_ref!(kernels, "kernels");
        let a = arg_ref!(args, "args");
        let p = TokenSelect {
            cached_len: a.cached_len as usize,
            protected_len: a.protected_len as usize,
            sink_tokens: a.sink_tokens as usize,
            protected_tail: a.protected_tail as usize,
            selected: a.selected as usize,
        };
        check_disjoint(&[
            Some(Region::read("scores", scores, scores_len)),
            Some(Region::write("keep", keep, keep_len)),
        ])?;
        if !scores.is_null() {
            check_ptr(scores, "scores")?; // NULL: streaming, by recency
        }
        check_ptr(keep, "keep")?;
        p.check_buffers(
            num_kv_heads as usize,
            (!scores.is_null()).then_some(scores_len),
            keep_len,
        )?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &_kernels.cuda {
            return cu.select_tokens(
                addr(scores),
                scores_len,
                num_kv_heads as usize,
                &p,
                addr(keep),
                keep_len,
            );
        }
        let s = if scores.is_null() {
            None
        } else {
            Some(arg_slice!(scores, scores_len, "scores"))
        };
        let out = arg_slice_mut!(keep, keep_len, "keep");
        select_tokens(s, num_kv_heads as usize, &p, out)
    })
}

/// Move each head's kept tokens (`keep[num_kv_heads][selected]`, ascending, within
/// `[protected_len, cached_len)`) to the slots right after the protected prefix, K and V, in
/// place. Writes the ids of the blocks past the new end (`row[ceil((protected_len + selected) /
/// block_size) .. ceil(cached_len / block_size)]`) to `released` and their count to
/// `*num_released`. Everything is validated before the first byte moves.
///
/// # Safety
/// Pointers as documented; `released` holds `released_cap` entries.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_compact(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    seq: *const SequenceDesc,
    keep: *const u32,
    keep_len: usize,
    selected: u32,
    released: *mut i32,
    released_cap: usize,
    num_released: *mut u32,
) -> Status {
    ffi_boundary("kvs_compact", || {
        let num_released = arg_out!(num_released, "num_released");
        let target = Target::InPlace {
            released_cap,
            out: Some((released, num_released)),
        };
        // SAFETY: forwarded caller pointers, as documented above.
        unsafe { compaction(kernels, cache, seq, keep, keep_len, selected, target) }
    })
}

/// Validate a compaction exactly as `kvs_compact` would (same arguments, with `released_cap`
/// the capacity the real call will pass), moving and writing nothing: an engine checks every
/// layer of an event this way before the first byte of any layer moves. On the CUDA backend the
/// checks of device-resident data are reported by `kvs_kernels_synchronize`.
///
/// # Safety
/// Pointers as documented on `kvs_compact`.
#[no_mangle]
pub unsafe extern "C" fn kvs_compact_check(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    seq: *const SequenceDesc,
    keep: *const u32,
    keep_len: usize,
    selected: u32,
    released_cap: usize,
) -> Status {
    ffi_boundary("kvs_compact_check", || {
        let target = Target::InPlace {
            released_cap,
            out: None,
        };
        // SAFETY: forwarded caller pointers, as documented on kvs_compact.
        unsafe { compaction(kernels, cache, seq, keep, keep_len, selected, target) }
    })
}

/// Out-of-place compaction: each head's kept tokens (as for `kvs_compact`) are written, K and
/// V, to positions `0..selected` of the blocks `dest[0..dest_len]` (`dest_len` =
/// `ceil(selected / block_size)`; fresh blocks, none of them in `seq.row`), and the row is only
/// read. Use it when the row's blocks may be shared (a prefix cache): the sequence continues on
/// `row[..protected_len / block_size]` followed by `dest`, and every block of the row from the
/// protected prefix to `ceil(cached_len / block_size)` can be given back with its contents
/// intact. Validated before the first byte is written, like `kvs_compact`.
///
/// # Safety
/// Pointers as documented on `kvs_compact`; `dest` holds `dest_len` ids.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_compact_into(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    seq: *const SequenceDesc,
    keep: *const u32,
    keep_len: usize,
    selected: u32,
    dest: *const i32,
    dest_len: u32,
) -> Status {
    ffi_boundary("kvs_compact_into", || {
        let target = Target::Into {
            dest,
            dest_len: dest_len as usize,
            run: true,
        };
        // SAFETY: forwarded caller pointers, as documented above.
        unsafe { compaction(kernels, cache, seq, keep, keep_len, selected, target) }
    })
}

/// Validate an out-of-place compaction exactly as `kvs_compact_into` would, writing nothing.
///
/// # Safety
/// Pointers as documented on `kvs_compact_into`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_compact_into_check(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    seq: *const SequenceDesc,
    keep: *const u32,
    keep_len: usize,
    selected: u32,
    dest: *const i32,
    dest_len: u32,
) -> Status {
    ffi_boundary("kvs_compact_into_check", || {
        let target = Target::Into {
            dest,
            dest_len: dest_len as usize,
            run: false,
        };
        // SAFETY: forwarded caller pointers, as documented on kvs_compact_into.
        unsafe { compaction(kernels, cache, seq, keep, keep_len, selected, target) }
    })
}

/// Where a compaction call puts the kept tokens, and whether it moves them.
#[derive(Clone, Copy)]
enum Target {
    /// In the row; `out` = the released ids and their count (None: validate only).
    InPlace {
        released_cap: usize,
        out: Option<(*mut i32, *mut u32)>,
    },
    /// Into the `dest` blocks (`run` false: validate only).
    Into {
        dest: *const i32,
        dest_len: usize,
        run: bool,
    },
}

/// The body of the four compaction entry points.
unsafe fn compaction(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    seq: *const SequenceDesc,
    keep: *const u32,
    keep_len: usize,
    selected: u32,
    target: Target,
) -> Result<()> {
    let (kernels, cache, seq) = (
        arg_ref!(kernels, "kernels"),
        arg_ref!(cache, "cache"),
        arg_ref!(seq, "seq"),
    );
    let (out, released_cap) = match target {
        Target::InPlace { released_cap, out } => (out, released_cap),
        Target::Into { .. } => (None, 0),
    };
    let dest = match target {
        Target::Into { dest, dest_len, .. } => Some((dest, dest_len)),
        Target::InPlace { .. } => None,
    };
    let kv = KvCache::new(cache)?;
    let [k, v] = Region::kv(&kv, true);
    check_disjoint(&[
        k,
        v,
        Some(Region::read("seq.row", seq.row, seq.row_len as usize)),
        Some(Region::read("keep", keep, keep_len)),
        out.map(|(r, _)| Region::write("released", r, released_cap)),
        out.map(|(_, n)| Region::write("num_released", n, 1)),
        dest.map(|(d, n)| Region::read("dest", d, n)),
    ])?;
    check_ptr(seq.row, "seq.row")?;
    check_ptr(keep, "keep")?;
    if let Some((released, _)) = out {
        check_ptr(released, "released")?;
    }
    if let Some((d, _)) = dest {
        check_ptr(d, "dest")?;
    }
    let release = check_shape(
        &kv,
        seq.row_len as usize,
        seq.cached_len as usize,
        seq.protected_len as usize,
        keep_len,
        selected as usize,
        dest.map(|(_, n)| n),
    )?;
    if out.is_some() {
        check_released(released_cap, &release)?;
    }
    #[cfg(feature = "cuda")]
    if let Some(cu) = &kernels.cuda {
        let cache = KvCache::new(cache)?;
        let seq_args = crate::cuda::SeqArgs {
            row: addr(seq.row),
            row_len: seq.row_len as usize,
            cached_len: seq.cached_len as usize,
            protected_len: seq.protected_len as usize,
            keep: addr(keep),
            keep_len,
            selected: selected as usize,
        };
        return match target {
            // `*num_released` is written at kvs_kernels_synchronize, once the device-side
            // checks of this call are known to have passed.
            Target::InPlace { released_cap, out } => cu.compact(
                &cache,
                &seq_args,
                released_cap,
                out.map(|(r, n)| (addr(r), n)),
            ),
            Target::Into {
                dest,
                dest_len,
                run,
            } => cu.compact_into(&cache, &seq_args, addr(dest), dest_len, run),
        };
    }
    let (cache, row) = host_inputs(kernels, cache, seq)?;
    let req = Compaction {
        row,
        cached_len: seq.cached_len as usize,
        protected_len: seq.protected_len as usize,
        keep: arg_slice!(keep, keep_len, "keep"),
        selected: selected as usize,
        dest: match dest {
            Some((d, n)) => Some(arg_slice!(d, n, "dest")),
            None => None,
        },
    };
    let range = req.check(&cache)?;
    match target {
        Target::Into { run, .. } => {
            if run {
                // SAFETY: validated cache of live host tensors.
                unsafe { compact(&cache, &req)? };
            }
            Ok(())
        }
        Target::InPlace { released_cap, out } => {
            check_released(released_cap, &range)?;
            let Some((released, num_released)) = out else {
                return Ok(());
            };
            let ids = arg_slice_mut!(released, released_cap, "released");
            // SAFETY: validated cache of live host tensors.
            let range = unsafe { compact(&cache, &req)? };
            ids[..range.len()].copy_from_slice(&row[range.clone()]);
            // SAFETY: checked by `arg_out!` in kvs_compact.
            unsafe { *num_released = range.len() as u32 };
            Ok(())
        }
    }
}

/// Recompute Quest metadata of physical block `block` from its first `filled` slots into
/// `block_min`/`block_max` (`[num_blocks][key_ranges][num_kv_heads][head_dim]` f32 each,
/// `meta_len` floats). `key_ranges` is what `meta_len` holds: 1 (Quest's, a range per block)
/// or a divisor of the block size (`selection.key_ranges`), range `r` spanning slots
/// `r * block_size / key_ranges..`; the same `meta_len` must reach every Quest call.
///
/// # Safety
/// Pointers as documented.
#[no_mangle]
pub unsafe extern "C" fn kvs_quest_update_block(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    block: u32,
    filled: u32,
    block_min: *mut f32,
    block_max: *mut f32,
    meta_len: usize,
) -> Status {
    ffi_boundary("kvs_quest_update_block", || {
        let (kernels, cache) = (arg_ref!(kernels, "kernels"), arg_ref!(cache, "cache"));
        let [k, v] = Region::kv(&KvCache::new(cache)?, false);
        check_disjoint(&[
            k,
            v,
            Some(Region::write("block_min", block_min, meta_len)),
            Some(Region::write("block_max", block_max, meta_len)),
        ])?;
        check_ptr(block_min, "block_min")?;
        check_ptr(block_max, "block_max")?;
        let kv = KvCache::new(cache)?;
        meta_ranges(&kv, meta_len, meta_len)?;
        check_block_fill(&kv, block as usize, filled as usize)?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &kernels.cuda {
            let cache = KvCache::new(cache)?;
            return cu.quest_update(
                &cache,
                block as usize,
                filled as usize,
                addr(block_min),
                addr(block_max),
                meta_len,
            );
        }
        let cache = host_cache(kernels, cache)?;
        let (lo, hi) = (
            arg_slice_mut!(block_min, meta_len, "block_min"),
            arg_slice_mut!(block_max, meta_len, "block_max"),
        );
        // SAFETY: validated cache of live host tensors.
        unsafe { quest_update_block(&cache, block as usize, filled as usize, lo, hi) }
    })
}

/// `kvs_quest_update_block` for `count` blocks of one layer in one call: `blocks[i]` holding
/// `filled[i]` slots (the blocks a step filled, or those a compaction rewrote). Every entry is
/// checked before any metadata is written.
///
/// # Safety
/// Pointers as documented; `blocks` and `filled` hold `count` entries (host memory).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_quest_update_blocks(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    blocks: *const i32,
    filled: *const i32,
    count: u32,
    block_min: *mut f32,
    block_max: *mut f32,
    meta_len: usize,
) -> Status {
    ffi_boundary("kvs_quest_update_blocks", || {
        let (kernels, desc) = (arg_ref!(kernels, "kernels"), arg_ref!(cache, "cache"));
        let kv = KvCache::new(desc)?;
        let [k, v] = Region::kv(&kv, false);
        check_disjoint(&[
            k,
            v,
            Some(Region::read("blocks", blocks, count as usize)),
            Some(Region::read("filled", filled, count as usize)),
            Some(Region::write("block_min", block_min, meta_len)),
            Some(Region::write("block_max", block_max, meta_len)),
        ])?;
        check_ptr(block_min, "block_min")?;
        check_ptr(block_max, "block_max")?;
        let (ids, fills) = (
            arg_slice!(blocks, count, "blocks"),
            arg_slice!(filled, count, "filled"),
        );
        meta_ranges(&kv, meta_len, meta_len)?;
        check_block_list(&kv, ids, fills)?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &kernels.cuda {
            return cu.quest_update_blocks(
                &kv,
                ids,
                fills,
                addr(block_min),
                addr(block_max),
                meta_len,
            );
        }
        let cache = host_cache(kernels, desc)?;
        let (lo, hi) = (
            arg_slice_mut!(block_min, meta_len, "block_min"),
            arg_slice_mut!(block_max, meta_len, "block_max"),
        );
        // SAFETY: validated cache of live host tensors.
        unsafe { quest_update_blocks(&cache, ids, fills, lo, hi) }
    })
}

/// Quest bounds of the blocks of `seq.row` for one decode query (`[num_q_heads][head_dim]`,
/// dtype `query_dtype`), maxed over query heads and key ranges, into `block_scores[row_len]`.
///
/// # Safety
/// Pointers as documented.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_quest_bound(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    seq: *const SequenceDesc,
    query: *const c_void,
    query_dtype: u32,
    num_q_heads: u32,
    block_min: *const f32,
    block_max: *const f32,
    meta_len: usize,
    block_scores: *mut f32,
    block_scores_len: usize,
) -> Status {
    ffi_boundary("kvs_quest_bound", || {
        let (kernels, cache, seq) = (
            arg_ref!(kernels, "kernels"),
            arg_ref!(cache, "cache"),
            arg_ref!(seq, "seq"),
        );
        let qd = DType::from_u32(query_dtype, "query_dtype")?;
        let nq = (num_q_heads as usize).saturating_mul(KvCache::new(cache)?.head_dim);
        check_disjoint(&[
            Some(Region::read("seq.row", seq.row, seq.row_len as usize)),
            Some(Region::read("query", query as *const u8, nq * qd.size())),
            Some(Region::read("block_min", block_min, meta_len)),
            Some(Region::read("block_max", block_max, meta_len)),
            Some(Region::write(
                "block_scores",
                block_scores,
                block_scores_len,
            )),
        ])?;
        check_ptr(seq.row, "seq.row")?;
        check_typed_ptr(query, qd, "query")?;
        check_ptr(block_min, "block_min")?;
        check_ptr(block_max, "block_max")?;
        check_ptr(block_scores, "block_scores")?;
        let kv = KvCache::new(cache)?;
        meta_ranges(&kv, meta_len, meta_len)?;
        check_bound_shape(
            &kv,
            seq.row_len as usize,
            num_q_heads as usize,
            nq,
            block_scores_len,
        )?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &kernels.cuda {
            let cache = KvCache::new(cache)?;
            return cu.quest_bound(
                &cache,
                addr(seq.row),
                seq.row_len as usize,
                addr(query),
                qd as u64,
                num_q_heads as usize,
                addr(block_min),
                addr(block_max),
                meta_len,
                addr(block_scores),
                block_scores_len,
            );
        }
        let (cache, row) = host_inputs(kernels, cache, seq)?;
        // SAFETY: the caller promises num_q_heads * head_dim elements.
        let q = unsafe { to_f32_vec(query as *const u8, qd, nq) };
        let (lo, hi) = (
            arg_slice!(block_min, meta_len, "block_min"),
            arg_slice!(block_max, meta_len, "block_max"),
        );
        let out = arg_slice_mut!(block_scores, block_scores_len, "block_scores");
        quest_bound(&cache, row, &q, num_q_heads as usize, lo, hi, out)
    })
}

/// The decode rows of one `kvs_quest_select` call (`kvs_quest_rows`), in vLLM's dense block
/// table form.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct QuestRowsDesc {
    /// `[num_rows][stride]` block ids: row r's first `blocks[r]` are its blocks in order.
    pub table: *const i32,
    pub num_rows: u32,
    pub stride: u32,
    /// `[num_rows]`: blocks in each row (1..=stride).
    pub blocks: *const i32,
    /// `[num_rows]`: blocks each row keeps when it has more; the same for every layer of a step.
    pub keep: *const i32,
    /// Leading blocks always kept (1: the attention sinks' block).
    pub sink_blocks: u32,
    /// How much of each block's key range (min..max per channel) its score counts, in 0..=1:
    /// 1 is Quest's upper bound of q.k over the block, smaller values shrink the range about
    /// its centre (`kvs_selection_params.spread`, from the config).
    pub spread: f32,
}

/// One layer's Quest selection for a batch of decode rows: each row's blocks scored by its
/// query (`[num_rows][num_q_heads][head_dim]`, dtype `query_dtype`) against `block_min` /
/// `block_max` (`meta_len` floats each, see `kvs_quest_update_block`): the bound of q.k over
/// each block's key range shrunk about its centre to `rows.spread` of its width (1: Quest's
/// bound, as `kvs_quest_bound`), max over query heads and key ranges. The `keep[r]` best, the first
/// `sink_blocks` and the last block always among them, are written in sequence order to
/// `out[r * out_stride..]`, the rest of each row set to `pad`. `workspace` (`workspace_len`
/// floats, at least `num_rows * stride`) is the caller's and holds the scores afterwards.
/// On a CUDA handle every array is device memory and the rows are checked on the device (a bad
/// row fails the call at `kvs_kernels_synchronize`, nothing written); the scores and rows equal
/// the CPU's bit for bit.
///
/// # Safety
/// Pointers as documented.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_quest_select(
    kernels: *const KvsKernels,
    cache: *const KvCacheDesc,
    rows: *const QuestRowsDesc,
    query: *const c_void,
    query_dtype: u32,
    num_q_heads: u32,
    block_min: *const f32,
    block_max: *const f32,
    meta_len: usize,
    workspace: *mut f32,
    workspace_len: usize,
    out: *mut i32,
    out_len: usize,
    out_stride: u32,
    pad: i32,
) -> Status {
    ffi_boundary("kvs_quest_select", || {
        let (kernels, desc, rows) = (
            arg_ref!(kernels, "kernels"),
            arg_ref!(cache, "cache"),
            arg_ref!(rows, "rows"),
        );
        let qd = DType::from_u32(query_dtype, "query_dtype")?;
        let kv = KvCache::new(desc)?;
        let n = rows.num_rows as usize;
        let table_len = n.saturating_mul(rows.stride as usize);
        let nq = n
            .saturating_mul(num_q_heads as usize)
            .saturating_mul(kv.head_dim);
        check_disjoint(&[
            Some(Region::read("rows.table", rows.table, table_len)),
            Some(Region::read("rows.blocks", rows.blocks, n)),
            Some(Region::read("rows.keep", rows.keep, n)),
            Some(Region::read(
                "query",
                query as *const u8,
                nq.saturating_mul(qd.size()),
            )),
            Some(Region::read("block_min", block_min, meta_len)),
            Some(Region::read("block_max", block_max, meta_len)),
            Some(Region::write("workspace", workspace, workspace_len)),
            Some(Region::write("out", out, out_len)),
        ])?;
        check_typed_ptr(query, qd, "query")?;
        // The sizes first: the query is read (and converted) only for a call that fits them.
        meta_ranges(&kv, meta_len, meta_len)?;
        check_quest_sizes(
            &kv,
            n,
            rows.stride as usize,
            num_q_heads as usize,
            workspace_len,
            out_len,
            out_stride as usize,
        )?;
        for (p, name) in [
            (rows.table, "rows.table"),
            (rows.blocks, "rows.blocks"),
            (rows.keep, "rows.keep"),
        ] {
            check_ptr(p, name)?;
        }
        check_ptr(block_min, "block_min")?;
        check_ptr(block_max, "block_max")?;
        check_ptr(workspace, "workspace")?;
        check_ptr(out, "out")?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &kernels.cuda {
            let dev = crate::cuda::QuestRowsDev {
                table: addr(rows.table),
                num_rows: n,
                stride: rows.stride as usize,
                blocks: addr(rows.blocks),
                keep: addr(rows.keep),
                sink_blocks: rows.sink_blocks as usize,
                spread: rows.spread,
            };
            return cu.quest_select(
                &kv,
                &dev,
                addr(query),
                qd as u64,
                num_q_heads as usize,
                addr(block_min),
                addr(block_max),
                meta_len,
                addr(workspace),
                workspace_len,
                addr(out),
                out_len,
                out_stride as usize,
                pad,
            );
        }
        let cache = host_cache(kernels, desc)?;
        let sel = QuestRows {
            table: arg_slice!(rows.table, table_len, "rows.table"),
            stride: rows.stride as usize,
            blocks: arg_slice!(rows.blocks, n, "rows.blocks"),
            keep: arg_slice!(rows.keep, n, "rows.keep"),
            sink_blocks: rows.sink_blocks as usize,
            spread: rows.spread,
        };
        // SAFETY: the caller promises num_rows * num_q_heads * head_dim elements.
        let q = unsafe { to_f32_vec(query as *const u8, qd, nq) };
        quest_select(
            &cache,
            &sel,
            &q,
            num_q_heads as usize,
            arg_slice!(block_min, meta_len, "block_min"),
            arg_slice!(block_max, meta_len, "block_max"),
            arg_slice_mut!(workspace, workspace_len, "workspace"),
            arg_slice_mut!(out, out_len, "out"),
            out_stride as usize,
            pad,
        )
    })
}

/// Block-level top-k for a batch in FlashInfer CSR form. Inputs: `indptr[num_seqs + 1]`,
/// `indices[nnz]`, `last_page_len[num_seqs]`, `block_scores[nnz]` (aligned with `indices`).
/// Outputs: `out_indptr[num_seqs + 1]`, kept ids in order in `out_indices` (capacity
/// `out_indices_cap`; `nnz` always suffices), `out_last_page_len[num_seqs]`.
///
/// # Safety
/// Pointers as documented.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_select_blocks_csr(
    kernels: *const KvsKernels,
    indptr: *const i32,
    num_seqs: u32,
    indices: *const i32,
    nnz: usize,
    last_page_len: *const i32,
    block_scores: *const f32,
    args: *const BlockSelectArgs,
    out_indptr: *mut i32,
    out_indices: *mut i32,
    out_indices_cap: usize,
    out_last_page_len: *mut i32,
) -> Status {
    ffi_boundary("kvs_select_blocks_csr", || {
        let _kernels = arg_ref!(kernels, "kernels");
        let a = arg_ref!(args, "args");
        let n = num_seqs as usize;
        let p = BlockSelect {
            keep_blocks: a.keep_blocks as usize,
            sink_blocks: a.sink_blocks as usize,
            recent_blocks: a.recent_blocks as usize,
        };
        check_disjoint(&[
            Some(Region::read("indptr", indptr, n + 1)),
            Some(Region::read("indices", indices, nnz)),
            Some(Region::read("last_page_len", last_page_len, n)),
            Some(Region::read("block_scores", block_scores, nnz)),
            Some(Region::write("out_indptr", out_indptr, n + 1)),
            Some(Region::write("out_indices", out_indices, out_indices_cap)),
            Some(Region::write("out_last_page_len", out_last_page_len, n)),
        ])?;
        check_ptr(indptr, "indptr")?;
        check_ptr(indices, "indices")?;
        check_ptr(last_page_len, "last_page_len")?;
        check_ptr(block_scores, "block_scores")?;
        check_ptr(out_indptr, "out_indptr")?;
        check_ptr(out_indices, "out_indices")?;
        check_ptr(out_last_page_len, "out_last_page_len")?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &_kernels.cuda {
            return cu.select_blocks_csr(
                n,
                addr(indptr),
                addr(indices),
                nnz,
                addr(last_page_len),
                addr(block_scores),
                &p,
                addr(out_indptr),
                addr(out_indices),
                out_indices_cap,
                addr(out_last_page_len),
            );
        }
        select_blocks_csr(
            arg_slice!(indptr, n + 1, "indptr"),
            arg_slice!(indices, nnz, "indices"),
            arg_slice!(last_page_len, n, "last_page_len"),
            arg_slice!(block_scores, nnz, "block_scores"),
            &p,
            arg_slice_mut!(out_indptr, n + 1, "out_indptr"),
            arg_slice_mut!(out_indices, out_indices_cap, "out_indices"),
            arg_slice_mut!(out_last_page_len, n, "out_last_page_len"),
        )
        .map(|_| ())
    })
}

/// Block-level top-k for one dense vLLM block-table row: kept ids in order into
/// `out_row[out_row_len]`, the rest padded with `pad`, the count into `*num_kept`.
///
/// # Safety
/// Pointers as documented.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvs_select_blocks_row(
    kernels: *const KvsKernels,
    row: *const i32,
    row_len: u32,
    block_scores: *const f32,
    args: *const BlockSelectArgs,
    pad: i32,
    out_row: *mut i32,
    out_row_len: u32,
    num_kept: *mut u32,
) -> Status {
    ffi_boundary("kvs_select_blocks_row", || {
        let num_kept = arg_out!(num_kept, "num_kept");
        let _kernels = arg_ref!(kernels, "kernels");
        let a = arg_ref!(args, "args");
        let p = BlockSelect {
            keep_blocks: a.keep_blocks as usize,
            sink_blocks: a.sink_blocks as usize,
            recent_blocks: a.recent_blocks as usize,
        };
        check_disjoint(&[
            Some(Region::read("row", row, row_len as usize)),
            Some(Region::read("block_scores", block_scores, row_len as usize)),
            Some(Region::write("out_row", out_row, out_row_len as usize)),
            Some(Region::write("num_kept", num_kept, 1)),
        ])?;
        check_ptr(row, "row")?;
        check_ptr(block_scores, "block_scores")?;
        check_ptr(out_row, "out_row")?;
        #[cfg(feature = "cuda")]
        if let Some(cu) = &_kernels.cuda {
            // `*num_kept` is written at kvs_kernels_synchronize, like every output of this
            // backend.
            return cu.select_blocks_row(
                addr(row),
                row_len as usize,
                addr(block_scores),
                &p,
                pad,
                addr(out_row),
                out_row_len as usize,
                num_kept,
            );
        }
        let kept = select_blocks_row(
            arg_slice!(row, row_len, "row"),
            arg_slice!(block_scores, row_len, "block_scores"),
            &p,
            pad,
            arg_slice_mut!(out_row, out_row_len, "out_row"),
        )?;
        // SAFETY: checked by `arg_out!`.
        unsafe { *num_kept = kept as u32 };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    //! The pointer and shape checks run before a call reaches either backend (one home): a
    //! handle on the CUDA device with no backend behind it reports every NULL argument by name
    //! rather than reaching the backend dispatch (which would say "no CUDA kernel").
    use super::*;
    use std::ptr::{null, null_mut};

    fn on_cuda() -> KvsKernels {
        KvsKernels {
            device: Device::Cuda,
            #[cfg(feature = "cuda")]
            cuda: None,
        }
    }

    /// A CUDA-device cache at made-up, aligned addresses (never dereferenced here).
    fn cuda_cache() -> KvCacheDesc {
        KvCacheDesc {
            k: 0x10_0000 as *mut c_void,
            v: 0x20_0000 as *mut c_void,
            dtype: DTypeId::F32 as u32,
            layout: LayoutId::Nhd as u32,
            device: DeviceId::Cuda as u32,
            num_blocks: 8,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
            block_stride: 0,
            token_stride: 0,
            head_stride: 0,
        }
    }

    const ROW: [i32; 2] = [0, 1];

    fn seq(row: *const i32) -> SequenceDesc {
        SequenceDesc {
            row,
            row_len: 2,
            cached_len: 8,
            protected_len: 0,
        }
    }

    fn refused(status: Status, name: &str) {
        let msg = crate::ffi::boundary::last_error_message();
        assert_eq!(status, Status::InvalidArgument, "{msg}");
        assert!(msg.contains(&format!("{name} is NULL")), "{name}: {msg}");
    }

    #[test]
    fn null_buffers_are_refused_by_name_before_any_backend() {
        let (k, c) = (on_cuda(), cuda_cache());
        let mut scores = [0f32; 16];
        let keep = [0u32; 8];
        let q = [0f32; 8 * 2 * 2];
        let good = seq(ROW.as_ptr());
        let no_row = seq(null());
        unsafe {
            refused(
                kvs_score_knorm(&k, &c, &no_row, scores.as_mut_ptr(), 16),
                "seq.row",
            );
            refused(kvs_score_knorm(&k, &c, &good, null_mut(), 16), "scores");
            let args = SnapKvArgs {
                queries: q.as_ptr().cast(),
                queries_dtype: DTypeId::F32 as u32,
                window: 2,
                num_q_heads: 2,
                pool_kernel: 1,
                pool: 0,
            };
            refused(
                kvs_score_snapkv(&k, &c, &no_row, &args, scores.as_mut_ptr(), 16),
                "seq.row",
            );
            refused(
                kvs_score_snapkv(&k, &c, &good, &args, null_mut(), 16),
                "scores",
            );
            let no_q = SnapKvArgs {
                queries: null(),
                ..args
            };
            refused(
                kvs_score_snapkv(&k, &c, &good, &no_q, scores.as_mut_ptr(), 16),
                "args.queries",
            );
            let sel = TokenSelectArgs {
                cached_len: 8,
                protected_len: 0,
                sink_tokens: 0,
                protected_tail: 0,
                selected: 4,
            };
            refused(
                kvs_select_tokens(&k, scores.as_ptr(), 16, 2, &sel, null_mut(), 8),
                "keep",
            );
            let mut n = 0u32;
            let mut released = [0i32; 2];
            refused(
                kvs_compact(
                    &k,
                    &c,
                    &no_row,
                    keep.as_ptr(),
                    8,
                    4,
                    released.as_mut_ptr(),
                    2,
                    &mut n,
                ),
                "seq.row",
            );
            refused(
                kvs_compact(
                    &k,
                    &c,
                    &good,
                    null(),
                    8,
                    4,
                    released.as_mut_ptr(),
                    2,
                    &mut n,
                ),
                "keep",
            );
            refused(
                kvs_compact(&k, &c, &good, keep.as_ptr(), 8, 4, null_mut(), 2, &mut n),
                "released",
            );
            refused(
                kvs_compact_check(&k, &c, &no_row, keep.as_ptr(), 8, 4, 2),
                "seq.row",
            );
            refused(
                kvs_compact_into(&k, &c, &good, keep.as_ptr(), 8, 4, null(), 1),
                "dest",
            );
            refused(
                kvs_compact_into_check(&k, &c, &good, null(), 8, 4, [5].as_ptr(), 1),
                "keep",
            );
        }
    }

    #[test]
    fn wrong_lengths_are_refused_alike_on_both_devices() {
        // The shape checks live with the kernels (`check_knorm`, `TokenSelect::check_buffers`,
        // `check_shape`), which both backends call: the message is the CPU's.
        let (k, c) = (on_cuda(), cuda_cache());
        let mut scores = [0f32; 16];
        let good = seq(ROW.as_ptr());
        unsafe {
            let s = kvs_score_knorm(&k, &c, &good, scores.as_mut_ptr(), 15);
            assert_eq!(s, Status::InvalidArgument);
            let msg = crate::ffi::boundary::last_error_message();
            assert!(
                msg.contains("expected num_kv_heads * cached_len = 16"),
                "{msg}"
            );
        }
    }
}
