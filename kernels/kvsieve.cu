// kvsieve CUDA kernels, compiled at run time by NVRTC (src/cuda/source.rs).
//
// Each kernel mirrors a CPU reference in src/kernels/ and is held to it by tests/cuda_parity.rs:
// compaction bit for bit, scores within 1e-3 relative, identical keep sets. No CUDA headers are
// needed: half and bfloat16 are converted from their bits, so NVRTC compiles this file alone.
//
// Validation of engine data that lives on the device (block ids, keep lists, CSR page tables)
// happens on the device: a call's check kernel records the first problem in that call's own
// error slot `err`, and the call's later kernels return without writing, so a refused call moves
// no byte. Other calls have their own slots and run normally. The host reads the slots at
// kvs_kernels_synchronize (CUDA's own asynchronous error model).

typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

#define KVS_INF __int_as_float(0x7f800000)

// Mirrors `Geom` in src/cuda/ops.rs: all 64-bit so both sides agree without padding rules.
struct Geom {
  u64 k, v;           // base addresses of the K and V tensors
  u64 dtype;          // 0 f32, 1 f16, 2 bf16
  u64 num_blocks, block_size, heads, dim;
  u64 block_stride, token_stride, head_stride;  // in elements; head_dim is contiguous
};

// Error codes in err[0] (err[1] holds the offending index, or the repeated block id for the two
// repeat codes); mirrored in src/cuda/ops.rs.
#define KVS_ERR_ROW_RANGE 1u
#define KVS_ERR_ROW_DUPLICATE 2u
#define KVS_ERR_KEEP_RANGE 3u
#define KVS_ERR_KEEP_ORDER 4u
#define KVS_ERR_INDPTR 5u
#define KVS_ERR_LAST_PAGE_LEN 6u
#define KVS_ERR_DEST_RANGE 7u
#define KVS_ERR_DEST_REPEAT 8u
#define KVS_ERR_QUEST_ROW 9u
#define KVS_ERR_QUEST_ID 10u

__device__ __forceinline__ u64 elem(const Geom& g, u64 block, u64 head, u64 slot, u64 d) {
  return block * g.block_stride + head * g.head_stride + slot * g.token_stride + d;
}

__device__ __forceinline__ u64 esize(u64 dtype) { return dtype == 0 ? 4 : 2; }

__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else  // compiled for the host by the emulation (tests/cuda_emu); NVRTC never takes this branch
  return kvs_emu_half_bits_to_float(h);
#endif
}

// Element i of a tensor of `dtype` at `base`, as f32.
__device__ __forceinline__ float load_f32(u64 base, u64 dtype, u64 i) {
  if (dtype == 0) return ((const float*)base)[i];
  unsigned short bits = ((const unsigned short*)base)[i];
  if (dtype == 1) return half_bits_to_float(bits);
  return __uint_as_float(((u32)bits) << 16);
}

__device__ __forceinline__ void copy_elem(u64 dst, u64 src, u64 esz) {
  if (esz == 4) {
    *(u32*)dst = *(const u32*)src;
  } else {
    *(unsigned short*)dst = *(const unsigned short*)src;
  }
}

__device__ __forceinline__ void fail(u32* err, u32 code, u32 index) {
  if (atomicCAS(err, 0u, code) == 0u) err[1] = index;
}

// ---------------------------------------------------------------------------------------------
// Compaction: validate, gather the kept tokens to a workspace, scatter them to P..P+k.
// A parallel in-place gather would race (a destination can be another token's source), so the
// workspace breaks the dependency; the result equals the CPU's ascending in-place gather.

