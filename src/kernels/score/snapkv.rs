//! SnapKV scores: how much attention the observation window (the last `window` prompt queries)
//! pays each cached token, summed over the window and over the query heads of each KV head's
//! GQA group, then pooled along the token axis so neighbours of a heavy hitter survive with it.
//!
//! Window query `i` sits at cached position `C - window + i` and attends causally to
//! `t <= C - window + i`. Pooling (`pool_kernel`, centred, stride 1) covers only the tokens
//! before the window, as in SnapKV and kvpress: the window itself is always kept. Max pooling
//! ignores the padding; avg pooling counts it as zeros (PyTorch's `avg_pool1d` default).

use super::{dot, gather_k_row, lanes_then_tail};
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

/// One KV head's scores. The keys are gathered once as f32; the arithmetic is
/// `score_head_body`, instantiated with portable or AVX2 `Ops` that do the same adds and
/// multiplies in the same order, so a CPU's features never change the scores or what is kept.
unsafe fn score_head(
    cache: &KvCache,
    row: &[i32],
    queries: &[f32],
    p: &SnapKv,
    h: usize,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let (c, d, bs) = (p.cached_len, cache.head_dim, cache.block_size);
    with_dtype!(cache.dtype, T => {
        for t in 0..c {
            // SAFETY: row checked for ceil(c / bs) blocks.
            unsafe { gather_k_row::<T>(cache, row[t / bs] as usize, h, t % bs, &mut s.keys[t * d..(t + 1) * d]) };
        }
    });
    let group = p.num_q_heads / cache.num_kv_heads;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { score_head_avx2(queries, p, d, h * group..(h + 1) * group, s, out) };
    }
    score_head_body::<Portable>(queries, p, d, h * group..(h + 1) * group, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn score_head_avx2(
    queries: &[f32],
    p: &SnapKv,
    d: usize,
    heads: std::ops::Range<usize>,
    s: &mut Scratch,
    out: &mut [f32],
) {
    score_head_body::<avx2::Avx2>(queries, p, d, heads, s, out)
}

/// The three inner steps of `score_head_body`, per element the same arithmetic in every
/// implementation (a rounded multiply, then a rounded add; no fused multiply-add).
trait Ops {
    /// `dot(q, k_j)` for the four keys of `k4` (`[4][d]`), each summed exactly as `dot` sums it.
    fn dot4(q: &[f32], k4: &[f32], d: usize) -> [f32; 4];
    /// `x[i] = exp_nonpositive(x[i] - m)` for every element; returns `sum8(x)`.
    fn exp_sum(x: &mut [f32], m: f32) -> f32;
    /// `acc[i] += e[i] * inv` (equal lengths).
    fn scale_add(acc: &mut [f32], e: &[f32], inv: f32);
}

struct Portable;

impl Ops for Portable {
    #[inline(always)]
    fn dot4(q: &[f32], k4: &[f32], d: usize) -> [f32; 4] {
        dot4(q, k4, d)
    }

    #[inline(always)]
    fn exp_sum(x: &mut [f32], m: f32) -> f32 {
        for v in x.iter_mut() {
            *v = exp_nonpositive(*v - m);
        }
        sum8(x)
    }

    #[inline(always)]
    fn scale_add(acc: &mut [f32], e: &[f32], inv: f32) {
        assert_eq!(acc.len(), e.len());
        for (a, x) in acc.iter_mut().zip(e) {
            *a += x * inv;
        }
    }
}

/// The window's attention over `s.keys` (`[cached_len][d]` f32), summed over the window and the
/// query heads `heads`, then pooled. Logits four keys at a time (one query read per four dot
/// products); exponentials by `exp_nonpositive`; row sums in eight lanes.
#[inline(always)]
fn score_head_body<O: Ops>(
    queries: &[f32],
    p: &SnapKv,
    d: usize,
    heads: std::ops::Range<usize>,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let (c, w) = (p.cached_len, p.window);
    let scale = 1.0 / (d as f32).sqrt();
    s.acc.fill(0.0);
    for qh in heads {
        for i in 0..w {
            let q = &queries[(i * p.num_q_heads + qh) * d..][..d];
            let lim = c - w + i + 1;
            let logits = &mut s.logits[..lim];
            let mut m = f32::NEG_INFINITY;
            let mut keys = s.keys[..lim * d].chunks_exact(4 * d);
            let mut at = logits.chunks_exact_mut(4);
            for (k4, l4) in (&mut keys).zip(&mut at) {
                for (l, x) in l4.iter_mut().zip(O::dot4(q, k4, d)) {
                    *l = x * scale;
                    m = m.max(*l);
                }
            }
            for (k, l) in keys.remainder().chunks_exact(d).zip(at.into_remainder()) {
                *l = dot(q, k) * scale;
                m = m.max(*l);
            }
            let inv = 1.0 / O::exp_sum(logits, m);
            O::scale_add(&mut s.acc[..lim], logits, inv);
        }
    }
    let n = c - w;
    pool(&s.acc[..n], p.pool_kernel / 2, p.pool, &mut out[..n]);
    out[n..].copy_from_slice(&s.acc[n..c]);
}

/// `dot(q, k_j)` for the four keys of `k4` (`[4][d]`), each summed exactly as `dot` sums it.
#[inline(always)]
fn dot4(q: &[f32], k4: &[f32], d: usize) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let full = d - d % 8;
    for o in (0..full).step_by(8) {
        let x = &q[o..o + 8];
        for (j, a) in acc.iter_mut().enumerate() {
            let y = &k4[j * d + o..j * d + o + 8];
            for l in 0..8 {
                a[l] += x[l] * y[l];
            }
        }
    }
    std::array::from_fn(|j| lanes_then_tail(&acc[j], &q[full..], &k4[j * d + full..(j + 1) * d]))
}

