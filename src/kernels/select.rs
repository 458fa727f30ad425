//! Selection: which cached tokens (per KV head) or which blocks (per sequence) stay.
//!
//! Both reduce to one primitive, `keep_positions`: of the positions `[lo, hi)`, keep the sinks
//! `[lo, sink_end)` and the tail `[tail_start, hi)`, plus the highest-scoring positions of the
//! middle, ties to the earlier position, written ascending. It finds the score threshold with a
//! sampled bracket and an O(n) selection over order-preserving integer keys, then emits in
//! position order, so no sort is ever needed.

use crate::ensure_arg;
use crate::error::{Error, Result};
use crate::status::Status;

/// Order-preserving map of f32 to u32 (larger score → larger key). NaN sorts below -inf, so a
/// NaN score is never preferred over a number. Branch-free apart from the NaN select.
#[inline(always)]
pub fn score_key(x: f32) -> u32 {
    let b = x.to_bits();
    let k = b ^ ((((b as i32) >> 31) as u32) | 0x8000_0000);
    if x.is_nan() {
        0
    } else {
        k
    }
}

thread_local! {
    /// Per-thread scratch (keys, candidates) reused across calls: fresh allocations of this
    /// size cost page faults on every call, which dominated selection time.
    static SCRATCH: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Exact `(key of the need-th largest, count of keys above it)` by O(n) selection.
fn threshold_exact(keys: &[u32], need: usize, work: &mut Vec<u32>) -> (u32, usize) {
    work.clear();
    work.extend_from_slice(keys);
    let (_, &mut t, _) = work.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    (t, count_above(keys, t))
}

/// How many keys exceed `t` (a vectorisable reduction).
fn count_above(keys: &[u32], t: u32) -> usize {
    keys.iter().map(|&k| (k > t) as u32).sum::<u32>() as usize
}

/// The key of the `need`-th largest of `keys` (1-based) and how many keys are above it.
///
/// Floyd-Rivest style: a strided sample brackets the threshold, one pass counts the keys above
/// the bracket and collects the few inside it, and an exact selection runs on those. When the
/// bracket misses (adversarial orderings), the exact O(n) selection runs instead.
fn threshold(keys: &[u32], need: usize, cand: &mut Vec<u32>) -> (u32, usize) {
    let n = keys.len();
    if n < 2048 {
        return threshold_exact(keys, need, cand);
    }
    // An eighth of the keys, at most 1024: enough for a tight bracket, cheap to select in.
    let sample_len = (n / 8).min(1024);
    let step = n / sample_len;
    let mut sample: Vec<u32> = (0..sample_len).map(|i| keys[i * step + step / 2]).collect();
    // The threshold's expected place in the ascending sample, with a margin of ~4 standard
    // deviations of the sample quantile; only the two bracket keys are needed, not a sort.
    let p = need as f64 / n as f64;
    let at = (1.0 - p) * sample_len as f64;
    let margin = 4.0 * (sample_len as f64 * p * (1.0 - p)).sqrt() + 8.0;
    let lo_i = (at - margin).floor();
    let hi_i = (at + margin).ceil();
    let hi_key = if hi_i >= (sample_len - 1) as f64 {
        u32::MAX
    } else {
        *sample.select_nth_unstable(hi_i as usize).1
    };
    let lo_key = if lo_i <= 0.0 {
        0
    } else {
        *sample[..hi_i.min((sample_len - 1) as f64) as usize + 1]
            .select_nth_unstable(lo_i as usize)
            .1
    };
    let above = count_above(keys, hi_key);
    if above >= need {
        return threshold_exact(keys, need, cand);
    }
    // Branch-free collection: always write, advance on a hit (the bracket holds ~12% of keys,
    // a branch on it mispredicts often).
    cand.clear();
    cand.resize(n + 1, 0);
    let mut c = 0usize;
    for &k in keys {
        cand[c] = k;
        c += ((k >= lo_key) & (k <= hi_key)) as usize;
    }
    cand.truncate(c);
    if above + cand.len() < need {
        return threshold_exact(keys, need, cand);
    }
    let r = need - above; // 1-based rank inside the bracket
    let (_, &mut t, _) = cand.select_nth_unstable_by(r - 1, |a, b| b.cmp(a));
    let gt = cand.iter().filter(|&&k| k > t).count();
    (t, above + gt)
}

/// Bit j of the first mask: `chunk[j] > t`; of the second: `chunk[j] == t` (chunk of <= 64).
#[inline]
fn masks(chunk: &[u32], t: u32) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    if chunk.len() == 64 {
        // SAFETY: SSE2 is part of the x86_64 baseline; the chunk holds 64 keys.
        return unsafe { masks_sse2(chunk, t) };
    }
    let (mut gt, mut eq) = (0u64, 0u64);
    for (j, &k) in chunk.iter().enumerate() {
        gt |= ((k > t) as u64) << j;
        eq |= ((k == t) as u64) << j;
    }
    (gt, eq)
}

