//! Property tests: every CPU kernel against its naive reference in `kvsieve::kernels::reference`,
//! over random shapes (block sizes 16-256, GQA 1-8, lengths on and off block boundaries), all
//! layouts and dtypes.

mod common;

use common::{random_keep, random_meta, random_row, Rng, TestCache};
use kvsieve::config::Pooling;
use kvsieve::kernels::compact::{compact, Compaction};
use kvsieve::kernels::reference;
use kvsieve::kernels::score::knorm::score_knorm;
use kvsieve::kernels::score::quest::{
    quest_bound, quest_select, quest_update_block, quest_update_blocks, reduced_len, QuestRows,
};
use kvsieve::kernels::score::snapkv::{score_snapkv, SnapKv};
use kvsieve::kernels::select::{
    keep_positions, select_blocks_csr, select_tokens, BlockSelect, TokenSelect,
};
use kvsieve::kernels::{DType, Layout};
use proptest::prelude::*;

const BLOCK_SIZES: [usize; 5] = [16, 32, 64, 128, 256];

fn layout_dtype(i: usize) -> (Layout, DType) {
    [
        (Layout::Nhd, DType::F32),
        (Layout::Nhd, DType::F16),
        (Layout::Nhd, DType::Bf16),
        (Layout::Hnd, DType::F32),
        (Layout::Hnd, DType::F16),
        (Layout::Hnd, DType::Bf16),
        (Layout::VllmCpuVec, DType::F32),
        (Layout::VllmCpuVec, DType::Bf16),
        (Layout::VllmCpuAmx, DType::Bf16),
    ][i]
}

/// Random shape: (layout, dtype, block size, kv heads, head dim, cached length, protected blocks).
#[derive(Debug, Clone)]
struct Shape {
    layout: Layout,
    dtype: DType,
    block_size: usize,
    heads: usize,
    head_dim: usize,
    cached_len: usize,
    protected_blocks: usize,
    guards: usize,
    seed: u64,
}

fn shape(max_len: usize) -> impl Strategy<Value = Shape> {
    (
        0..9usize,
        0..5usize,
        1..=3usize,
        prop::sample::select(vec![12usize, 16, 32, 64, 70]),
        1..max_len,
        any::<bool>(),
        0..3usize,
        1..4usize,
        any::<u64>(),
    )
        .prop_map(
            |(ld, bsi, heads, head_dim, len, aligned, pblocks, guards, seed)| {
                let (layout, dtype) = layout_dtype(ld);
                let block_size = BLOCK_SIZES[bsi];
                // Half the cases end exactly on a block boundary.
                let cached_len = if aligned {
                    len.div_ceil(block_size) * block_size
                } else {
                    len
                };
                let protected_blocks = pblocks.min(cached_len / block_size);
                // Head sizes off the 8-lane SIMD width (12, 70) reach the kernels' remainder
                // paths; the AMX packing takes multiples of 16 only.
                let head_dim = if layout == Layout::VllmCpuAmx {
                    head_dim.next_multiple_of(16)
                } else {
                    head_dim
                };
                Shape {
                    layout,
                    dtype,
                    block_size,
                    heads,
                    head_dim,
                    cached_len,
                    protected_blocks,
                    guards,
                    seed,
                }
            },
        )
}

impl Shape {
    fn blocks(&self) -> usize {
        self.cached_len.div_ceil(self.block_size)
    }
    fn make(&self, rng: &mut Rng, bits: bool) -> (TestCache, Vec<i32>) {
        let num_blocks = self.blocks() + self.guards;
        let mut t = TestCache::new(
            self.layout,
            self.dtype,
            num_blocks,
            self.block_size,
            self.heads,
            self.head_dim,
        );
        if bits {
            t.fill_bits(rng);
        } else {
            t.fill_values(rng);
        }
        let row = random_row(rng, num_blocks, self.blocks());
        (t, row)
    }
}

