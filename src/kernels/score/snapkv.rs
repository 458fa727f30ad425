//! SnapKV scores: how much attention the observation window (the last `window` prompt queries)
//! pays each cached token, summed over the window and over the query heads of each KV head's
//! GQA group, then pooled along the token axis so neighbours of a heavy hitter survive with it.
//!
//! Window query `i` sits at cached position `C - window + i` and attends causally to
//! `t <= C - window + i`. Pooling (`pool_kernel`, centred, stride 1) covers only the tokens
//! before the window, as in SnapKV and kvpress: the window itself is always kept. Max pooling
//! ignores the padding; avg pooling counts it as zeros (PyTorch's `avg_pool1d` default).

use super::{dot, gather_k_row};
use crate::config::Pooling;
use crate::ensure_arg;
use crate::error::Result;
use crate::kernels::page_table::check_row;
use crate::kernels::KvCache;
use crate::with_dtype;

#[derive(Debug, Clone, Copy)]
pub struct SnapKv {
    pub cached_len: usize,
    pub window: usize,
    pub num_q_heads: usize,
    pub pool_kernel: usize,
    pub pool: Pooling,
}

impl SnapKv {
    pub fn check(&self, cache: &KvCache, queries_len: usize, out_len: usize) -> Result<()> {
        let (c, w, hq, h) = (
            self.cached_len,
            self.window,
            self.num_q_heads,
            cache.num_kv_heads,
        );
        ensure_arg!(
            w >= 1 && w <= c,
            "window = {w} must be in 1..=cached_len ({c})"
        );
        ensure_arg!(
            hq >= h && hq % h == 0,
            "num_q_heads = {hq} must be a multiple of num_kv_heads = {h}"
        );
        ensure_arg!(
            self.pool_kernel % 2 == 1,
            "pool_kernel = {} must be odd",
            self.pool_kernel
        );
        let q = w * hq * cache.head_dim;
        ensure_arg!(
            queries_len == q,
            "queries has {queries_len} entries; expected window * num_q_heads * head_dim = {q}"
        );
        ensure_arg!(
            out_len == h * c,
            "scores has {out_len} entries; expected num_kv_heads * cached_len = {}",
            h * c
        );
        Ok(())
    }
}

/// Score every cached token of every KV head into `out[h * cached_len + t]`. `queries` is
/// `[window][num_q_heads][head_dim]`, RoPE applied (as the attention kernel sees them); query
/// head `q` belongs to KV head `q / (num_q_heads / num_kv_heads)`. KV heads run in parallel.
///
/// # Safety
/// `cache` must describe live host tensors.
pub unsafe fn score_snapkv(
    cache: &KvCache,
    row: &[i32],
    queries: &[f32],
    p: &SnapKv,
    out: &mut [f32],
) -> Result<()> {
    p.check(cache, queries.len(), out.len())?;
    check_row(
        row,
        cache.num_blocks,
        p.cached_len.div_ceil(cache.block_size),
    )?;
    let c = p.cached_len;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(cache.num_kv_heads);
    let mut heads: Vec<(usize, &mut [f32])> = out.chunks_mut(c).enumerate().collect();
    let per = heads.len().div_ceil(threads);
    std::thread::scope(|s| {
        while !heads.is_empty() {
            let mine: Vec<_> = heads.drain(..per.min(heads.len())).collect();
            s.spawn(move || {
                let mut scratch = Scratch::new(c, cache.head_dim);
                for (h, o) in mine {
                    // SAFETY: validated above; each thread writes only its own heads' scores.
                    unsafe { score_head(cache, row, queries, p, h, &mut scratch, o) };
                }
            });
        }
    });
    Ok(())
}

struct Scratch {
    keys: Vec<f32>,
    acc: Vec<f32>,
    logits: Vec<f32>,
}

impl Scratch {
    fn new(c: usize, d: usize) -> Scratch {
        Scratch {
            keys: vec![0.0; c * d],
            acc: vec![0.0; c],
            logits: vec![0.0; c],
        }
    }
}

unsafe fn score_head(
    cache: &KvCache,
    row: &[i32],
    queries: &[f32],
    p: &SnapKv,
    h: usize,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let (c, w, d, bs) = (p.cached_len, p.window, cache.head_dim, cache.block_size);
    with_dtype!(cache.dtype, T => {
        for t in 0..c {
            // SAFETY: row checked for ceil(c / bs) blocks.
            unsafe { gather_k_row::<T>(cache, row[t / bs] as usize, h, t % bs, &mut s.keys[t * d..(t + 1) * d]) };
        }
    });
    let group = p.num_q_heads / cache.num_kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    s.acc.fill(0.0);
    for qh in h * group..(h + 1) * group {
        for i in 0..w {
            let q = &queries[(i * p.num_q_heads + qh) * d..][..d];
            let lim = c - w + i + 1;
            let mut m = f32::NEG_INFINITY;
            for t in 0..lim {
                let l = dot(q, &s.keys[t * d..(t + 1) * d]) * scale;
                s.logits[t] = l;
                m = m.max(l);
            }
            let mut z = 0f32;
            for l in &mut s.logits[..lim] {
                *l = (*l - m).exp();
                z += *l;
            }
            let inv = 1.0 / z;
            for (a, e) in s.acc[..lim].iter_mut().zip(&s.logits[..lim]) {
                *a += e * inv;
            }
        }
    }
    let n = c - w;
    pool(&s.acc[..n], p.pool_kernel / 2, p.pool, &mut out[..n]);
    out[n..].copy_from_slice(&s.acc[n..c]);
}

/// Centred 1-D pooling with radius `r` over `x` into `out`.
fn pool(x: &[f32], r: usize, kind: Pooling, out: &mut [f32]) {
    let n = x.len();
    for (t, o) in out.iter_mut().enumerate() {
        let win = &x[t.saturating_sub(r)..(t + r + 1).min(n)];
        *o = match kind {
            Pooling::Max => win.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            Pooling::Avg => win.iter().sum::<f32>() / (2 * r + 1) as f32,
        };
    }
}