/// `masks` four keys per instruction: unsigned compares as signed ones on sign-flipped keys,
/// and `movemask` to gather the lane bits.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn masks_sse2(chunk: &[u32], t: u32) -> (u64, u64) {
    use std::arch::x86_64::*;
    let flip = _mm_set1_epi32(i32::MIN);
    let tv = _mm_set1_epi32(t as i32);
    let ts = _mm_xor_si128(tv, flip);
    let (mut gt, mut eq) = (0u64, 0u64);
    for q in 0..16 {
        // SAFETY: 16 groups of 4 within the 64 keys; unaligned load.
        let v = unsafe { _mm_loadu_si128(chunk.as_ptr().add(4 * q) as *const __m128i) };
        let g = _mm_cmpgt_epi32(_mm_xor_si128(v, flip), ts);
        let e = _mm_cmpeq_epi32(v, tv);
        gt |= (_mm_movemask_ps(_mm_castsi128_ps(g)) as u64) << (4 * q);
        eq |= (_mm_movemask_ps(_mm_castsi128_ps(e)) as u64) << (4 * q);
    }
    (gt, eq)
}

/// Push `base + i` for the keys above `t`, and for the first `ties` keys equal to `t`, in
/// order. Works 64 keys at a time: build bit masks (vectorisable), then walk the set bits.
fn emit(keys: &[u32], t: u32, mut ties: usize, base: usize, out: &mut Vec<u32>) {
    for (c, chunk) in keys.chunks(64).enumerate() {
        let (gt, mut eq) = masks(chunk, t);
        if ties < eq.count_ones() as usize {
            // Keep only the lowest `ties` tie bits: the earliest positions win.
            let mut m = eq;
            for _ in 0..ties {
                m &= m - 1;
            }
            eq &= !m;
        }
        ties -= eq.count_ones() as usize;
        let mut take = gt | eq;
        let at = base + c * 64;
        while take != 0 {
            out.push((at + take.trailing_zeros() as usize) as u32);
            take &= take - 1;
        }
    }
}

/// Append to `out` the positions kept out of `[lo, hi)` (see the module doc). `scores[i]` is the
/// score of position `lo + i`; with `scores == None` the middle is filled by recency (streaming).
/// Preconditions (checked by the public callers): `lo <= sink_end <= tail_start <= hi`,
/// `k >= (sink_end - lo) + (hi - tail_start)`, `k <= hi - lo`.
pub fn keep_positions(
    scores: Option<&[f32]>,
    lo: usize,
    sink_end: usize,
    tail_start: usize,
    hi: usize,
    k: usize,
    out: &mut Vec<u32>,
) {
    let need = k - (sink_end - lo) - (hi - tail_start);
    out.extend((lo..sink_end).map(|p| p as u32));
    let mid_len = tail_start - sink_end;
    match scores {
        _ if need == 0 => {}
        _ if need == mid_len => out.extend((sink_end..tail_start).map(|p| p as u32)),
        None => out.extend((tail_start - need..tail_start).map(|p| p as u32)),
        Some(s) => SCRATCH.with(|scratch| {
            let (keys, cand) = &mut *scratch.borrow_mut();
            keys.clear();
            keys.extend(
                s[sink_end - lo..tail_start - lo]
                    .iter()
                    .map(|&x| score_key(x)),
            );
            let (t, gt) = threshold(keys, need, cand);
            emit(keys, t, need - gt, sink_end, out);
        }),
    }
    out.extend((tail_start..hi).map(|p| p as u32));
}

/// What one token-selection call keeps, per KV head.
#[derive(Debug, Clone, Copy)]
pub struct TokenSelect {
    pub cached_len: usize,
    /// Leading cached tokens that are never selected or moved (whole blocks).
    pub protected_len: usize,
    /// Cached positions `[0, sink_tokens)` are kept.
    pub sink_tokens: usize,
    /// The last `protected_tail` cached positions are kept.
    pub protected_tail: usize,
    /// Tokens kept after the protected prefix, per head (`kvs_keep_plan.selected_tokens`).
    pub selected: usize,
}

