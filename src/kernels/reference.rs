//! Naive references, written for clarity rather than speed: element-wise addressing, f64
//! accumulation, full sorts. Tests hold every kernel against these; the CUDA parity tests reuse
//! them. Not part of the stable API.

use super::dtype::Element;
use super::layout::KvCache;
use super::select::score_key;
use crate::config::Pooling;
use crate::with_dtype;

/// K[block][head][slot][d] as f64.
///
/// # Safety
/// In-range coordinates of a live host cache.
pub unsafe fn k_at(c: &KvCache, block: usize, head: usize, slot: usize, d: usize) -> f64 {
    with_dtype!(c.dtype, T => unsafe { *(c.k as *const T).add(c.k_offset(block, head, slot, d)) }.to_f32() as f64)
}

fn cached_k(c: &KvCache, row: &[i32], head: usize, t: usize) -> Vec<f64> {
    let bs = c.block_size;
    // SAFETY: callers pass rows valid for the cache (the tests build both).
    (0..c.head_dim)
        .map(|d| unsafe { k_at(c, row[t / bs] as usize, head, t % bs, d) })
        .collect()
}

/// SnapKV scores, straight from the definition.
#[allow(clippy::too_many_arguments)]
pub fn snapkv(
    c: &KvCache,
    row: &[i32],
    cached_len: usize,
    queries: &[f32],
    num_q_heads: usize,
    window: usize,
    pool_kernel: usize,
    pool: Pooling,
) -> Vec<f32> {
    let (h_kv, d) = (c.num_kv_heads, c.head_dim);
    let group = num_q_heads / h_kv;
    let mut out = vec![0f32; h_kv * cached_len];
    for h in 0..h_kv {
        let keys: Vec<Vec<f64>> = (0..cached_len).map(|t| cached_k(c, row, h, t)).collect();
        let mut acc = vec![0f64; cached_len];
        for qh in h * group..(h + 1) * group {
            for i in 0..window {
                let q = &queries[(i * num_q_heads + qh) * d..][..d];
                let visible = cached_len - window + i + 1;
                let logits: Vec<f64> = keys[..visible]
                    .iter()
                    .map(|k| {
                        k.iter().zip(q).map(|(a, b)| a * *b as f64).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                for (t, l) in logits.iter().enumerate() {
                    acc[t] += (l - m).exp() / z;
                }
            }
        }
        let n = cached_len - window;
        let r = pool_kernel / 2;
        for t in 0..cached_len {
            out[h * cached_len + t] = if t >= n {
                acc[t] as f32
            } else {
                let lo = t.saturating_sub(r);
                let hi = (t + r).min(n - 1);
                match pool {
                    Pooling::Max => acc[lo..=hi]
                        .iter()
                        .cloned()
                        .fold(f64::NEG_INFINITY, f64::max)
                        as f32,
                    Pooling::Avg => (acc[lo..=hi].iter().sum::<f64>() / (2 * r + 1) as f64) as f32,
                }
            };
        }
    }
    out
}

/// −‖K‖₂ per (head, token).
pub fn knorm(c: &KvCache, row: &[i32], cached_len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(c.num_kv_heads * cached_len);
    for h in 0..c.num_kv_heads {
        for t in 0..cached_len {
            out.push(
                -(cached_k(c, row, h, t)
                    .iter()
                    .map(|x| x * x)
                    .sum::<f64>()
                    .sqrt()) as f32,
            );
        }
    }
    out
}

/// Keep sinks `[lo, sink_end)`, tail `[tail_start, hi)` and the top of the middle by a full sort
/// on (score descending, position ascending); `None` scores keep the latest of the middle.
pub fn keep_positions(
    scores: Option<&[f32]>,
    lo: usize,
    sink_end: usize,
    tail_start: usize,
    hi: usize,
    k: usize,
) -> Vec<u32> {
    let need = k - (sink_end - lo) - (hi - tail_start);
    let mut middle: Vec<usize> = (sink_end..tail_start).collect();
    match scores {
        Some(s) => middle.sort_by(|&a, &b| {
            score_key(s[b - lo])
                .cmp(&score_key(s[a - lo]))
                .then(a.cmp(&b))
        }),
        None => middle.reverse(),
    }
    let mut kept: Vec<usize> = (lo..sink_end)
        .chain(middle.into_iter().take(need))
        .chain(tail_start..hi)
        .collect();
    kept.sort_unstable();
    kept.into_iter().map(|p| p as u32).collect()
}

/// Compaction as a gather from a snapshot: every element of every kept token, one at a time.
///
/// # Safety
/// A live host cache, a row and keep lists valid for it (the tests build them).
pub unsafe fn compact(
    c: &KvCache,
    row: &[i32],
    protected_len: usize,
    keep: &[u32],
    selected: usize,
    k_len: usize,
    v_len: usize,
) {
    // SAFETY: forwarded.
    unsafe { compact_to(c, row, keep, selected, row, protected_len, k_len, v_len) }
}

/// Out-of-place compaction: kept token `j` of every head goes to position `j` of `dest`.
///
/// # Safety
/// As `compact`, with `dest` blocks of the cache.
#[allow(clippy::too_many_arguments)]
pub unsafe fn compact_into(
    c: &KvCache,
    row: &[i32],
    keep: &[u32],
    selected: usize,
    dest: &[i32],
    k_len: usize,
    v_len: usize,
) {
    // SAFETY: forwarded.
    unsafe { compact_to(c, row, keep, selected, dest, 0, k_len, v_len) }
}

/// Kept token `j` of each head, read from `row` in a snapshot, to position `dst_start + j` of
/// `dst_row`.
#[allow(clippy::too_many_arguments)]
unsafe fn compact_to(
    c: &KvCache,
    row: &[i32],
    keep: &[u32],
    selected: usize,
    dst_row: &[i32],
    dst_start: usize,
    k_len: usize,
    v_len: usize,
) {
    let esz = c.dtype.size();
    // SAFETY: the caller passes the tensor lengths in elements.
    let k_snap = unsafe { std::slice::from_raw_parts(c.k, k_len * esz) }.to_vec();
    let v_snap = unsafe { std::slice::from_raw_parts(c.v, v_len * esz) }.to_vec();
    let bs = c.block_size;
    for h in 0..c.num_kv_heads {
        for j in 0..selected {
            let src = keep[h * selected + j] as usize;
            let dst = dst_start + j;
            let (sb, ss, db, ds) = (
                row[src / bs] as usize,
                src % bs,
                dst_row[dst / bs] as usize,
                dst % bs,
            );
            for d in 0..c.head_dim {
                let (ks, kd) = (
                    c.k_offset(sb, h, ss, d) * esz,
                    c.k_offset(db, h, ds, d) * esz,
                );
                let (vs, vd) = (
                    c.v_offset(sb, h, ss, d) * esz,
                    c.v_offset(db, h, ds, d) * esz,
                );
                for b in 0..esz {
                    unsafe {
                        *c.k.add(kd + b) = k_snap[ks + b];
                        *c.v.add(vd + b) = v_snap[vs + b];
                    }
                }
            }
        }
    }
}

/// Quest bound per row block, maxed over query heads and the block's `ranges` key ranges (runs
/// of `block_size / ranges` slots; those with no filled slot left out), computed from the keys
/// themselves.
pub fn quest_bound(
    c: &KvCache,
    blocks: &[(i32, usize)],
    query: &[f32],
    num_q_heads: usize,
    ranges: usize,
) -> Vec<f32> {
    let (h_kv, d) = (c.num_kv_heads, c.head_dim);
    let group = num_q_heads / h_kv;
    let span = c.block_size / ranges;
    blocks
        .iter()
        .map(|&(b, filled)| {
            let mut best = f32::NEG_INFINITY;
            for r in (0..ranges).filter(|r| r * span < filled) {
                let slots = r * span..((r + 1) * span).min(filled);
                for qh in 0..num_q_heads {
                    let h = qh / group;
                    let bound = (0..d)
                        .map(|i| {
                            // SAFETY: blocks and fills built by the tests for this cache.
                            let ks: Vec<f64> = slots
                                .clone()
                                .map(|s| unsafe { k_at(c, b as usize, h, s, i) })
                                .collect();
                            let lo = ks.iter().cloned().fold(f64::INFINITY, f64::min);
                            let hi = ks.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let q = query[qh * d + i] as f64;
                            (q * lo).max(q * hi)
                        })
                        .sum::<f64>() as f32;
                    best = best.max(bound);
                }
            }
            best
        })
        .collect()
}

/// Quest selection of one row, naively: the score of each block from the metadata
/// (`[blocks][ranges][kv heads][dim]`) in f64 (max over its key ranges and query heads of the
/// bound over the key box shrunk about its centre to `spread` of its width; 1 is Quest's bound),
/// then the sinks, the last block and the best of the rest by a full sort (ties to the earlier
/// block). Returns the bounds and the kept positions, ascending.
#[allow(clippy::too_many_arguments)]
pub fn quest_select_row(
    row: &[i32],
    keep: usize,
    sink_blocks: usize,
    query: &[f32],
    num_q_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    min: &[f32],
    max: &[f32],
    spread: f32,
    ranges: usize,
) -> (Vec<f64>, Vec<usize>) {
    let (h, d) = (num_kv_heads, head_dim);
    let s = spread as f64;
    let group = num_q_heads / h;
    let bounds: Vec<f64> = row
        .iter()
        .map(|&b| {
            (0..ranges * num_q_heads)
                .map(|j| {
                    let (r, qh) = (j / num_q_heads, j % num_q_heads);
                    let at = ((b as usize * ranges + r) * h + qh / group) * d;
                    (0..d)
                        .map(|i| {
                            let q = query[qh * d + i] as f64;
                            let (lo, hi) = (min[at + i] as f64, max[at + i] as f64);
                            let (c, w) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
                            q * c + s * q.abs() * w
                        })
                        .sum::<f64>()
                })
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect();
    let nb = row.len();
    if nb <= keep {
        return (bounds, (0..nb).collect());
    }
    let sinks = sink_blocks.min(keep - 1);
    let mut middle: Vec<usize> = (sinks..nb - 1).collect();
    middle.sort_by(|&a, &b| bounds[b].partial_cmp(&bounds[a]).unwrap().then(a.cmp(&b)));
    let mut kept: Vec<usize> = (0..sinks)
        .chain(middle[..keep - sinks - 1].iter().copied())
        .collect();
    kept.push(nb - 1);
    kept.sort_unstable();
    (bounds, kept)
}