// marks[num_blocks] holds the epoch of the last call that saw each block id: a repeat within
// one epoch is a duplicate, and no clearing pass is needed between calls.
extern "C" __global__ void kvs_compact_check(Geom g, const i32* row, u32 row_len, const u32* keep,
                                             u32 selected, u32 cached_len, u32 protected_len,
                                             u32* marks, u32 epoch, u32* err) {
  u64 tid = blockIdx.x * (u64)blockDim.x + threadIdx.x;
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = tid; i < row_len; i += stride) {
    i32 b = row[i];
    if (b < 0 || (u64)b >= g.num_blocks) {
      fail(err, KVS_ERR_ROW_RANGE, (u32)i);
    } else if (atomicExch(&marks[b], epoch) == epoch) {
      // The block id, not the index: which of its two positions sees the mark first depends
      // on thread timing, the id does not.
      fail(err, KVS_ERR_ROW_DUPLICATE, (u32)b);
    }
  }
  u64 total = (u64)selected * g.heads;
  for (u64 i = tid; i < total; i += stride) {
    u32 t = keep[i];
    u64 j = i % selected;
    if (t < protected_len || t >= cached_len) {
      fail(err, KVS_ERR_KEEP_RANGE, (u32)i);
    } else if (j > 0 && keep[i - 1] >= t) {
      fail(err, KVS_ERR_KEEP_ORDER, (u32)i);
    }
  }
}

// grid (selected, heads): K and V of keep[h][j] into work[((h * selected + j) * 2 + kv) * dim].
extern "C" __global__ void kvs_compact_gather(Geom g, const i32* row, const u32* keep, u32 selected,
                                              u32 protected_len, u64 work, const u32* err) {
  if (*(volatile const u32*)err) return;
  u64 j = blockIdx.x, h = blockIdx.y;
  u64 src = keep[h * selected + j];
  if (src == protected_len + j) return;  // already in place
  u64 esz = esize(g.dtype);
  u64 sb = (u64)row[src / g.block_size], ss = src % g.block_size;
  u64 out = work + ((h * selected + j) * 2) * g.dim * esz;
  for (u64 d = threadIdx.x; d < g.dim; d += blockDim.x) {
    u64 o = elem(g, sb, h, ss, d) * esz;
    copy_elem(out + d * esz, g.k + o, esz);
    copy_elem(out + (g.dim + d) * esz, g.v + o, esz);
  }
}

extern "C" __global__ void kvs_compact_scatter(Geom g, const i32* row, const u32* keep, u32 selected,
                                               u32 protected_len, u64 work, const u32* err) {
  if (*(volatile const u32*)err) return;
  u64 j = blockIdx.x, h = blockIdx.y;
  u64 dst = protected_len + j;
  if (keep[h * selected + j] == dst) return;
  u64 esz = esize(g.dtype);
  u64 db = (u64)row[dst / g.block_size], ds = dst % g.block_size;
  u64 in = work + ((h * selected + j) * 2) * g.dim * esz;
  for (u64 d = threadIdx.x; d < g.dim; d += blockDim.x) {
    u64 o = elem(g, db, h, ds, d) * esz;
    copy_elem(g.k + o, in + d * esz, esz);
    copy_elem(g.v + o, in + (g.dim + d) * esz, esz);
  }
}

// Out of place: dest ids in range, none twice and none in the row. Launched after
// kvs_compact_check with the same marks and epoch, so the row's ids are already marked.
extern "C" __global__ void kvs_compact_dest_check(Geom g, const i32* dest, u32 dest_len, u32* marks,
                                                  u32 epoch, u32* err) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < dest_len; i += (u64)gridDim.x * blockDim.x) {
    i32 b = dest[i];
    if (b < 0 || (u64)b >= g.num_blocks) {
      fail(err, KVS_ERR_DEST_RANGE, (u32)i);
    } else if (atomicExch(&marks[b], epoch) == epoch) {
      fail(err, KVS_ERR_DEST_REPEAT, (u32)b);  // the id, as for a row duplicate
    }
  }
}