impl TokenSelect {
    /// `(sink_end, tail_start)` of the selectable range `[protected_len, cached_len)`.
    pub fn regions(&self) -> (usize, usize) {
        let (p, c) = (self.protected_len, self.cached_len);
        let sink_end = self.sink_tokens.clamp(p, c);
        let tail_start = c.saturating_sub(self.protected_tail).max(sink_end);
        (sink_end, tail_start)
    }

    pub fn check(&self) -> Result<()> {
        let (p, c, k) = (self.protected_len, self.cached_len, self.selected);
        ensure_arg!(p <= c, "protected_len = {p} exceeds cached_len = {c}");
        ensure_arg!(
            k <= c - p,
            "selected = {k} exceeds the {} tokens after the protected prefix",
            c - p
        );
        let (sink_end, tail_start) = self.regions();
        let always = (sink_end - p) + (c - tail_start);
        ensure_arg!(
            k >= always,
            "selected = {k} is fewer than the {always} sink and recent tokens always kept; \
             take the count from kvs_plan_keep_count"
        );
        Ok(())
    }

    /// `check`, and the buffers of `num_heads` heads: `scores_len` scores (None: streaming,
    /// no scores) and `keep_len` kept positions. Shared by the CPU and CUDA paths.
    pub fn check_buffers(
        &self,
        num_heads: usize,
        scores_len: Option<usize>,
        keep_len: usize,
    ) -> Result<()> {
        ensure_arg!(num_heads > 0, "num_heads is 0");
        self.check()?;
        let c = self.cached_len;
        if let Some(n) = scores_len {
            ensure_arg!(
                n == num_heads * c,
                "scores has {n} entries; expected num_heads * cached_len = {}",
                num_heads * c
            );
        }
        ensure_arg!(
            keep_len == num_heads * self.selected,
            "keep has {keep_len} entries; expected num_heads * selected = {}",
            num_heads * self.selected
        );
        Ok(())
    }
}

/// Select, for each of `num_heads` KV heads, the `p.selected` cached positions to keep.
/// `scores` is `[num_heads][cached_len]` (None: streaming, by recency); `out` is
/// `[num_heads][selected]`, each row ascending and unique.
pub fn select_tokens(
    scores: Option<&[f32]>,
    num_heads: usize,
    p: &TokenSelect,
    out: &mut [u32],
) -> Result<()> {
    p.check_buffers(num_heads, scores.map(<[f32]>::len), out.len())?;
    let c = p.cached_len;
    let (sink_end, tail_start) = p.regions();
    let mut buf = Vec::with_capacity(p.selected);
    for h in 0..num_heads {
        buf.clear();
        let row = scores.map(|s| &s[h * c + p.protected_len..(h + 1) * c]);
        keep_positions(
            row,
            p.protected_len,
            sink_end,
            tail_start,
            c,
            p.selected,
            &mut buf,
        );
        debug_assert_eq!(buf.len(), p.selected);
        out[h * p.selected..(h + 1) * p.selected].copy_from_slice(&buf);
    }
    Ok(())
}

/// Block-level selection for one sequence (Quest, block-granular eviction).
#[derive(Debug, Clone, Copy)]
pub struct BlockSelect {
    /// Blocks kept when the sequence has more.
    pub keep_blocks: usize,
    /// Leading blocks always kept.
    pub sink_blocks: usize,
    /// Trailing blocks always kept; at least 1 (the block being written).
    pub recent_blocks: usize,
}

impl BlockSelect {
    pub fn check(&self) -> Result<()> {
        ensure_arg!(
            self.recent_blocks >= 1,
            "recent_blocks is 0; the last (partial) block must stay"
        );
        ensure_arg!(
            self.keep_blocks >= self.sink_blocks + self.recent_blocks,
            "keep_blocks = {} is below sink_blocks + recent_blocks = {}",
            self.keep_blocks,
            self.sink_blocks + self.recent_blocks
        );
        Ok(())
    }

    /// Positions in the row of the blocks kept out of `nb`, ascending.
    pub fn select(&self, scores: &[f32], out: &mut Vec<u32>) {
        let nb = scores.len();
        if nb <= self.keep_blocks {
            out.extend(0..nb as u32);
            return;
        }
        let tail_start = nb - self.recent_blocks;
        keep_positions(
            Some(scores),
            0,
            self.sink_blocks,
            tail_start,
            nb,
            self.keep_blocks,
            out,
        );
    }
}

