//! Key-norm scores: −‖K_t‖₂ per (KV head, cached token). Low-norm keys draw the most attention
//! (Devoto et al. 2024), so they score highest.

use super::gather_k_row;
use crate::ensure_arg;
use crate::error::Result;
use crate::kernels::page_table::check_row;
use crate::kernels::KvCache;
use crate::with_dtype;

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
    check_row(row, cache.num_blocks, c.div_ceil(bs))?;
    ensure_arg!(
        out.len() == h * c,
        "scores has {} entries; expected num_kv_heads * cached_len = {}",
        out.len(),
        h * c
    );
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
