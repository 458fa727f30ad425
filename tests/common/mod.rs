//! Test fixtures: KV caches with random contents, guard blocks around a sequence's row, and a
//! small deterministic RNG (tests stay reproducible without a dependency).

#![allow(dead_code)]

use kvsieve::kernels::{DType, KvCache, KvCacheDesc, Layout};
use std::ffi::c_void;

/// SplitMix64: tiny, deterministic, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// One layer's cache in owned host memory, described for kvsieve.
pub struct TestCache {
    /// K (and for the packed layouts V too) as 32-bit words, so every dtype is aligned.
    pub k: Vec<u32>,
    pub v: Vec<u32>,
    pub desc: KvCacheDesc,
    /// Elements per tensor.
    pub elems: usize,
}

impl TestCache {
    pub fn new(
        layout: Layout,
        dtype: DType,
        num_blocks: usize,
        block_size: usize,
        heads: usize,
        head_dim: usize,
    ) -> TestCache {
        let per_tensor = num_blocks * block_size * heads * head_dim;
        let packed = matches!(layout, Layout::VllmCpuVec | Layout::VllmCpuAmx);
        let elems = if packed { 2 * per_tensor } else { per_tensor };
        let words = (elems * dtype.size()).div_ceil(4);
        let mut t = TestCache {
            k: vec![0; words],
            v: if packed { Vec::new() } else { vec![0; words] },
            desc: KvCacheDesc {
                k: std::ptr::null_mut(),
                v: std::ptr::null_mut(),
                dtype: dtype as u32,
                layout: layout as u32,
                device: 0,
                num_blocks: num_blocks as u32,
                block_size: block_size as u32,
                num_kv_heads: heads as u32,
                head_dim: head_dim as u32,
                block_stride: 0,
                token_stride: 0,
                head_stride: 0,
            },
            elems,
        };
        t.desc.k = t.k.as_mut_ptr() as *mut c_void;
        t.desc.v = if packed {
            std::ptr::null_mut()
        } else {
            t.v.as_mut_ptr() as *mut c_void
        };
        t
    }

    pub fn dtype(&self) -> DType {
        DType::from_u32(self.desc.dtype, "dtype").unwrap()
    }

    /// Fill K and V with random finite values of the cache's dtype.
    pub fn fill_values(&mut self, rng: &mut Rng) {
        let dt = self.dtype();
        for buf in [&mut self.k, &mut self.v] {
            match dt {
                DType::F32 => buf.iter_mut().for_each(|w| *w = rng.unit().to_bits()),
                DType::F16 => buf.iter_mut().for_each(|w| {
                    let (a, b) = (
                        half::f16::from_f32(rng.unit()),
                        half::f16::from_f32(rng.unit()),
                    );
                    *w = a.to_bits() as u32 | (b.to_bits() as u32) << 16
                }),
                DType::Bf16 => buf.iter_mut().for_each(|w| {
                    let (a, b) = (
                        half::bf16::from_f32(rng.unit()),
                        half::bf16::from_f32(rng.unit()),
                    );
                    *w = a.to_bits() as u32 | (b.to_bits() as u32) << 16
                }),
            }
        }
    }

    /// Fill with random bits (NaNs included): compaction must move bytes, not values.
    pub fn fill_bits(&mut self, rng: &mut Rng) {
        for w in self.k.iter_mut().chain(self.v.iter_mut()) {
            *w = rng.next_u64() as u32;
        }
    }

    pub fn cache(&self) -> KvCache {
        KvCache::new(&self.desc).expect("test cache is valid")
    }
}

/// A row of `n` distinct block ids drawn from `0..num_blocks`; the others stay as guards.
pub fn random_row(rng: &mut Rng, num_blocks: usize, n: usize) -> Vec<i32> {
    let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
    rng.shuffle(&mut ids);
    ids.truncate(n);
    ids
}

/// Keep lists for `heads` KV heads: `k` distinct positions of `[lo, hi)` per head, ascending.
pub fn random_keep(rng: &mut Rng, heads: usize, lo: usize, hi: usize, k: usize) -> Vec<u32> {
    let mut keep = Vec::with_capacity(heads * k);
    for _ in 0..heads {
        let mut pos: Vec<u32> = (lo as u32..hi as u32).collect();
        rng.shuffle(&mut pos);
        pos.truncate(k);
        pos.sort_unstable();
        keep.extend(pos);
    }
    keep
}

/// Random Quest metadata: `n` (min, max) pairs with min <= max, drawn in pairs from `rng`.
pub fn random_meta(rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<f32>) {
    (0..n)
        .map(|_| {
            let (a, b) = (rng.unit(), rng.unit());
            (a.min(b), a.max(b))
        })
        .unzip()
}