/// Sum in eight lanes, then the lanes and the remainder in order.
#[inline(always)]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `e^x` for `x <= 0` (softmax after subtracting the row's maximum), within 2 ulp of e^x down
/// to `x = -87`; below it (and for NaN) e^-87, a term under 1e-37 of the row's largest, where
/// libm gave a denormal or zero. Cody-Waite reduction `x = n ln 2 + r` (`n` rounded by the
/// 1.5 * 2^23 trick), Cephes' degree-5 polynomial for `e^r`, `2^n` from its exponent bits.
/// Only adds, multiplies and bit moves, so it vectorises (the libm call did not) and rounds
/// the same in every build.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let x = if x > EXP_FLOOR { x } else { EXP_FLOOR };
    let n = (x * std::f32::consts::LOG2_E + EXP_ROUND) - EXP_ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut y = EXP_POLY[0];
    for k in &EXP_POLY[1..] {
        y = y * r + k;
    }
    y = y * (r * r) + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

// `exp_nonpositive`'s constants, shared with its AVX2 twin (`avx2::exp8`), which must round alike.
/// The clamp that keeps 2^n a normal number.
const EXP_FLOOR: f32 = -87.0;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
const EXP_ROUND: f32 = 12_582_912.0;
/// ln 2 split so that `n * LN2_HI` is exact (Cody-Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for e^r on |r| <= ln 2 / 2, highest power first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// The AVX2 `Ops`: every lane computes what `Portable` computes for that element, in the same
/// order.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Used only by `score_head_avx2`, which runs after AVX2 was detected; its methods inline
    /// there and so run with the feature.
    pub(super) struct Avx2;

    impl super::Ops for Avx2 {
        #[inline(always)]
        fn dot4(q: &[f32], k4: &[f32], d: usize) -> [f32; 4] {
            assert!(q.len() == d && k4.len() == 4 * d);
            // SAFETY: AVX2 (see `Avx2`); lengths asserted.
            unsafe { dot4(q, k4, d) }
        }

        #[inline(always)]
        fn exp_sum(x: &mut [f32], m: f32) -> f32 {
            // SAFETY: AVX2 (see `Avx2`).
            unsafe { exp_sum(x, m) }
        }

        #[inline(always)]
        fn scale_add(acc: &mut [f32], e: &[f32], inv: f32) {
            assert_eq!(acc.len(), e.len());
            // SAFETY: AVX2 (see `Avx2`); lengths asserted.
            unsafe { scale_add(acc, e, inv) }
        }
    }

    /// # Safety
    /// AVX2; `q` holds `d` floats, `k4` `4 * d`.
    #[target_feature(enable = "avx2")]
    unsafe fn dot4(q: &[f32], k4: &[f32], d: usize) -> [f32; 4] {
        let full = d - d % 8;
        let mut acc = [_mm256_setzero_ps(); 4];
        let (qp, kp) = (q.as_ptr(), k4.as_ptr());
        let mut o = 0;
        while o < full {
            // SAFETY: o + 8 <= full <= d, within q and each key of k4.
            unsafe {
                let x = _mm256_loadu_ps(qp.add(o));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(x, _mm256_loadu_ps(kp.add(j * d + o))));
                }
            }
            o += 8;
        }
        std::array::from_fn(|j| {
            let mut lanes = [0f32; 8];
            // SAFETY: 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j]) };
            super::lanes_then_tail(&lanes, &q[full..], &k4[j * d + full..(j + 1) * d])
        })
    }

    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn exp_sum(x: &mut [f32], m: f32) -> f32 {
        let full = x.len() - x.len() % 8;
        let (mv, p) = (_mm256_set1_ps(m), x.as_mut_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= len.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
                _mm256_storeu_ps(p.add(i), e);
                acc = _mm256_add_ps(acc, e);
            }
            i += 8;
        }
        for v in &mut x[full..] {
            *v = super::exp_nonpositive(*v - m);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + x[full..].iter().sum::<f32>()
    }

    /// `exp_nonpositive` of each lane.
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        use super::{EXP_FLOOR, EXP_POLY, EXP_ROUND, LN2_HI, LN2_LO};
        let splat = _mm256_set1_ps;
        // max_ps(x, floor) is x when x > floor, else floor (NaN too), as the scalar `if`.
        let x = _mm256_max_ps(x, splat(EXP_FLOOR));
        let round = splat(EXP_ROUND);
        let n = _mm256_sub_ps(
            _mm256_add_ps(_mm256_mul_ps(x, splat(std::f32::consts::LOG2_E)), round),
            round,
        );
        let r = _mm256_sub_ps(
            _mm256_sub_ps(x, _mm256_mul_ps(n, splat(LN2_HI))),
            _mm256_mul_ps(n, splat(LN2_LO)),
        );
        let mut y = splat(EXP_POLY[0]);
        for k in &EXP_POLY[1..] {
            y = _mm256_add_ps(_mm256_mul_ps(y, r), splat(*k));
        }
        y = _mm256_add_ps(
            _mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(r, r)), r),
            splat(1.0),
        );
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvttps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(two_n))
    }

    /// # Safety
    /// AVX2; `acc` and `e` of equal lengths.
    #[target_feature(enable = "avx2")]
    unsafe fn scale_add(acc: &mut [f32], e: &[f32], inv: f32) {
        let full = acc.len() - acc.len() % 8;
        let (iv, a, x) = (_mm256_set1_ps(inv), acc.as_mut_ptr(), e.as_ptr());
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= len of both.
            unsafe {
                _mm256_storeu_ps(
                    a.add(i),
                    _mm256_add_ps(
                        _mm256_loadu_ps(a.add(i)),
                        _mm256_mul_ps(_mm256_loadu_ps(x.add(i)), iv),
                    ),
                );
            }
            i += 8;
        }
        for (a, e) in acc[full..].iter_mut().zip(&e[full..]) {
            *a += e * inv;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2 ulp of e^x (f64) over [-87, 0], and e^-87 below it.
    #[test]
    fn exp_nonpositive_is_within_two_ulp() {
        let mut x = 0f32;
        while x >= -87.0 {
            let (got, want) = (exp_nonpositive(x), (x as f64).exp());
            let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
            assert!(ulp <= 2, "e^{x}: {got} vs {want} ({ulp} ulp)");
            x -= 0.000_731;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1e9), exp_nonpositive(-87.0));
        assert!(exp_nonpositive(-87.0) > 0.0 && exp_nonpositive(-87.0).is_normal());
    }

    /// The AVX2 build scores bit for bit as the portable one (the same adds and multiplies in the
    /// same order), so a CPU's features never change which tokens are kept; head_dim 70 leaves a
    /// remainder after the eight lanes, the causal rows' lengths every remainder after the
    /// four-key groups, and every 16th key scaled by 60 drives other logits below -87.
    #[test]
    fn avx2_and_portable_scores_are_bit_identical() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let (c, d, w, hq) = (203usize, 70usize, 13usize, 6usize);
            let mut units = super::super::test_units(0x9e37_79b9_7f4a_7c15);
            let mut unit = move || 2.0 * units();
            let q: Vec<f32> = (0..w * hq * d).map(|_| unit()).collect();
            let keys: Vec<f32> = (0..c * d)
                .map(|i| unit() * if (i / d) % 16 == 5 { 60.0 } else { 1.0 })
                .collect();
            for pool in [Pooling::Max, Pooling::Avg] {
                let p = SnapKv {
                    cached_len: c,
                    window: w,
                    num_q_heads: hq,
                    pool_kernel: 5,
                    pool,
                };
                let mut outs = [vec![0f32; c], vec![0f32; c]];
                for (fast, out) in [true, false].into_iter().zip(&mut outs) {
                    let mut s = Scratch::new(c, d);
                    s.keys.copy_from_slice(&keys);
                    if fast {
                        // SAFETY: the CPU has AVX2.
                        unsafe { score_head_avx2(&q, &p, d, 2..4, &mut s, out) };
                    } else {
                        score_head_body::<Portable>(&q, &p, d, 2..4, &mut s, out);
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&outs[0]), bits(&outs[1]), "{pool:?}");
                assert!(outs[0].iter().all(|x| x.is_finite() && *x >= 0.0));
            }
        }
    }

    /// `avx2::exp8` is `exp_nonpositive` lane for lane, clamp, NaN and infinities included.
    #[test]
    fn avx2_exp_is_the_portable_exp() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            use std::arch::x86_64::*;
            let mut xs = vec![
                0.0,
                -0.0,
                -1e-30,
                -1e-7,
                -0.5,
                -86.999,
                -87.0,
                -87.0001,
                -100.0,
                -1e9,
                f32::NEG_INFINITY,
                f32::NAN,
                -f32::MIN_POSITIVE,
            ];
            let mut x = -90.0f32;
            while x <= 0.0 {
                xs.push(x);
                x += 0.013_7;
            }
            while xs.len() % 8 != 0 {
                xs.push(-1.0);
            }
            for lanes in xs.chunks_exact(8) {
                let mut got = [0f32; 8];
                // SAFETY: the CPU has AVX2; 8 floats each way.
                unsafe {
                    _mm256_storeu_ps(
                        got.as_mut_ptr(),
                        avx2::exp8(_mm256_loadu_ps(lanes.as_ptr())),
                    )
                };
                for (g, x) in got.iter().zip(lanes) {
                    assert_eq!(g.to_bits(), exp_nonpositive(*x).to_bits(), "e^{x}");
                }
            }
        }
    }
}