// grid (selected, heads): K and V of keep[h][j] (read from the row) to position j of dest. The
// row is only read and dest is disjoint from it, so no workspace is needed.
extern "C" __global__ void kvs_compact_into(Geom g, const i32* row, const u32* keep, u32 selected,
                                            const i32* dest, const u32* err) {
  if (*(volatile const u32*)err) return;
  u64 j = blockIdx.x, h = blockIdx.y;
  u64 src = keep[h * selected + j];
  u64 sb = (u64)row[src / g.block_size], ss = src % g.block_size;
  u64 db = (u64)dest[j / g.block_size], ds = j % g.block_size;
  u64 esz = esize(g.dtype);
  for (u64 d = threadIdx.x; d < g.dim; d += blockDim.x) {
    u64 so = elem(g, sb, h, ss, d) * esz, dO = elem(g, db, h, ds, d) * esz;
    copy_elem(g.k + dO, g.k + so, esz);
    copy_elem(g.v + dO, g.v + so, esz);
  }
}

// released[i] = row[first + i], i < count (the blocks past the new end).
extern "C" __global__ void kvs_copy_released(const i32* row, u32 first, u32 count, i32* released,
                                             const u32* err) {
  if (*(volatile const u32*)err) return;
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x)
    released[i] = row[first + i];
}

// Block ids of a row are in range (no duplicate check: scoring only reads).
extern "C" __global__ void kvs_row_check(Geom g, const i32* row, u32 row_len, u32* err) {
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < row_len; i += gridDim.x * blockDim.x) {
    i32 b = row[i];
    if (b < 0 || (u64)b >= g.num_blocks) fail(err, KVS_ERR_ROW_RANGE, i);
  }
}

// ---------------------------------------------------------------------------------------------
// Scores.

// grid (ceil(C / blockDim), heads): out[h][t] = -||K[h][t]||.
extern "C" __global__ void kvs_knorm(Geom g, const i32* row, u32 cached_len, float* out, const u32* err) {
  if (*(volatile const u32*)err) return;
  u64 t = blockIdx.x * (u64)blockDim.x + threadIdx.x, h = blockIdx.y;
  if (t >= cached_len) return;
  u64 b = (u64)row[t / g.block_size], s = t % g.block_size;
  float acc = 0.f;
  for (u64 d = 0; d < g.dim; d++) {
    float x = load_f32(g.k, g.dtype, elem(g, b, h, s, d));
    acc += x * x;
  }
  out[h * cached_len + t] = -sqrtf(acc);
}

// grid (ceil(C / blockDim), window, q_heads): logits[(qh * W + i) * C + t], causal mask -inf.
extern "C" __global__ void kvs_snapkv_logits(Geom g, const i32* row, u32 cached_len, u64 queries,
                                             u64 q_dtype, u32 window, u32 q_heads, float* logits,
                                             const u32* err) {
  if (*(volatile const u32*)err) return;
  u64 t = blockIdx.x * (u64)blockDim.x + threadIdx.x;
  u64 i = blockIdx.y, qh = blockIdx.z;
  if (t >= cached_len) return;
  u64 group = q_heads / g.heads, h = qh / group;
  float l = -KVS_INF;
  if (t <= cached_len - window + i) {
    u64 b = (u64)row[t / g.block_size], s = t % g.block_size;
    u64 q0 = (i * q_heads + qh) * g.dim;
    float acc = 0.f;
    for (u64 d = 0; d < g.dim; d++)
      acc += load_f32(queries, q_dtype, q0 + d) * load_f32(g.k, g.dtype, elem(g, b, h, s, d));
    l = acc * rsqrtf((float)g.dim);
  }
  logits[(qh * window + i) * cached_len + t] = l;
}

// Block-wide reductions over blockDim.x (a power of two, at most 1024).
__device__ float reduce_max(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  float r = sh[0];
  __syncthreads();
  return r;
}

__device__ float reduce_sum(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  float r = sh[0];
  __syncthreads();
  return r;
}

