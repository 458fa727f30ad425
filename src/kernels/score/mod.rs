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
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}
