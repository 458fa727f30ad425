//! Quest page selection (Tang et al. 2024): per block and KV head, the element-wise min and max
//! of its keys; for a query, `Σ_d max(q_d·min_d, q_d·max_d)` bounds `q·k` for every key `k` in
//! the block, so the blocks with the highest bounds hold the keys that can matter most.
//! Metadata is indexed by physical block id, `[num_blocks][key_ranges][num_kv_heads][head_dim]`
//! f32, owned by the caller next to its KV cache. `key_ranges` (1, Quest's, or a divisor of the
//! block size) splits a block into that many runs of slots with a range each, and a block scores
//! as its best run: a tighter bound for that many times the metadata and scoring work. It is not
//! passed: the metadata's length says it (`meta_ranges`).
//!
//! `quest_bound` scores one sequence's row; `quest_select` is the serving call: every decode row
//! of a batch, one layer, scored and reduced to its best blocks in one call.

use super::gather_k_row;
use crate::ensure_arg;
use crate::error::{Error, Result};
use crate::kernels::page_table::check_row;
use crate::kernels::select::BlockSelect;
use crate::kernels::KvCache;
use crate::status::Status;
use crate::with_dtype;

/// The key ranges per block of metadata holding `[num_blocks][key_ranges][num_kv_heads][head_dim]`
/// floats each: 1, or a divisor of the block size (shared with the CUDA path, like every shape
/// check here).
pub(crate) fn meta_ranges(cache: &KvCache, min_len: usize, max_len: usize) -> Result<usize> {
    let n = cache.num_blocks * cache.num_kv_heads * cache.head_dim;
    let ranges = if n > 0 && min_len % n == 0 {
        min_len / n
    } else {
        0
    };
    ensure_arg!(
        min_len == max_len && ranges >= 1 && cache.block_size % ranges == 0,
        "block_min/block_max have {min_len}/{max_len} entries; expected num_blocks * num_kv_heads * head_dim = {n} \
         times the key ranges per block (1, or a divisor of block_size = {})",
        cache.block_size
    );
    Ok(ranges)
}

/// Where key range `range` of KV head `kv_head` of block `block` starts in metadata of `ranges`
/// key ranges per block (`[num_blocks][ranges][num_kv_heads][head_dim]`; kernels/kvsieve.cu
/// indexes it the same way).
#[inline(always)]
fn meta_at(cache: &KvCache, ranges: usize, block: usize, range: usize, kv_head: usize) -> usize {
    ((block * ranges + range) * cache.num_kv_heads + kv_head) * cache.head_dim
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

/// Recompute the min/max metadata of physical block `block` from its first `filled` slots: key
/// range `r` spans slots `r * block_size / key_ranges..` of them; a range with no filled slot
/// repeats the last filled one (a block scores as its best range, so a copy changes nothing).
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
    let ranges = meta_ranges(cache, min.len(), max.len())?;
    check_block_fill(cache, block, filled)?;
    let (h, d) = (cache.num_kv_heads, cache.head_dim);
    let span = cache.block_size / ranges;
    let mut k = vec![0f32; d];
    for r in 0..ranges {
        let slots = r * span..((r + 1) * span).min(filled);
        for kh in 0..h {
            let at = meta_at(cache, ranges, block, r, kh);
            if slots.is_empty() {
                let from = at - h * d; // r >= 1: range 0 holds slot 0, and filled >= 1
                min.copy_within(from..from + d, at);
                max.copy_within(from..from + d, at);
                continue;
            }
            let (lo, hi) = (&mut min[at..at + d], &mut max[at..at + d]);
            lo.fill(f32::INFINITY);
            hi.fill(f32::NEG_INFINITY);
            for s in slots.clone() {
                // SAFETY: block and slot checked above.
                with_dtype!(cache.dtype, T => unsafe { gather_k_row::<T>(cache, block, kh, s, &mut k) });
                for i in 0..d {
                    lo[i] = lo[i].min(k[i]);
                    hi[i] = hi[i].max(k[i]);
                }
            }
        }
    }
    Ok(())
}