// grid (window, q_heads), 256 threads: stats[row] = (max, 1 / sum exp(l - max)) over t < lim.
extern "C" __global__ void kvs_snapkv_softmax_stats(u32 cached_len, u32 window, const float* logits,
                                                    float* stats, const u32* err) {
  if (*(volatile const u32*)err) return;
  __shared__ float sh[256];
  u64 r = (u64)blockIdx.y * window + blockIdx.x;
  u64 lim = cached_len - window + blockIdx.x + 1;
  const float* l = logits + r * cached_len;
  float m = -KVS_INF;
  for (u64 t = threadIdx.x; t < lim; t += blockDim.x) m = fmaxf(m, l[t]);
  m = reduce_max(m, sh);
  float z = 0.f;
  for (u64 t = threadIdx.x; t < lim; t += blockDim.x) z += expf(l[t] - m);
  z = reduce_sum(z, sh);
  if (threadIdx.x == 0) {
    stats[2 * r] = m;
    stats[2 * r + 1] = 1.f / z;
  }
}

// grid (ceil(C / blockDim), heads): acc[h][t] = sum over the group's query heads and the window
// of the softmax probability of t.
extern "C" __global__ void kvs_snapkv_accumulate(u32 cached_len, u32 window, u32 q_heads, u32 heads,
                                                 const float* logits, const float* stats, float* acc,
                                                 const u32* err) {
  if (*(volatile const u32*)err) return;
  u64 t = blockIdx.x * (u64)blockDim.x + threadIdx.x, h = blockIdx.y;
  if (t >= cached_len) return;
  u64 group = q_heads / heads;
  float a = 0.f;
  for (u64 qh = h * group; qh < (h + 1) * group; qh++) {
    for (u64 i = 0; i < window; i++) {
      if (t <= cached_len - window + i) {
        u64 r = qh * window + i;
        a += expf(logits[r * cached_len + t] - stats[2 * r]) * stats[2 * r + 1];
      }
    }
  }
  acc[h * cached_len + t] = a;
}

// grid (ceil(C / blockDim), heads): centred pooling over the tokens before the window.
extern "C" __global__ void kvs_snapkv_pool(u32 cached_len, u32 window, u32 pool_kernel, u32 avg,
                                           const float* acc, float* out, const u32* err) {
  if (*(volatile const u32*)err) return;
  u64 t = blockIdx.x * (u64)blockDim.x + threadIdx.x, h = blockIdx.y;
  if (t >= cached_len) return;
  const float* a = acc + h * cached_len;
  u64 n = cached_len - window, r = pool_kernel / 2;
  float v;
  if (t >= n) {
    v = a[t];
  } else {
    u64 lo = t >= r ? t - r : 0, hi = t + r < n - 1 ? t + r : n - 1;
    v = avg ? 0.f : -KVS_INF;
    for (u64 x = lo; x <= hi; x++) v = avg ? v + a[x] : fmaxf(v, a[x]);
    if (avg) v /= (float)(2 * r + 1);
  }
  out[h * cached_len + t] = v;
}

// grid (heads): Quest min/max of physical block `block` over its first `filled` slots, per key
// range (`ranges` runs of block_size / ranges slots); a range with no filled slot repeats the
// last filled one, as quest.rs `quest_update_block`. Each thread owns channels, so the copy
// reads what the same thread wrote.
extern "C" __global__ void kvs_quest_update(Geom g, u32 ranges, u32 block, u32 filled, float* block_min,
                                            float* block_max) {
  u64 h = blockIdx.x, span = g.block_size / ranges;
  for (u64 d = threadIdx.x; d < g.dim; d += blockDim.x) {
    for (u64 kr = 0; kr < ranges; kr++) {
      u64 at = (((u64)block * ranges + kr) * g.heads + h) * g.dim + d;
      u64 from = kr * span, to = (kr + 1) * span < filled ? (kr + 1) * span : filled;
      if (from >= to) {
        block_min[at] = block_min[at - g.heads * g.dim];
        block_max[at] = block_max[at - g.heads * g.dim];
        continue;
      }
      float lo = KVS_INF, hi = -KVS_INF;
      for (u64 s = from; s < to; s++) {
        float x = load_f32(g.k, g.dtype, elem(g, block, h, s, d));
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
      }
      block_min[at] = lo;
      block_max[at] = hi;
    }
  }
}

