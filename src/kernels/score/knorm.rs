//! Key-norm scores: −‖K_t‖₂ per (KV head, cached token). Low-norm keys draw the most attention
//! (Devoto et al. 2024), so they score highest.

use super::gather_k_row;
use crate::ensure_arg;
use crate::error::Result;
use crate::kernels::page_table::{check_row, check_row_len};
use crate::kernels::KvCache;
use crate::with_dtype;

/// The shape checks of key-norm scoring (shared with the CUDA path): the row covers
/// `cached_len` tokens and `scores` holds one score per (KV head, token).
pub fn check_knorm(
    cache: &KvCache,
    row_len: usize,
    cached_len: usize,
    scores_len: usize,
) -> Result<()> {
    check_row_len(row_len, cached_len.div_ceil(cache.block_size))?;
    ensure_arg!(
        scores_len == cache.num_kv_heads * cached_len,
        "scores has {scores_len} entries; expected num_kv_heads * cached_len = {}",
        cache.num_kv_heads * cached_len
    );
    Ok(())
}

/// Write `out[h * cached_len + t] = -‖K[h][t]‖₂` for every KV head `h` and cached token `t`.
///
/// # Safety
/// `cache` must describe live host tensors.
pub unsafe fn score_knorm(
    cache: &KvCache,
    row: &[i32],
    cached_len: usize,
    out: &mut [f32],
) -> Result<()> {
    let (h, c, bs) = (cache.num_kv_heads, cached_len, cache.block_size);
    check_knorm(cache, row.len(), c, out.len())?;
    check_row(row, cache.num_blocks, c.div_ceil(bs))?;
    let mut k = vec![0f32; cache.head_dim];
    with_dtype!(cache.dtype, T => {
        for head in 0..h {
            for t in 0..c {
                // SAFETY: row checked, t < cached_len.
                unsafe { gather_k_row::<T>(cache, row[t / bs] as usize, head, t % bs, &mut k) };
                out[head * c + t] = -k.iter().map(|x| x * x).sum::<f32>().sqrt();
            }
        }
    });
    Ok(())
}