/// `quest_update_block` for the `blocks[i]` (holding `filled[i]` slots) of one layer in one call:
/// the blocks a step filled, or those a compaction rewrote. Every entry is checked before any
/// metadata is written.
///
/// # Safety
/// `cache` must describe live host tensors.
pub unsafe fn quest_update_blocks(
    cache: &KvCache,
    blocks: &[i32],
    filled: &[i32],
    min: &mut [f32],
    max: &mut [f32],
) -> Result<()> {
    meta_ranges(cache, min.len(), max.len())?;
    check_block_list(cache, blocks, filled)?;
    for (&b, &f) in blocks.iter().zip(filled) {
        // SAFETY: the caller's cache; every block and fill checked above.
        unsafe { quest_update_block(cache, b as usize, f as usize, min, max)? };
    }
    Ok(())
}

/// The blocks and fills of `quest_update_blocks` (shared with the CUDA path).
pub(crate) fn check_block_list(cache: &KvCache, blocks: &[i32], filled: &[i32]) -> Result<()> {
    ensure_arg!(
        blocks.len() == filled.len(),
        "blocks has {} entries and filled {}; one fill per block",
        blocks.len(),
        filled.len()
    );
    for (i, (&b, &f)) in blocks.iter().zip(filled).enumerate() {
        ensure_arg!(b >= 0, "blocks[{i}] = {b} is negative");
        ensure_arg!(f >= 0, "filled[{i}] = {f} is negative");
        check_block_fill(cache, b as usize, f as usize)
            .map_err(|e| Error::invalid_arg(format!("entry {i}: {}", e.message)))?;
    }
    Ok(())
}

/// For each block of `row`, the largest Quest bound over its key ranges and the query heads:
/// `out[j] = max_{kr,q} Σ_d max(q_d·min[row[j]][kr][g(q)][d], q_d·max[...][d])`, `query` being
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
    let ranges = meta_ranges(cache, min.len(), max.len())?;
    check_bound_shape(cache, row.len(), num_q_heads, query.len(), out.len())?;
    let (h, d) = (cache.num_kv_heads, cache.head_dim);
    check_row(row, cache.num_blocks, 0)?;
    let group = num_q_heads / h;
    for (o, &b) in out.iter_mut().zip(row) {
        let mut best = f32::NEG_INFINITY;
        for kr in 0..ranges {
            for qh in 0..num_q_heads {
                let at = meta_at(cache, ranges, b as usize, kr, qh / group);
                let q = &query[qh * d..(qh + 1) * d];
                let bound: f32 = (0..d)
                    .map(|i| (q[i] * min[at + i]).max(q[i] * max[at + i]))
                    .sum();
                best = best.max(bound);
            }
        }
        *o = best;
    }
    Ok(())
}

/// The decode rows of one `quest_select` call, in vLLM's dense block-table form: row `r` holds
/// `blocks[r]` block ids at `table[r * stride..]`, in sequence order, and keeps `keep[r]` of
/// them when it has more. The kept count depends on the length only, so an engine computes
/// `keep` (and the reduced lengths, `reduced_len`) once per step for all its layers.
#[derive(Debug, Clone, Copy)]
pub struct QuestRows<'a> {
    pub table: &'a [i32],
    pub stride: usize,
    pub blocks: &'a [i32],
    pub keep: &'a [i32],
    /// Leading blocks always kept (the first holds the attention sinks).
    pub sink_blocks: usize,
    /// How much of each block's key range its score counts, in [0, 1]: 1 is Quest's upper bound
    /// (the whole min..max box), 0 the box's centre; see `bound_one`.
    pub spread: f32,
}