// grid (row_len), 128 threads: out[j] = max over key ranges and query heads of the Quest bound
// of row[j].
extern "C" __global__ void kvs_quest_bound(Geom g, u32 ranges, const i32* row, u64 query, u64 q_dtype,
                                           u32 q_heads, const float* block_min, const float* block_max,
                                           float* out, const u32* err) {
  if (*(volatile const u32*)err) return;
  __shared__ float sh[128];
  u64 b = (u64)row[blockIdx.x];
  u64 group = q_heads / g.heads;
  float best = -KVS_INF;
  for (u64 i = threadIdx.x; i < (u64)ranges * q_heads; i += blockDim.x) {
    u64 r = i / q_heads, qh = i % q_heads;
    u64 at = ((b * ranges + r) * g.heads + qh / group) * g.dim;
    float s = 0.f;
    for (u64 d = 0; d < g.dim; d++) {
      float q = load_f32(query, q_dtype, qh * g.dim + d);
      s += fmaxf(q * block_min[at + d], q * block_max[at + d]);
    }
    best = fmaxf(best, s);
  }
  best = reduce_max(best, sh);
  if (threadIdx.x == 0) out[blockIdx.x] = best;
}

// ---------------------------------------------------------------------------------------------
// Selection: the same rule as src/kernels/select.rs (top scores of the middle, ties to the
// earlier position, output ascending), by a three-digit radix select and an ordered emission
// with block-wide scans. One thread block (1024 threads) per KV head or per sequence.

__device__ __forceinline__ u32 score_key(float x) {
  u32 b = __float_as_uint(x);
  u32 k = b ^ ((u32)((i32)b >> 31) | 0x80000000u);
  return x != x ? 0u : k;
}

// Exclusive scan of v over the block; *total receives the block's sum. `sh` holds 32 words.
__device__ u32 block_exclusive_scan(u32 v, u32* sh, u32* total) {
  u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  u32 x = v;
  for (u32 o = 1; o < 32; o <<= 1) {
    u32 y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    u32 nw = blockDim.x >> 5;
    u32 w = lane < nw ? sh[lane] : 0u;
    for (u32 o = 1; o < 32; o <<= 1) {
      u32 y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    sh[lane] = w;  // inclusive prefix of warp totals
  }
  __syncthreads();
  u32 before = warp > 0 ? sh[warp - 1] : 0u;
  *total = sh[(blockDim.x >> 5) - 1];
  __syncthreads();
  return before + x - v;
}

// Keep `need` of s[0..n) (need < n): writes the chosen indices, ascending, to out[0..need).
// `hist` is 2048 shared words, `sh` 32 shared words.
__device__ void select_top(const float* s, u32 n, u32 need, u32* out, u32* hist, u32* sh) {
  __shared__ u32 s_prefix, s_mask, s_remaining, s_above;
  if (threadIdx.x == 0) {
    s_prefix = 0u;
    s_mask = 0u;
    s_remaining = need;
    s_above = 0u;
  }
  __syncthreads();
  const u32 shifts[3] = {21u, 10u, 0u};
  const u32 widths[3] = {11u, 11u, 10u};
  for (int pass = 0; pass < 3; pass++) {
    u32 shift = shifts[pass], nb = 1u << widths[pass];
    for (u32 i = threadIdx.x; i < nb; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    u32 prefix = s_prefix, mask = s_mask;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
      u32 k = score_key(s[i]);
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & (nb - 1)], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      u32 cum = 0u, rem = s_remaining, chosen = 0u;
      for (int b = (int)nb - 1; b >= 0; b--) {
        if (cum + hist[b] >= rem) {
          chosen = (u32)b;
          break;
        }
        cum += hist[b];
      }
      s_above += cum;
      s_remaining = rem - cum;
      s_prefix = prefix | (chosen << shift);
      s_mask = mask | ((nb - 1) << shift);
    }
    __syncthreads();
  }
  u32 t = s_prefix, ties_needed = s_remaining;
  u32 out_base = 0u, tie_base = 0u;
  for (u32 tile = 0; tile < n; tile += blockDim.x) {
    u32 i = tile + threadIdx.x;
    u32 k = i < n ? score_key(s[i]) : 0u;
    u32 gt = (i < n && k > t) ? 1u : 0u;
    u32 tie = (i < n && k == t) ? 1u : 0u;
    u32 tie_total, take_total;
    u32 tie_rank = tie_base + block_exclusive_scan(tie, sh, &tie_total);
    u32 take = gt | (tie & (tie_rank < ties_needed ? 1u : 0u));
    u32 at = out_base + block_exclusive_scan(take, sh, &take_total);
    if (take) out[at] = i;
    out_base += take_total;
    tie_base += tie_total;
  }
  __syncthreads();
}

