//! Quest page selection (Tang et al. 2024): per block and KV head, the element-wise min and max
//! of its keys; for a query, `Σ_d max(q_d·min_d, q_d·max_d)` bounds `q·k` for every key `k` in
//! the block, so the blocks with the highest bounds hold the keys that can matter most.
//! Metadata is indexed by physical block id, `[num_blocks][num_kv_heads][head_dim]` f32, owned by
//! the caller next to its KV cache.

use super::gather_k_row;
use crate::ensure_arg;
use crate::error::Result;
use crate::kernels::page_table::check_row;
use crate::kernels::KvCache;
use crate::with_dtype;

/// The metadata holds `[num_blocks][num_kv_heads][head_dim]` floats each (shared with the CUDA
/// path, like every shape check here).
pub(crate) fn check_meta(cache: &KvCache, min_len: usize, max_len: usize) -> Result<()> {
    let n = cache.num_blocks * cache.num_kv_heads * cache.head_dim;
    ensure_arg!(
        min_len == n && max_len == n,
        "block_min/block_max have {min_len}/{max_len} entries; expected num_blocks * num_kv_heads * head_dim = {n}"
    );
    Ok(())
}

/// The shapes of a bound call: whole query-head groups, one query, one score per row block.
pub(crate) fn check_bound_shape(
    cache: &KvCache,
    row_len: usize,
    num_q_heads: usize,
    query_len: usize,
    out_len: usize,
) -> Result<()> {
    let (h, d) = (cache.num_kv_heads, cache.head_dim);
    ensure_arg!(
        num_q_heads >= h && num_q_heads % h == 0,
        "num_q_heads = {num_q_heads} must be a multiple of num_kv_heads = {h}"
    );
    ensure_arg!(
        query_len == num_q_heads * d,
        "query has {query_len} entries; expected num_q_heads * head_dim = {}",
        num_q_heads * d
    );
    ensure_arg!(
        out_len == row_len,
        "block_scores has {out_len} entries; expected one per row block ({row_len})"
    );
    Ok(())
}

/// `block` is a physical block of `cache` holding `filled` (1..=block_size) written slots.
pub(crate) fn check_block_fill(cache: &KvCache, block: usize, filled: usize) -> Result<()> {
    ensure_arg!(
        block < cache.num_blocks,
        "block = {block} is not below num_blocks = {}",
        cache.num_blocks
    );
    ensure_arg!(
        filled >= 1 && filled <= cache.block_size,
        "filled = {filled} must be in 1..=block_size ({})",
        cache.block_size
    );
    Ok(())
}

/// Recompute the min/max metadata of physical block `block` from its first `filled` slots.
///
/// # Safety
/// `cache` must describe live host tensors.
pub unsafe fn quest_update_block(
    cache: &KvCache,
    block: usize,
    filled: usize,
    min: &mut [f32],
    max: &mut [f32],
) -> Result<()> {
    check_meta(cache, min.len(), max.len())?;
    check_block_fill(cache, block, filled)?;
    let d = cache.head_dim;
    let mut k = vec![0f32; d];
    for h in 0..cache.num_kv_heads {
        let at = (block * cache.num_kv_heads + h) * d;
        let (lo, hi) = (&mut min[at..at + d], &mut max[at..at + d]);
        lo.fill(f32::INFINITY);
        hi.fill(f32::NEG_INFINITY);
        for s in 0..filled {
            // SAFETY: block and slot checked above.
            with_dtype!(cache.dtype, T => unsafe { gather_k_row::<T>(cache, block, h, s, &mut k) });
            for i in 0..d {
                lo[i] = lo[i].min(k[i]);
                hi[i] = hi[i].max(k[i]);
            }
        }
    }
    Ok(())
}

/// For each block of `row`, the largest Quest bound over the query heads:
/// `out[j] = max_q Σ_d max(q_d·min[row[j]][g(q)][d], q_d·max[...][d])`, `query` being
/// `[num_q_heads][head_dim]` f32 and `g(q)` the query head's KV head.
pub fn quest_bound(
    cache: &KvCache,
    row: &[i32],
    query: &[f32],
    num_q_heads: usize,
    min: &[f32],
    max: &[f32],
    out: &mut [f32],
) -> Result<()> {
    check_meta(cache, min.len(), max.len())?;
    check_bound_shape(cache, row.len(), num_q_heads, query.len(), out.len())?;
    let (h, d) = (cache.num_kv_heads, cache.head_dim);
    check_row(row, cache.num_blocks, 0)?;
    let group = num_q_heads / h;
    for (o, &b) in out.iter_mut().zip(row) {
        let mut best = f32::NEG_INFINITY;
        for qh in 0..num_q_heads {
            let at = (b as usize * h + qh / group) * d;
            let q = &query[qh * d..(qh + 1) * d];
            let bound: f32 = (0..d)
                .map(|i| (q[i] * min[at + i]).max(q[i] * max[at + i]))
                .sum();
            best = best.max(bound);
        }
        *o = best;
    }
    Ok(())
}