impl QuestRows<'_> {
    pub fn num_rows(&self) -> usize {
        self.blocks.len()
    }

    /// Row `r`'s block ids (valid once `check` passed).
    pub fn row(&self, r: usize) -> &[i32] {
        &self.table[r * self.stride..r * self.stride + self.blocks[r] as usize]
    }

    /// Blocks row `r` keeps: `keep[r]`, or all of them when it has no more.
    pub fn kept(&self, r: usize) -> usize {
        (self.blocks[r] as usize).min(self.keep[r] as usize)
    }

    /// The shapes of a call (shared with the CUDA path): the table holds every row, each row's
    /// kept blocks cover the sinks and the last (partial) block, the query is
    /// `[rows][num_q_heads][head_dim]`, the workspace one score per table entry and the output
    /// `[rows][out_stride]` room for every row's kept blocks.
    pub(crate) fn check(
        &self,
        cache: &KvCache,
        num_q_heads: usize,
        query_len: usize,
        workspace_len: usize,
        out_len: usize,
        out_stride: usize,
    ) -> Result<()> {
        let rows = self.num_rows();
        check_spread(self.spread)?;
        ensure_arg!(
            self.keep.len() == rows,
            "keep has {} entries; expected one per row ({rows})",
            self.keep.len()
        );
        ensure_arg!(
            self.table.len() >= rows * self.stride,
            "table has {} entries; {rows} rows of stride {} need {}",
            self.table.len(),
            self.stride,
            rows * self.stride
        );
        let d = cache.head_dim;
        ensure_arg!(
            query_len == rows * num_q_heads * d,
            "query has {query_len} entries; expected rows * num_q_heads * head_dim = {}",
            rows * num_q_heads * d
        );
        check_quest_sizes(
            cache,
            rows,
            self.stride,
            num_q_heads,
            workspace_len,
            out_len,
            out_stride,
        )?;
        // The same rules as the CUDA path's device check (kvs_quest_rows_check).
        for r in 0..rows {
            let (nb, k) = (self.blocks[r], self.keep[r]);
            ensure_arg!(
                nb >= 1 && nb as usize <= self.stride,
                "blocks[{r}] = {nb} must be in 1..=stride ({})",
                self.stride
            );
            ensure_arg!(
                k >= 1 && (k >= nb || k as usize > self.sink_blocks),
                "keep[{r}] = {k} must exceed sink_blocks = {} (the sinks and the last block always stay)",
                self.sink_blocks
            );
            ensure_arg!(
                self.kept(r) <= out_stride,
                "out_stride = {out_stride} cannot hold row {r}'s {} kept blocks",
                self.kept(r)
            );
        }
        Ok(())
    }
}

/// A `quest_select` spread (shared with the CUDA path): a fraction of the key box, 0..=1.
pub(crate) fn check_spread(spread: f32) -> Result<()> {
    ensure_arg!(
        (0.0..=1.0).contains(&spread),
        "spread = {spread} must be in 0..=1 (1: Quest's upper bound, 0: the keys' box centre)"
    );
    Ok(())
}

/// The sizes of a `quest_select` call the host knows on either device: query heads in whole
/// groups, a workspace of one score per table entry, room for `rows` output rows.
pub(crate) fn check_quest_sizes(
    cache: &KvCache,
    rows: usize,
    stride: usize,
    num_q_heads: usize,
    workspace_len: usize,
    out_len: usize,
    out_stride: usize,
) -> Result<()> {
    let h = cache.num_kv_heads;
    ensure_arg!(stride > 0, "stride is 0");
    ensure_arg!(
        num_q_heads >= h && num_q_heads % h == 0,
        "num_q_heads = {num_q_heads} must be a multiple of num_kv_heads = {h}"
    );
    if workspace_len < rows.saturating_mul(stride) {
        return Err(Error::new(
            Status::BufferTooSmall,
            format!(
                "workspace holds {workspace_len} scores; rows * stride = {} are needed",
                rows.saturating_mul(stride)
            ),
        ));
    }
    if out_len < rows.saturating_mul(out_stride) {
        return Err(Error::new(
            Status::BufferTooSmall,
            format!(
                "out holds {out_len} ids; rows * out_stride = {} are needed",
                rows.saturating_mul(out_stride)
            ),
        ));
    }
    Ok(())
}

/// The tokens attention reads from a row of `seq_len` tokens in blocks of `block_size` that keeps
/// `keep` blocks: whole kept blocks and the partial last one (the same for every layer). A `keep`
/// of 0 counts as 1 (the last block always stays); a `block_size` of 0 has no blocks to drop.
pub fn reduced_len(seq_len: usize, block_size: usize, keep: usize) -> usize {
    if block_size == 0 {
        return seq_len;
    }
    let keep = keep.max(1);
    let nb = seq_len.div_ceil(block_size);
    if nb <= keep {
        return seq_len;
    }
    (keep - 1) * block_size + (seq_len - (nb - 1) * block_size)
}