// grid (heads), 1024 threads. scores [heads][C] (0: streaming); keep [heads][k].
extern "C" __global__ void kvs_select_tokens(u64 scores, u32 cached_len, u32 protected_len, u32 sink_end,
                                             u32 tail_start, u32 selected, u32* keep, const u32* err) {
  if (*(volatile const u32*)err) return;
  __shared__ u32 hist[2048];
  __shared__ u32 sh[32];
  u64 h = blockIdx.x;
  u32* out = keep + h * selected;
  u32 sinks = sink_end - protected_len, tail = cached_len - tail_start;
  u32 need = selected - sinks - tail, mid = tail_start - sink_end;
  for (u32 i = threadIdx.x; i < sinks; i += blockDim.x) out[i] = protected_len + i;
  for (u32 i = threadIdx.x; i < tail; i += blockDim.x) out[sinks + need + i] = tail_start + i;
  if (need == 0) return;
  if (scores == 0 || need == mid) {  // streaming keeps the latest; a full middle keeps all
    for (u32 i = threadIdx.x; i < need; i += blockDim.x) out[sinks + i] = tail_start - need + i;
    return;
  }
  const float* s = (const float*)scores + h * cached_len + sink_end;
  select_top(s, mid, need, out + sinks, hist, sh);
  for (u32 i = threadIdx.x; i < need; i += blockDim.x) out[sinks + i] += sink_end;
}

// One thread: out_indptr[i + 1] = out_indptr[i] + min(pages_i, keep_blocks).
extern "C" __global__ void kvs_csr_out_indptr(const i32* indptr, u32 num_seqs, u32 keep_blocks,
                                              i32* out_indptr, const u32* err) {
  if (*(volatile const u32*)err) return;
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  i32 acc = 0;
  out_indptr[0] = 0;
  for (u32 i = 0; i < num_seqs; i++) {
    u32 pages = (u32)(indptr[i + 1] - indptr[i]);
    acc += (i32)(pages < keep_blocks ? pages : keep_blocks);
    out_indptr[i + 1] = acc;
  }
}

// The CPU's check_csr on the device: indptr[0] == 0, never decreasing, indptr[num_seqs] == nnz,
// and every non-empty sequence's last page holding at least one token.
extern "C" __global__ void kvs_csr_check(const i32* indptr, u32 num_seqs, u32 nnz,
                                         const i32* last_page_len, u32* err) {
  u32 tid = blockIdx.x * blockDim.x + threadIdx.x;
  if (tid == 0 && (indptr[0] != 0 || indptr[num_seqs] != (i32)nnz))
    fail(err, KVS_ERR_INDPTR, indptr[0] != 0 ? 0u : num_seqs);
  for (u32 i = tid; i < num_seqs; i += gridDim.x * blockDim.x) {
    i32 pages = indptr[i + 1] - indptr[i];
    if (pages < 0) {
      fail(err, KVS_ERR_INDPTR, i + 1);
    } else if (pages > 0 && last_page_len[i] < 1) {
      fail(err, KVS_ERR_LAST_PAGE_LEN, i);
    }
  }
}