fn close(a: f32, b: f32, rel: f32) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-6
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Compaction equals a gather from a snapshot, bit for bit, over the whole tensors: nothing
    /// outside the row's blocks after the protected prefix changes (guard blocks, prefix).
    #[test]
    fn compaction_is_exact_and_stays_in_its_row(s in shape(700), frac in 0.0f64..=1.0) {
        let mut rng = Rng(s.seed);
        let (t, row) = s.make(&mut rng, true);
        let cache = t.cache();
        let p = s.protected_blocks * s.block_size;
        let avail = s.cached_len - p;
        let k = ((avail as f64) * frac) as usize;
        let keep = random_keep(&mut rng, s.heads, p, s.cached_len, k);
        let before_k = t.k.clone();
        let before_v = t.v.clone();
        let req = Compaction { row: &row, cached_len: s.cached_len, protected_len: p, keep: &keep, selected: k, dest: None };
        let released = unsafe { compact(&cache, &req) }.unwrap();
        prop_assert_eq!(released, (p + k).div_ceil(s.block_size)..s.blocks());

        let mut expect = TestCache::new(s.layout, s.dtype, cache.num_blocks, s.block_size, s.heads, s.head_dim);
        expect.k.copy_from_slice(&before_k);
        expect.v.copy_from_slice(&before_v);
        let ec = expect.cache();
        unsafe { reference::compact(&ec, &row, p, &keep, k, expect.elems, expect.elems) };
        prop_assert!(t.k == expect.k, "K differs from the reference");
        prop_assert!(t.v == expect.v, "V differs from the reference");

        // Independently of the reference: bytes outside the row's blocks from P on are untouched.
        let esz = s.dtype.size();
        let touched: std::collections::HashSet<usize> =
            row[s.protected_blocks..].iter().map(|&b| b as usize).collect();
        let kb: &[u8] = bytemuck_u8(&before_k);
        let ka: &[u8] = bytemuck_u8(&t.k);
        for b in 0..cache.num_blocks {
            if touched.contains(&b) { continue; }
            for h in 0..s.heads { for slot in 0..s.block_size { for d in 0..s.head_dim {
                let o = cache.k_offset(b, h, slot, d) * esz;
                prop_assert_eq!(&kb[o..o + esz], &ka[o..o + esz], "K of block {} changed", b);
            }}}
        }
    }

    /// Out-of-place compaction equals the reference gather into `dest`, bit for bit, and writes
    /// nothing but `dest`'s blocks: the source row (which other sequences may share through a
    /// prefix cache) keeps every byte.
    #[test]
    fn out_of_place_compaction_is_exact_and_leaves_the_row(s in shape(700), frac in 0.0f64..=1.0) {
        let mut rng = Rng(s.seed);
        let p = s.protected_blocks * s.block_size;
        let k = (((s.cached_len - p) as f64) * frac) as usize;
        let nd = k.div_ceil(s.block_size);
        let num_blocks = s.blocks() + nd + s.guards;
        let mut t = TestCache::new(s.layout, s.dtype, num_blocks, s.block_size, s.heads, s.head_dim);
        t.fill_bits(&mut rng);
        let ids = random_row(&mut rng, num_blocks, s.blocks() + nd);
        let (row, dest) = ids.split_at(s.blocks());
        let keep = random_keep(&mut rng, s.heads, p, s.cached_len, k);
        let (before_k, before_v) = (t.k.clone(), t.v.clone());
        let cache = t.cache();
        let req = Compaction { row, cached_len: s.cached_len, protected_len: p, keep: &keep, selected: k, dest: Some(dest) };
        let released = unsafe { compact(&cache, &req) }.unwrap();
        prop_assert_eq!(released, s.protected_blocks..s.blocks());

        let mut expect = TestCache::new(s.layout, s.dtype, num_blocks, s.block_size, s.heads, s.head_dim);
        expect.k.copy_from_slice(&before_k);
        expect.v.copy_from_slice(&before_v);
        let ec = expect.cache();
        unsafe { reference::compact_into(&ec, row, &keep, k, dest, expect.elems, expect.elems) };
        prop_assert!(t.k == expect.k, "K differs from the reference");
        prop_assert!(t.v == expect.v, "V differs from the reference");

        // Independently of the reference: only dest's blocks changed.
        let esz = s.dtype.size();
        let written: std::collections::HashSet<usize> = dest.iter().map(|&b| b as usize).collect();
        let (kb, ka): (&[u8], &[u8]) = (bytemuck_u8(&before_k), bytemuck_u8(&t.k));
        // The packed layouts keep V inside the K tensor.
        let (vb, va): (&[u8], &[u8]) = if t.v.is_empty() { (kb, ka) } else { (bytemuck_u8(&before_v), bytemuck_u8(&t.v)) };
        for b in 0..num_blocks {
            if written.contains(&b) { continue; }
            for h in 0..s.heads { for slot in 0..s.block_size { for d in 0..s.head_dim {
                let (ko, vo) = (cache.k_offset(b, h, slot, d) * esz, cache.v_offset(b, h, slot, d) * esz);
                prop_assert_eq!(&kb[ko..ko + esz], &ka[ko..ko + esz], "K of block {} changed", b);
                prop_assert_eq!(&vb[vo..vo + esz], &va[vo..vo + esz], "V of block {} changed", b);
            }}}
        }
    }

    /// Token selection equals a full sort on (score desc, position asc), with ties forced.
    #[test]
    fn token_selection_matches_full_sort(s in shape(3000), sink in 0..40usize, tail in 0..80usize, frac in 0.0f64..=1.0, levels in 1..50u32, streaming in any::<bool>()) {
        let mut rng = Rng(s.seed);
        let c = s.cached_len;
        let p = s.protected_blocks * s.block_size;
        let scores: Vec<f32> = (0..s.heads * c).map(|_| (rng.below(levels as usize) as f32) * 0.25 - 3.0).collect();
        let mut sel = TokenSelect { cached_len: c, protected_len: p, sink_tokens: sink, protected_tail: tail, selected: 0 };
        let (sink_end, tail_start) = sel.regions();
        let always = (sink_end - p) + (c - tail_start);
        sel.selected = always + (((tail_start - sink_end) as f64) * frac) as usize;
        let mut out = vec![0u32; s.heads * sel.selected];
        let sc = if streaming { None } else { Some(&scores[..]) };
        select_tokens(sc, s.heads, &sel, &mut out).unwrap();
        for h in 0..s.heads {
            let row = sc.map(|x| &x[h * c + p..(h + 1) * c]);
            let want = reference::keep_positions(row, p, sink_end, tail_start, c, sel.selected);
            prop_assert_eq!(&out[h * sel.selected..(h + 1) * sel.selected], &want[..]);
        }
    }

    /// Block selection (CSR batch) equals the full-sort reference per sequence.
    #[test]
    fn block_selection_matches_full_sort(lens in prop::collection::vec(0..60usize, 1..6), keep in 2..20usize, sink in 0..3usize, seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let p = BlockSelect { keep_blocks: keep.max(sink + 1), sink_blocks: sink, recent_blocks: 1 };
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        for &n in &lens { indices.extend((0..n).map(|_| rng.below(1 << 20) as i32)); indptr.push(indices.len() as i32); }
        let last: Vec<i32> = lens.iter().map(|_| 1 + rng.below(16) as i32).collect();
        let scores: Vec<f32> = (0..indices.len()).map(|_| rng.below(7) as f32).collect();
        let (mut oi, mut ox, mut ol) = (vec![0; lens.len() + 1], vec![0; indices.len()], vec![0; lens.len()]);
        let n = select_blocks_csr(&indptr, &indices, &last, &scores, &p, &mut oi, &mut ox, &mut ol).unwrap();
        prop_assert_eq!(&ol, &last);
        for (i, &len) in lens.iter().enumerate() {
            let (a, b) = (indptr[i] as usize, indptr[i + 1] as usize);
            let want: Vec<i32> = if len <= p.keep_blocks { indices[a..b].to_vec() } else {
                reference::keep_positions(Some(&scores[a..b]), 0, p.sink_blocks, len - 1, len, p.keep_blocks)
                    .into_iter().map(|j| indices[a + j as usize]).collect()
            };
            prop_assert_eq!(&ox[oi[i] as usize..oi[i + 1] as usize], &want[..]);
        }
        prop_assert_eq!(oi[lens.len()] as usize, n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// SnapKV scores match the f64 reference to 1e-4 relative, for every GQA ratio and pooling.
    #[test]
    fn snapkv_matches_reference(s in shape(400), gqa in 1..=8usize, window in 1..40usize, pk in 0..4usize, avg in any::<bool>(), qdt in 0..3u32) {
        let mut rng = Rng(s.seed);
        let (t, row) = s.make(&mut rng, false);
        let cache = t.cache();
        let hq = s.heads * gqa;
        let w = window.min(s.cached_len);
        let qdtype = DType::from_u32(qdt, "q").unwrap();
        // Queries pass through their dtype, as the ABI would convert them.
        let q: Vec<f32> = (0..w * hq * s.head_dim).map(|_| match qdtype {
            DType::F32 => rng.unit() * 2.0,
            DType::F16 => half::f16::from_f32(rng.unit() * 2.0).to_f32(),
            DType::Bf16 => half::bf16::from_f32(rng.unit() * 2.0).to_f32(),
        }).collect();
        let pool = if avg { Pooling::Avg } else { Pooling::Max };
        let p = SnapKv { cached_len: s.cached_len, window: w, num_q_heads: hq, pool_kernel: 2 * pk + 1, pool };
        let mut out = vec![0f32; s.heads * s.cached_len];
        unsafe { score_snapkv(&cache, &row, &q, &p, &mut out) }.unwrap();
        let want = reference::snapkv(&cache, &row, s.cached_len, &q, hq, w, p.pool_kernel, pool);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            prop_assert!(close(*a, *b, 1e-4), "score {}: {} vs reference {}", i, a, b);
        }
    }

    /// Key-norm scores and Quest bounds (one key range per block, or several) match their
    /// references.
    #[test]
    fn knorm_and_quest_match_reference(s in shape(600), gqa in 1..=8usize, ranges in prop::sample::select(vec![1usize, 2, 4])) {
        let mut rng = Rng(s.seed);
        let (t, row) = s.make(&mut rng, false);
        let cache = t.cache();
        let mut out = vec![0f32; s.heads * s.cached_len];
        unsafe { score_knorm(&cache, &row, s.cached_len, &mut out) }.unwrap();
        for (a, b) in out.iter().zip(reference::knorm(&cache, &row, s.cached_len)) {
            prop_assert!(close(*a, b, 1e-5), "{} vs {}", a, b);
        }

        let ranges = if s.block_size % ranges == 0 { ranges } else { 1 };
        let meta = cache.num_blocks * ranges * s.heads * s.head_dim;
        let (mut lo, mut hi) = (vec![0f32; meta], vec![0f32; meta]);
        let fills: Vec<(i32, usize)> = row.iter().enumerate().map(|(j, &b)| {
            (b, (s.cached_len - j * s.block_size).min(s.block_size))
        }).collect();
        for &(b, f) in &fills {
            unsafe { quest_update_block(&cache, b as usize, f, &mut lo, &mut hi) }.unwrap();
        }
        let hq = s.heads * gqa;
        let q: Vec<f32> = (0..hq * s.head_dim).map(|_| rng.unit()).collect();
        let mut bound = vec![0f32; row.len()];
        quest_bound(&cache, &row, &q, hq, &lo, &hi, &mut bound).unwrap();
        let want = reference::quest_bound(&cache, &fills, &q, hq, ranges);
        for (a, b) in bound.iter().zip(&want) {
            prop_assert!(close(*a, *b, 1e-4), "{} vs {}", a, b);
        }
    }
}