/// One layer's Quest selection for a batch of decode rows: each row's blocks scored by their
/// bound for the row's query (`[rows][num_q_heads][head_dim]` f32; the max over query heads and
/// the block's key ranges),
/// then the `keep[r]` best written ascending (sequence order) to `out[r * out_stride..]`, the
/// first `sink_blocks` and the last block always among them, the rest of the row set to `pad`.
/// `workspace` (caller-owned, `rows * stride` floats at least) holds the scores afterwards.
#[allow(clippy::too_many_arguments)]
pub fn quest_select(
    cache: &KvCache,
    rows: &QuestRows,
    query: &[f32],
    num_q_heads: usize,
    min: &[f32],
    max: &[f32],
    workspace: &mut [f32],
    out: &mut [i32],
    out_stride: usize,
    pad: i32,
) -> Result<()> {
    let ranges = meta_ranges(cache, min.len(), max.len())?;
    rows.check(
        cache,
        num_q_heads,
        query.len(),
        workspace.len(),
        out.len(),
        out_stride,
    )?;
    // Ids index the metadata: range-checked here; a repeated id only repeats a score.
    for r in 0..rows.num_rows() {
        if let Some((j, &b)) = rows
            .row(r)
            .iter()
            .enumerate()
            .find(|(_, &b)| b < 0 || b as usize >= cache.num_blocks)
        {
            return Err(Error::invalid_arg(format!(
                "table row {r}, block {j}: id {b} is not in 0..num_blocks ({})",
                cache.num_blocks
            )));
        }
    }
    bound_rows(cache, rows, ranges, query, num_q_heads, min, max, workspace);
    let mut pos = Vec::new();
    for r in 0..rows.num_rows() {
        let row = rows.row(r);
        let scores = &workspace[r * rows.stride..r * rows.stride + row.len()];
        let kept = rows.kept(r);
        let sel = BlockSelect {
            keep_blocks: kept,
            sink_blocks: rows.sink_blocks.min(kept - 1),
            recent_blocks: 1,
        };
        pos.clear();
        sel.select(scores, &mut pos);
        let dst = &mut out[r * out_stride..(r + 1) * out_stride];
        for (o, &j) in dst.iter_mut().zip(&pos) {
            *o = row[j as usize];
        }
        dst[kept..].fill(pad);
    }
    Ok(())
}

/// The bounds of every row's blocks into `workspace`, with AVX2 where the CPU has it.
#[allow(clippy::too_many_arguments)]
fn bound_rows(
    cache: &KvCache,
    rows: &QuestRows,
    ranges: usize,
    query: &[f32],
    num_q_heads: usize,
    min: &[f32],
    max: &[f32],
    workspace: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe {
            bound_rows_avx2(cache, rows, ranges, query, num_q_heads, min, max, workspace)
        };
    }
    bound_rows_body(cache, rows, ranges, query, num_q_heads, min, max, workspace)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn bound_rows_avx2(
    cache: &KvCache,
    rows: &QuestRows,
    ranges: usize,
    query: &[f32],
    num_q_heads: usize,
    min: &[f32],
    max: &[f32],
    workspace: &mut [f32],
) {
    bound_rows_body(cache, rows, ranges, query, num_q_heads, min, max, workspace)
}

/// Per block, key range and KV head: its min/max rows are read once and bound the `group` query
/// heads that share it while they sit in L1.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bound_rows_body(
    cache: &KvCache,
    rows: &QuestRows,
    ranges: usize,
    query: &[f32],
    num_q_heads: usize,
    min: &[f32],
    max: &[f32],
    workspace: &mut [f32],
) {
    let (h, d) = (cache.num_kv_heads, cache.head_dim);
    let group = num_q_heads / h;
    let shrink = shrink(rows.spread);
    for r in 0..rows.num_rows() {
        let q = &query[r * num_q_heads * d..(r + 1) * num_q_heads * d];
        let ids = rows.row(r);
        for (o, &b) in workspace[r * rows.stride..r * rows.stride + ids.len()]
            .iter_mut()
            .zip(ids)
        {
            let mut best = f32::NEG_INFINITY;
            for kr in 0..ranges {
                for kh in 0..h {
                    let at = meta_at(cache, ranges, b as usize, kr, kh);
                    let (l, u) = (&min[at..at + d], &max[at..at + d]);
                    for qh in kh * group..(kh + 1) * group {
                        best = best.max(bound_one(&q[qh * d..(qh + 1) * d], l, u, shrink));
                    }
                }
            }
            *o = best;
        }
    }
}

/// The fraction of its width each side of a block's key box loses before bounding:
/// `(1 - spread) / 2`, so `spread` 1 keeps the box (0.0, Quest's bound) and 0 shrinks it to its
/// centre (0.5). Computed once per call, the same way on CPU and CUDA.
#[inline(always)]
pub(crate) fn shrink(spread: f32) -> f32 {
    (1.0 - spread) * 0.5
}