/// Select blocks for a batch in CSR form. Writes `out_indptr[num_seqs + 1]`, the kept block ids
/// into `out_indices` (capacity checked) and copies `last_page_len` (the last block always stays).
/// Returns the number of kept indices.
#[allow(clippy::too_many_arguments)]
pub fn select_blocks_csr(
    indptr: &[i32],
    indices: &[i32],
    last_page_len: &[i32],
    block_scores: &[f32],
    p: &BlockSelect,
    out_indptr: &mut [i32],
    out_indices: &mut [i32],
    out_last_page_len: &mut [i32],
) -> Result<usize> {
    p.check()?;
    super::page_table::check_csr(indptr, indices.len(), last_page_len, None)?;
    ensure_arg!(
        block_scores.len() == indices.len(),
        "block_scores has {} entries; expected one per index ({})",
        block_scores.len(),
        indices.len()
    );
    let n = last_page_len.len();
    ensure_arg!(
        out_indptr.len() == n + 1 && out_last_page_len.len() == n,
        "out_indptr needs num_seqs + 1 = {} entries and out_last_page_len num_seqs = {n}",
        n + 1
    );
    let needed: usize = (0..n)
        .map(|i| ((indptr[i + 1] - indptr[i]) as usize).min(p.keep_blocks))
        .sum();
    if out_indices.len() < needed {
        return Err(Error::new(
            Status::BufferTooSmall,
            format!(
                "out_indices holds {} entries; this batch keeps {needed}",
                out_indices.len()
            ),
        ));
    }
    let mut pos = Vec::new();
    let mut w = 0usize;
    out_indptr[0] = 0;
    for i in 0..n {
        let (a, b) = (indptr[i] as usize, indptr[i + 1] as usize);
        pos.clear();
        p.select(&block_scores[a..b], &mut pos);
        for &j in &pos {
            out_indices[w] = indices[a + j as usize];
            w += 1;
        }
        out_indptr[i + 1] = w as i32;
        out_last_page_len[i] = last_page_len[i];
    }
    Ok(w)
}