/// Quest's bound really bounds: no key of a block scores above it, with one key range per block
/// or four; four are never looser than one.
#[test]
fn quest_bound_is_an_upper_bound_on_every_key() {
    let mut rng = Rng(7);
    let s = Shape {
        layout: Layout::Hnd,
        dtype: DType::F32,
        block_size: 16,
        heads: 2,
        head_dim: 32,
        cached_len: 100,
        protected_blocks: 0,
        guards: 1,
        seed: 7,
    };
    let (t, row) = s.make(&mut rng, false);
    let cache = t.cache();
    let q: Vec<f32> = (0..2 * 32).map(|_| rng.unit()).collect();
    let mut bounds = Vec::new();
    for ranges in [1usize, 4] {
        let meta = cache.num_blocks * ranges * 2 * 32;
        let (mut lo, mut hi) = (vec![0f32; meta], vec![0f32; meta]);
        for (j, &b) in row.iter().enumerate() {
            // The last block holds 4 of 16 slots: one range filled, three copies of it.
            unsafe {
                quest_update_block(&cache, b as usize, (100 - j * 16).min(16), &mut lo, &mut hi)
            }
            .unwrap();
        }
        let mut bound = vec![0f32; row.len()];
        quest_bound(&cache, &row, &q, 2, &lo, &hi, &mut bound).unwrap();
        for t_ in 0..100 {
            for h in 0..2 {
                let dot: f64 = (0..32).map(|d| unsafe { reference::k_at(&cache, row[t_ / 16] as usize, h, t_ % 16, d) } * q[h * 32 + d] as f64).sum();
                assert!(
                    dot as f32 <= bound[t_ / 16] + 1e-5,
                    "{ranges} ranges, token {t_}: {dot} > {}",
                    bound[t_ / 16]
                );
            }
        }
        bounds.push(bound);
    }
    assert!(bounds[1]
        .iter()
        .zip(&bounds[0])
        .all(|(four, one)| four <= one));
    assert!(bounds[1]
        .iter()
        .zip(&bounds[0])
        .any(|(four, one)| four < one));
}