/// `Σ_d max(q_d·lo'_d, q_d·hi'_d)` over the box shrunk by `t` (`shrink`) each side:
/// `hi' = hi - t·(hi - lo)`, `lo' = lo + t·(hi - lo)`, so that at `t = 0` it is Quest's bound
/// of `q·k` over the block's keys, and for larger `t` it weighs the box's centre more than its
/// extremes. Written as `q_d · (q_d >= 0 ? hi'_d : lo'_d)` (the same product, since
/// lo' <= hi') in 8 lanes, so it becomes a few multiplies, a compare, a blend and an add per
/// vector; then the lanes in order and the remainder. kernels/kvsieve.cu (`quest_bound_one`)
/// does these operations in this order, unfused, so the CPU and CUDA scores are the same bits
/// (and at `t = 0` the same bits as the plain bound: `hi - 0·w` is `hi`).
#[inline(always)]
fn bound_one(q: &[f32], lo: &[f32], hi: &[f32], t: f32) -> f32 {
    let edge = |x: f32, l: f32, u: f32| {
        let cut = t * (u - l);
        x * if x >= 0.0 { u - cut } else { l + cut }
    };
    let mut acc = [0f32; 8];
    let (cq, cl, cu) = (q.chunks_exact(8), lo.chunks_exact(8), hi.chunks_exact(8));
    let (rq, rl, ru) = (cq.remainder(), cl.remainder(), cu.remainder());
    for ((x, l), u) in cq.zip(cl).zip(cu) {
        for i in 0..8 {
            acc[i] += edge(x[i], l[i], u[i]);
        }
    }
    let mut s = acc[0];
    for a in &acc[1..] {
        s += a;
    }
    for ((x, l), u) in rq.iter().zip(rl).zip(ru) {
        s += edge(*x, *l, *u);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{DType, KvCacheDesc, Layout};

    /// The AVX2 build of the bound sums in the same order as the portable one (8 lanes, no
    /// fused multiply-add), so a CPU's features never change which blocks are selected.
    #[test]
    fn avx2_and_portable_bounds_are_bit_identical() {
        // head_dim 75: eight lanes and a remainder of three.
        let (num_blocks, h, d, nq, stride) = (64usize, 3usize, 75usize, 9usize, 40usize);
        let (mut k, mut v) = (
            vec![0f32; num_blocks * 16 * h * d],
            vec![0f32; num_blocks * 16 * h * d],
        );
        let cache = KvCache::new(&KvCacheDesc {
            k: k.as_mut_ptr().cast(),
            v: v.as_mut_ptr().cast(),
            dtype: DType::F32 as u32,
            layout: Layout::Nhd as u32,
            device: 0,
            num_blocks: num_blocks as u32,
            block_size: 16,
            num_kv_heads: h as u32,
            head_dim: d as u32,
            block_stride: 0,
            token_stride: 0,
            head_stride: 0,
        })
        .unwrap();
        let mut unit = crate::kernels::score::test_units(0x2545_f491_4f6c_dd1d);
        let n = num_blocks * h * d;
        let (a, b): (Vec<f32>, Vec<f32>) = (0..2 * n).map(|_| (unit(), unit())).unzip();
        let lo: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a.min(*b)).collect();
        let hi: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a.max(*b)).collect();
        let table: Vec<i32> = (0..2 * stride as i32)
            .map(|i| (i * 7) % num_blocks as i32)
            .collect();
        let (blocks, keep) = ([stride as i32, 33], [8, 8]);
        let rows = QuestRows {
            table: &table,
            stride,
            blocks: &blocks,
            keep: &keep,
            sink_blocks: 1,
            spread: 0.5,
        };
        let q: Vec<f32> = (0..2 * nq * d).map(|_| unit()).collect();
        let (mut fast, mut plain) = (vec![0f32; 2 * stride], vec![0f32; 2 * stride]);
        // One key range per block, and two: the same loops over more entries.
        for ranges in [1, 2] {
            bound_rows(
                &cache,
                &rows,
                ranges,
                &q,
                nq,
                &lo[..n * ranges],
                &hi[..n * ranges],
                &mut fast,
            );
            bound_rows_body(
                &cache,
                &rows,
                ranges,
                &q,
                nq,
                &lo[..n * ranges],
                &hi[..n * ranges],
                &mut plain,
            );
            assert_eq!(
                fast.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