/// Select blocks of one dense block-table row (vLLM): kept ids in order into `out_row`, the rest
/// of `out_row` filled with `pad`. Returns the number kept.
pub fn select_blocks_row(
    row: &[i32],
    block_scores: &[f32],
    p: &BlockSelect,
    pad: i32,
    out_row: &mut [i32],
) -> Result<usize> {
    p.check()?;
    ensure_arg!(
        block_scores.len() == row.len(),
        "block_scores has {} entries; expected one per block ({})",
        block_scores.len(),
        row.len()
    );
    let kept = row.len().min(p.keep_blocks);
    if out_row.len() < kept {
        return Err(Error::new(
            Status::BufferTooSmall,
            format!("out_row holds {} blocks; {kept} are kept", out_row.len()),
        ));
    }
    let mut pos = Vec::with_capacity(kept);
    p.select(block_scores, &mut pos);
    for (o, &j) in out_row.iter_mut().zip(&pos) {
        *o = row[j as usize];
    }
    out_row[kept..].fill(pad);
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_preserve_order_and_put_nan_last() {
        let xs = [
            f32::NAN,
            f32::NEG_INFINITY,
            -1e30,
            -1.0,
            -0.0,
            0.0,
            1e-30,
            1.0,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(score_key(w[0]) < score_key(w[1]), "{:?}", w);
        }
    }

    /// Long inputs take the sampled-bracket path; sorted, constant, few-level and NaN-laden
    /// inputs push it into its fallback. All must equal the full-sort reference.
    #[test]
    fn sampled_threshold_matches_full_sort_on_long_inputs() {
        let n = 50_000usize;
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let inputs: Vec<(&str, Vec<f32>)> = vec![
            (
                "uniform",
                (0..n).map(|_| (rnd() >> 40) as f32 / 1e7).collect(),
            ),
            ("ascending", (0..n).map(|i| i as f32).collect()),
            ("descending", (0..n).map(|i| -(i as f32)).collect()),
            ("constant", vec![0.5; n]),
            ("three levels", (0..n).map(|_| (rnd() % 3) as f32).collect()),
            (
                "nan and inf",
                (0..n)
                    .map(|i| match i % 5 {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        _ => (rnd() % 100) as f32,
                    })
                    .collect(),
            ),
            (
                "clustered",
                (0..n)
                    .map(|i| {
                        if i % 1000 == 0 {
                            1e6
                        } else {
                            -((rnd() % 7) as f32)
                        }
                    })
                    .collect(),
            ),
        ];
        for (name, scores) in &inputs {
            for k in [1usize, 17, 1000, n / 4, n / 2, n - 3] {
                let mut out = Vec::new();
                keep_positions(Some(scores), 0, 0, n, n, k, &mut out);
                let want = crate::kernels::reference::keep_positions(Some(scores), 0, 0, n, n, k);
                assert_eq!(out, want, "{name}, k = {k}");
            }
        }
    }

    #[test]
    fn ties_go_to_the_earlier_position() {
        let scores = [1.0, 5.0, 5.0, 5.0, 2.0, 5.0, 0.0, 0.0];
        let mut out = Vec::new();
        // Keep position 0 (sink) and 7 (tail), plus 3 of the middle: three of the four 5.0s,
        // the earliest ones.
        keep_positions(Some(&scores), 0, 1, 7, 8, 5, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3, 7]);
    }

    #[test]
    fn streaming_keeps_sinks_and_the_most_recent() {
        let p = TokenSelect {
            cached_len: 20,
            protected_len: 0,
            sink_tokens: 2,
            protected_tail: 4,
            selected: 8,
        };
        let mut out = vec![0u32; 8];
        select_tokens(None, 1, &p, &mut out).unwrap();
        assert_eq!(out, vec![0, 1, 14, 15, 16, 17, 18, 19]);
    }

    #[test]
    fn protected_prefix_is_never_selected() {
        let p = TokenSelect {
            cached_len: 40,
            protected_len: 16,
            sink_tokens: 4,
            protected_tail: 4,
            selected: 10,
        };
        let scores: Vec<f32> = (0..40)
            .map(|i| if i < 16 { 100.0 } else { i as f32 % 7.0 })
            .collect();
        let mut out = vec![0u32; 10];
        select_tokens(Some(&scores), 1, &p, &mut out).unwrap();
        assert!(out.iter().all(|&t| t >= 16), "{out:?}");
        assert!(out.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(&out[6..], &[36, 37, 38, 39]);
    }

    #[test]
    fn impossible_counts_are_refused() {
        let p = TokenSelect {
            cached_len: 20,
            protected_len: 0,
            sink_tokens: 4,
            protected_tail: 8,
            selected: 10,
        };
        let e = select_tokens(None, 1, &p, &mut [0; 10]).unwrap_err();
        assert!(e.message.contains("fewer than the 12"), "{}", e.message);
        let p = TokenSelect { selected: 21, ..p };
        assert!(select_tokens(None, 1, &p, &mut [0; 21]).is_err());
        let p = TokenSelect { selected: 12, ..p };
        assert!(select_tokens(Some(&[0.0; 19]), 1, &p, &mut [0; 12])
            .unwrap_err()
            .message
            .contains("scores has 19"));
    }

    #[test]
    fn block_selection_in_csr_and_dense_forms() {
        let p = BlockSelect {
            keep_blocks: 3,
            sink_blocks: 1,
            recent_blocks: 1,
        };
        // Two sequences: 5 blocks (keep 3) and 2 blocks (keep both).
        let indptr = [0, 5, 7];
        let indices = [10, 11, 12, 13, 14, 20, 21];
        let scores = [0.0, 1.0, 9.0, 3.0, 0.0, 0.0, 0.0];
        let (mut oi, mut ox, mut ol) = ([0; 3], [0; 7], [0; 2]);
        let n = select_blocks_csr(
            &indptr,
            &indices,
            &[7, 3],
            &scores,
            &p,
            &mut oi,
            &mut ox,
            &mut ol,
        )
        .unwrap();
        assert_eq!(
            (n, oi, &ox[..n], ol),
            (5, [0, 3, 5], &[10, 12, 14, 20, 21][..], [7, 3])
        );
        let mut row = [0; 6];
        let kept = select_blocks_row(&indices[..5], &scores[..5], &p, -1, &mut row).unwrap();
        assert_eq!((kept, row), (3, [10, 12, 14, -1, -1, -1]));
        let e = select_blocks_csr(
            &indptr,
            &indices,
            &[7, 3],
            &scores,
            &p,
            &mut oi,
            &mut [0; 4],
            &mut ol,
        )
        .unwrap_err();
        assert_eq!(e.status, Status::BufferTooSmall);
    }
}