/// Metadata sizes name the key ranges they may hold: a multiple of the per-block size that does
/// not divide the block size, or min and max of different sizes, are refused.
#[test]
fn quest_metadata_of_other_sizes_is_refused() {
    let t = TestCache::new(Layout::Nhd, DType::F32, 4, 16, 1, 8);
    let cache = t.cache();
    for (lo_len, hi_len) in [
        (4 * 8 * 3, 4 * 8 * 3),
        (4 * 8 * 2, 4 * 8),
        (4 * 8 * 32, 4 * 8 * 32),
        (5, 5),
    ] {
        let (mut lo, mut hi) = (vec![0f32; lo_len], vec![0f32; hi_len]);
        let e = unsafe { quest_update_block(&cache, 0, 16, &mut lo, &mut hi) }.unwrap_err();
        assert!(
            e.message.contains("divisor of block_size = 16"),
            "{}",
            e.message
        );
    }
    let (mut lo, mut hi) = (vec![0f32; 4 * 8 * 16], vec![0f32; 4 * 8 * 16]);
    unsafe { quest_update_block(&cache, 0, 16, &mut lo, &mut hi) }.unwrap(); // one range per slot
}

/// Scoring then selecting then compacting keeps the highest-scoring tokens' exact bytes.
#[test]
fn snapkv_pipeline_keeps_the_heavy_hitter() {
    let mut rng = Rng(11);
    let s = Shape {
        layout: Layout::Nhd,
        dtype: DType::F32,
        block_size: 16,
        heads: 1,
        head_dim: 16,
        cached_len: 200,
        protected_blocks: 0,
        guards: 2,
        seed: 11,
    };
    let (mut t, row) = s.make(&mut rng, false);
    // Plant a key aligned with every query at token 50: it must survive compaction.
    let q: Vec<f32> = vec![1.0; 8 * 16];
    {
        let c = t.cache();
        let off = c.k_offset(row[50 / 16] as usize, 0, 50 % 16, 0);
        t.k[off..off + 16]
            .iter_mut()
            .for_each(|w| *w = 4.0f32.to_bits());
    }
    let cache = t.cache();
    let original: Vec<u32> = t.k.clone();
    let p = SnapKv {
        cached_len: 200,
        window: 8,
        num_q_heads: 1,
        pool_kernel: 1,
        pool: Pooling::Max,
    };
    let mut scores = vec![0f32; 200];
    unsafe { score_snapkv(&cache, &row, &q, &p, &mut scores) }.unwrap();
    let sel = TokenSelect {
        cached_len: 200,
        protected_len: 0,
        sink_tokens: 0,
        protected_tail: 8,
        selected: 24,
    };
    let mut keep = vec![0u32; 24];
    select_tokens(Some(&scores), 1, &sel, &mut keep).unwrap();
    assert!(keep.contains(&50), "{keep:?}");
    let req = Compaction {
        row: &row,
        cached_len: 200,
        protected_len: 0,
        keep: &keep,
        selected: 24,
        dest: None,
    };
    let released = unsafe { compact(&cache, &req) }.unwrap();
    assert_eq!(released, 2..13);
    let j = keep.iter().position(|&x| x == 50).unwrap();
    let dst = cache.k_offset(row[j / 16] as usize, 0, j % 16, 0);
    let src = cache.k_offset(row[50 / 16] as usize, 0, 50 % 16, 0);
    assert_eq!(&t.k[dst..dst + 16], &original[src..src + 16]);
    let _ = keep_positions; // the primitive is covered by the selection properties
}