// grid (num_seqs), 1024 threads: block top-k per sequence into the CSR output. `positions` is
// scratch of nnz words (per-sequence offsets match the input's).
extern "C" __global__ void kvs_select_blocks_csr(const i32* indptr, const i32* indices,
                                                 const i32* last_page_len, const float* block_scores,
                                                 u32 keep_blocks, u32 sink_blocks, u32 recent_blocks,
                                                 const i32* out_indptr, i32* out_indices,
                                                 i32* out_last_page_len, u32* positions,
                                                 const u32* err) {
  if (*(volatile const u32*)err) return;
  __shared__ u32 hist[2048];
  __shared__ u32 sh[32];
  u32 seq = blockIdx.x;
  u32 a = (u32)indptr[seq], n = (u32)(indptr[seq + 1] - indptr[seq]);
  i32* out = out_indices + out_indptr[seq];
  if (threadIdx.x == 0) out_last_page_len[seq] = last_page_len[seq];
  if (n <= keep_blocks) {
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) out[i] = indices[a + i];
    return;
  }
  u32 tail_start = n - recent_blocks;
  u32 need = keep_blocks - sink_blocks - recent_blocks, mid = tail_start - sink_blocks;
  for (u32 i = threadIdx.x; i < sink_blocks; i += blockDim.x) out[i] = indices[a + i];
  for (u32 i = threadIdx.x; i < recent_blocks; i += blockDim.x)
    out[sink_blocks + need + i] = indices[a + tail_start + i];
  if (need == 0) return;
  u32* pos = positions + a;
  if (need == mid) {
    for (u32 i = threadIdx.x; i < need; i += blockDim.x) pos[i] = i;
  } else {
    select_top(block_scores + a + sink_blocks, mid, need, pos, hist, sh);
  }
  __syncthreads();
  for (u32 i = threadIdx.x; i < need; i += blockDim.x)
    out[sink_blocks + i] = indices[a + sink_blocks + pos[i]];
}

// The one-sequence CSR header a dense row is selected through: indptr = [0, row_len],
// last_page_len = [1] (the value is only copied through). Written on the device so the dense
// path needs no host-to-device copy (a pageable copy would synchronise the stream).
extern "C" __global__ void kvs_row_header(u32 row_len, i32* header, const u32* err) {
  if (*(volatile const u32*)err) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    header[0] = 0;
    header[1] = (i32)row_len;
    header[4] = 1;
  }
}

// Fill out[from..len) with pad (dense rows after block selection).
extern "C" __global__ void kvs_fill_i32(i32* out, u32 from, u32 len, i32 pad, const u32* err) {
  if (*(volatile const u32*)err) return;
  for (u32 i = from + blockIdx.x * blockDim.x + threadIdx.x; i < len; i += gridDim.x * blockDim.x)
    out[i] = pad;
}

// ---------------------------------------------------------------------------------------------
// Quest selection of a decode batch, one layer (src/kernels/score/quest.rs, `quest_select`).

// grid (rows), 256 threads: QuestRows::check's per-row rules on the device (blocks[r] in
// 1..=stride; keep[r] >= 1 and above sink_blocks unless the row is kept whole; the kept blocks
// fit out_stride), then every block id of the row in range. With several bad rows, which one is
// named depends on the order blocks ran in; the call fails either way.
extern "C" __global__ void kvs_quest_rows_check(Geom g, const i32* table, u32 stride, const i32* blocks,
                                                const i32* keep, u32 sink_blocks, u32 out_stride, u32* err) {
  u32 r = blockIdx.x;
  i32 nb = blocks[r], k = keep[r];
  if (nb < 1 || (u32)nb > stride || k < 1 || (k < nb && (u32)k <= sink_blocks) ||
      (u32)(k < nb ? k : nb) > out_stride) {
    if (threadIdx.x == 0) fail(err, KVS_ERR_QUEST_ROW, r);
    return;
  }
  for (u32 j = threadIdx.x; j < (u32)nb; j += blockDim.x) {
    i32 b = table[(u64)r * stride + j];
    if (b < 0 || (u64)b >= g.num_blocks) fail(err, KVS_ERR_QUEST_ID, r);
  }
}

