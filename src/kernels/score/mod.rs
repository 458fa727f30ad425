//! Scores of cached tokens (per KV head) and of blocks, all accumulated in f32.

pub mod knorm;
pub mod quest;
pub mod snapkv;

use super::dtype::{DType, Element};
use super::layout::KvCache;
use crate::with_dtype;

/// Read `n` elements of `dtype` at `ptr` as f32 (queries are small: convert them once).
///
/// # Safety
/// `ptr` must point to `n` readable, aligned elements of `dtype`.
pub unsafe fn to_f32_vec(ptr: *const u8, dtype: DType, n: usize) -> Vec<f32> {
    with_dtype!(dtype, T => {
        // SAFETY: the caller vouches for `n` aligned elements of `T`.
        let s = unsafe { std::slice::from_raw_parts(ptr as *const T, n) };
        s.iter().map(|x| x.to_f32()).collect()
    })
}

/// Copy K[block][head][slot][..] as f32 into `out` (`head_dim` long).
///
/// # Safety
/// Coordinates in range of a validated host cache holding `T` elements.
#[inline]
pub(crate) unsafe fn gather_k_row<T: Element>(
    c: &KvCache,
    block: usize,
    head: usize,
    slot: usize,
    out: &mut [f32],
) {
    let base = c.k as *const T;
    if c.rows_contiguous() {
        // SAFETY: validated coordinates, head_dim contiguous elements.
        let row = unsafe {
            std::slice::from_raw_parts(base.add(c.k_offset(block, head, slot, 0)), c.head_dim)
        };
        for (o, x) in out.iter_mut().zip(row) {
            *o = x.to_f32();
        }
    } else {
        for (d, o) in out.iter_mut().enumerate() {
            // SAFETY: validated coordinates.
            *o = unsafe { *base.add(c.k_offset(block, head, slot, d)) }.to_f32();
        }
    }
}

/// Dot product with 8 independent accumulators, so the compiler vectorises it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    lanes_then_tail(&acc, ra, rb)
}

/// How `dot` finishes, for every dot product that must round as it does: the eight lanes summed
/// in order, then the products of the tails `a`, `b` (past the last full eight) one by one.
#[inline(always)]
pub(crate) fn lanes_then_tail(lanes: &[f32; 8], a: &[f32], b: &[f32]) -> f32 {
    let mut s: f32 = lanes.iter().sum();
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// A seeded xorshift stream of f32 in [-1, 1), for the unit tests' reproducible data.
#[cfg(test)]
pub(crate) fn test_units(seed: u64) -> impl FnMut() -> f32 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