fn bytemuck_u8(v: &[u32]) -> &[u8] {
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
}

/// A compaction large enough to be split over threads (by KV head) still equals the reference.
#[test]
fn threaded_compaction_matches_reference() {
    let mut rng = Rng(99);
    for layout in [Layout::Nhd, Layout::Hnd] {
        let s = Shape {
            layout,
            dtype: DType::F32,
            block_size: 16,
            heads: 8,
            head_dim: 128,
            cached_len: 2000,
            protected_blocks: 2,
            guards: 3,
            seed: 99,
        };
        let (t, row) = s.make(&mut rng, true);
        let cache = t.cache();
        let p = 32;
        let k = 1000;
        let keep = random_keep(&mut rng, 8, p, 2000, k);
        let mut expect = TestCache::new(layout, DType::F32, cache.num_blocks, 16, 8, 128);
        expect.k.copy_from_slice(&t.k);
        expect.v.copy_from_slice(&t.v);
        let req = Compaction {
            row: &row,
            cached_len: 2000,
            protected_len: p,
            keep: &keep,
            selected: k,
            dest: None,
        };
        assert!(
            2 * 8 * k * 128 * 4 > (1 << 20),
            "large enough for the threaded path"
        );
        unsafe { compact(&cache, &req) }.unwrap();
        unsafe {
            reference::compact(
                &expect.cache(),
                &row,
                p,
                &keep,
                k,
                expect.elems,
                expect.elems,
            )
        };
        assert!(t.k == expect.k && t.v == expect.v, "{layout:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The batched selection keeps what the naive reference keeps: per row the sinks, the last
    /// block and the best bounds (up to float ties), ascending, padded; whole rows under budget.
    #[test]
    fn quest_select_matches_reference(
        seed in any::<u64>(),
        heads in 1..=3usize,
        gqa in 1..=4usize,
        head_dim in prop::sample::select(vec![8usize, 12, 64, 72]),
        nrows in 1..=8usize,
        sink_blocks in 0..=2usize,
        spread in prop::sample::select(vec![0.0f32, 0.3, 0.5, 1.0]),
        ranges in prop::sample::select(vec![1usize, 4]),
    ) {
        let mut rng = Rng(seed);
        let (num_blocks, stride, out_stride) = (300usize, 48usize, 50usize);
        let t = TestCache::new(Layout::Nhd, DType::F32, num_blocks, 16, heads, head_dim);
        let cache = t.cache();
        let (lo, hi) = random_meta(&mut rng, num_blocks * ranges * heads * head_dim);
        let mut table = vec![-7i32; nrows * stride];
        let (mut blocks, mut keep) = (vec![0i32; nrows], vec![0i32; nrows]);
        for r in 0..nrows {
            let nb = 1 + rng.below(stride);
            table[r * stride..r * stride + nb].copy_from_slice(&random_row(&mut rng, num_blocks, nb));
            blocks[r] = nb as i32;
            keep[r] = (sink_blocks + 1 + rng.below(stride)) as i32;
        }
        let hq = heads * gqa;
        let query: Vec<f32> = (0..nrows * hq * head_dim).map(|_| rng.unit()).collect();
        let rows = QuestRows { table: &table, stride, blocks: &blocks, keep: &keep, sink_blocks, spread };
        let mut ws = vec![0f32; nrows * stride];
        let mut out = vec![0i32; nrows * out_stride];
        quest_select(&cache, &rows, &query, hq, &lo, &hi, &mut ws, &mut out, out_stride, -1).unwrap();
        for r in 0..nrows {
            let row = &table[r * stride..r * stride + blocks[r] as usize];
            let q = &query[r * hq * head_dim..(r + 1) * hq * head_dim];
            let (bounds, want) = reference::quest_select_row(row, keep[r] as usize, sink_blocks, q, hq,
                                                             heads, head_dim, &lo, &hi, spread, ranges);
            let kept = rows.kept(r);
            prop_assert_eq!(kept, want.len());
            let got: Vec<usize> = out[r * out_stride..r * out_stride + kept].iter()
                .map(|id| row.iter().position(|b| b == id).expect("a kept id is in its row")).collect();
            prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "row {} not ascending: {:?}", r, got);
            prop_assert!(out[r * out_stride + kept..(r + 1) * out_stride].iter().all(|&x| x == -1));
            for (j, &b) in bounds.iter().enumerate() {
                let s = ws[r * stride + j] as f64;
                prop_assert!((s - b).abs() <= 1e-4 * (1.0 + b.abs()), "bound {} vs {}", s, b);
            }
            // The same set, or one that differs only between blocks whose bounds tie in f32.
            let dropped_best = (0..row.len()).filter(|j| !got.contains(j)).map(|j| bounds[j])
                .fold(f64::NEG_INFINITY, f64::max);
            let sinks = sink_blocks.min(kept - 1);
            for &j in got.iter().filter(|&&j| j >= sinks && j + 1 < row.len()) {
                prop_assert!(bounds[j] >= dropped_best - 1e-4 * (1.0 + dropped_best.abs()),
                             "row {}: kept block {} ({}) below a dropped one ({})", r, j, bounds[j], dropped_best);
            }
            prop_assert!(got.iter().take(sinks).copied().eq(0..sinks));
            prop_assert_eq!(*got.last().unwrap(), row.len() - 1);
        }
    }
}

/// Bad calls name what is wrong: a short workspace, an id outside the cache, a budget that
/// cannot hold the sinks and the last block, a query of the wrong size.
#[test]
fn quest_select_refuses_bad_arguments() {
    let t = TestCache::new(Layout::Nhd, DType::F32, 8, 16, 1, 8);
    let cache = t.cache();
    let (lo, hi) = (vec![0f32; 64], vec![1f32; 64]);
    let table = [0i32, 1, 2, 3];
    let (blocks, keep) = ([4i32], [2i32]);
    let rows = QuestRows {
        table: &table,
        stride: 4,
        blocks: &blocks,
        keep: &keep,
        sink_blocks: 1,
        spread: 1.0,
    };
    let q = [0.5f32; 8];
    let mut out = [0i32; 4];
    let err = |rows: &QuestRows, q: &[f32], ws: usize| {
        let mut w = vec![0f32; ws];
        let mut o = out;
        quest_select(&cache, rows, q, 1, &lo, &hi, &mut w, &mut o, 4, 0)
            .unwrap_err()
            .message
    };
    assert!(err(&rows, &q, 3).contains("workspace holds 3 scores"));
    assert!(err(&rows, &q[..7], 4).contains("query has 7 entries"));
    let bad = [0i32, 1, 9, 3];
    let e = err(
        &QuestRows {
            table: &bad,
            ..rows
        },
        &q,
        4,
    );
    assert!(e.contains("table row 0, block 2: id 9"), "{e}");
    let e = err(&QuestRows { keep: &[1], ..rows }, &q, 4);
    assert!(e.contains("keep[0] = 1 must exceed sink_blocks = 1"), "{e}");
    for spread in [-0.1f32, 1.5, f32::NAN] {
        let e = err(&QuestRows { spread, ..rows }, &q, 4);
        assert!(e.contains("must be in 0..=1"), "{e}");
    }
    let mut w = [0f32; 4];
    quest_select(&cache, &rows, &q, 1, &lo, &hi, &mut w, &mut out, 4, -1).unwrap();
    assert_eq!(out[2..], [-1, -1]);
}

/// Attention over the kept blocks reads whole blocks and the partial last one.
#[test]
fn reduced_len_counts_whole_kept_blocks_and_the_last_fill() {
    assert_eq!(reduced_len(100, 16, 8), 100); // 7 blocks, all kept
    assert_eq!(reduced_len(100, 16, 3), 2 * 16 + 4);
    assert_eq!(reduced_len(96, 16, 3), 3 * 16);
    assert_eq!(reduced_len(97, 16, 1), 1);
    assert_eq!(reduced_len(97, 16, 0), 1); // the last block always stays
    assert_eq!(reduced_len(97, 0, 3), 97);
}

/// A step's filled blocks updated in one call equal one call per block; a bad entry anywhere
/// leaves every block's metadata as it was.
#[test]
fn quest_update_of_several_blocks_equals_one_by_one_and_is_all_or_nothing() {
    let mut rng = Rng(5);
    let mut t = TestCache::new(Layout::VllmCpuVec, DType::F32, 12, 16, 2, 8);
    t.fill_values(&mut rng);
    let cache = t.cache();
    let meta = 12 * 2 * 8;
    let (blocks, filled) = ([3i32, 7, 0], [16i32, 5, 1]);
    let (mut lo, mut hi) = (vec![0f32; meta], vec![0f32; meta]);
    unsafe { quest_update_blocks(&cache, &blocks, &filled, &mut lo, &mut hi) }.unwrap();
    let (mut lo1, mut hi1) = (vec![0f32; meta], vec![0f32; meta]);
    for (&b, &f) in blocks.iter().zip(&filled) {
        unsafe { quest_update_block(&cache, b as usize, f as usize, &mut lo1, &mut hi1) }.unwrap();
    }
    assert_eq!((&lo, &hi), (&lo1, &hi1));
    let before = (lo.clone(), hi.clone());
    let e = unsafe { quest_update_blocks(&cache, &[1, 2, 12], &[16, 16, 16], &mut lo, &mut hi) }
        .unwrap_err();
    assert!(
        e.message
            .contains("entry 2: block = 12 is not below num_blocks = 12"),
        "{}",
        e.message
    );
    let e =
        unsafe { quest_update_blocks(&cache, &[1, 2], &[16, 0], &mut lo, &mut hi) }.unwrap_err();
    assert!(e.message.contains("entry 1: filled = 0"), "{}", e.message);
    assert_eq!((lo, hi), before);
}