// The CPU's bound_one: q . (q >= 0 ? hi - t(hi - lo) : lo + t(hi - lo)) in 8 lanes, the lanes
// in order, then the rest, each product and sum rounded on its own (no fused multiply-add), so
// the bits are the CPU's. t = (1 - spread) / 2 (quest.rs `shrink`): 0 is Quest's bound.
__device__ float quest_edge(float x, float l, float u, float t) {
  float cut = __fmul_rn(t, __fsub_rn(u, l));
  return __fmul_rn(x, x >= 0.f ? __fsub_rn(u, cut) : __fadd_rn(l, cut));
}

__device__ float quest_bound_one(u64 query, u64 q_dtype, u64 qbase, const float* lo, const float* hi,
                                 u64 dim, float t) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  u64 n8 = dim / 8 * 8;
  for (u64 c = 0; c < n8; c += 8) {
    for (int i = 0; i < 8; i++) {
      float x = load_f32(query, q_dtype, qbase + c + i);
      acc[i] = __fadd_rn(acc[i], quest_edge(x, lo[c + i], hi[c + i], t));
    }
  }
  float s = acc[0];
  for (int i = 1; i < 8; i++) s = __fadd_rn(s, acc[i]);
  for (u64 d = n8; d < dim; d++) {
    float x = load_f32(query, q_dtype, qbase + d);
    s = __fadd_rn(s, quest_edge(x, lo[d], hi[d], t));
  }
  return s;
}

// grid (rows), 256 threads (a row has a few hundred blocks; and 1024 would need the bound's
// registers to fit 64): row r's block bounds (max over query heads) into ws[r * stride..],
// then its first sinks, best middle blocks and last block, in sequence order, into
// out[r * out_stride..], the rest set to pad. No scratch: the middle's positions are selected
// into the output row itself and mapped to block ids in place.
extern "C" __global__ void kvs_quest_select(Geom g, u32 ranges, const i32* table, u32 stride, const i32* blocks,
                                            const i32* keep, u32 sink_blocks, float shrink, u64 query,
                                            u64 q_dtype, u32 q_heads, const float* block_min,
                                            const float* block_max, float* ws, i32* out, u32 out_stride,
                                            i32 pad, const u32* err) {
  if (*(volatile const u32*)err) return;
  __shared__ u32 hist[2048];
  __shared__ u32 sh[32];
  u64 r = blockIdx.x;
  u32 n = (u32)blocks[r], k = (u32)keep[r];
  const i32* row = table + r * stride;
  float* s = ws + r * stride;
  u64 group = q_heads / g.heads, qrow = r * q_heads * g.dim;
  for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
    u64 at = (u64)row[j] * ranges * g.heads * g.dim;
    float best = -KVS_INF;
    for (u64 kr = 0; kr < ranges; kr++) {  // key range (r is the row)
      for (u64 qh = 0; qh < q_heads; qh++) {
        u64 m = at + (kr * g.heads + qh / group) * g.dim;
        best = fmaxf(best, quest_bound_one(query, q_dtype, qrow + qh * g.dim, block_min + m, block_max + m, g.dim,
                                           shrink));
      }
    }
    s[j] = best;
  }
  __syncthreads();
  i32* o = out + r * out_stride;
  u32 kept = n < k ? n : k;
  if (n <= k) {
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) o[i] = row[i];
  } else {
    // n > kept here, so the middle (n - 1 - sinks blocks) always has more than `need`.
    u32 sinks = sink_blocks < kept - 1 ? sink_blocks : kept - 1;
    u32 need = kept - sinks - 1, mid = n - 1 - sinks;
    for (u32 i = threadIdx.x; i < sinks; i += blockDim.x) o[i] = row[i];
    if (threadIdx.x == 0) o[kept - 1] = row[n - 1];
    if (need > 0) {
      select_top(s + sinks, mid, need, (u32*)(o + sinks), hist, sh);  // ends with a barrier
      for (u32 i = threadIdx.x; i < need; i += blockDim.x) o[sinks + i] = row[sinks + (u32)o[sinks + i]];
    }
  }
  for (u32 i = kept + threadIdx.x; i < out_stride; i += blockDim.x) o[i] = pad;
}
