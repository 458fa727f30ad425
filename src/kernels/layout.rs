//! Where a KV element lives: the cache descriptor of the C ABI and its validated form.
//!
//! Element `(block, head, slot, d)` of K (or V) is found through `KvCache::k_offset` /
//! `v_offset`, in elements from the K (or V) base pointer. Layouts (docs/design.md, "Layers"):
//! - `Nhd` `[num_blocks, block_size, kv_heads, head_dim]` (vLLM FlashAttention, FlashInfer NHD),
//! - `Hnd` `[num_blocks, kv_heads, block_size, head_dim]`,
//!   both with explicit element strides for block, token and head (head_dim contiguous), so a
//!   FlashInfer `[num_blocks, 2, ...]` tensor is K at offset 0 and V one K-page further;
//! - `VllmCpuVec`: vLLM CPU_ATTN vector path, per (block, head) a chunk of `2*block_size*head_dim`
//!   with K transposed `[D][BS]` then V `[BS][D]`; K and V share one tensor (`v` is NULL);
//! - `VllmCpuAmx`: vLLM CPU_ATTN AMX path, K as `[BS/16][D/2][16][2]` then V as
//!   `[D/16][BS/2][16][2]` in the same chunk.
//!
//! The vLLM CPU packings are only accepted with the dtypes they were probed with: the vector
//! path with f32 and bf16 (probed against vLLM 0.32's `cpu_attn_reshape_and_cache`,
//! `integrations/vllm/tests/test_layout_probe.py`), AMX with bf16 (docs/design.md, "Layers"; this
//! workplace's CPUs have no AMX to probe it on). Anything else is refused rather than guessed.

use super::dtype::DType;
use crate::ensure_arg;
use crate::error::{Error, Result};
use std::ffi::c_void;

#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Nhd = 0,
    Hnd = 1,
    VllmCpuVec = 2,
    VllmCpuAmx = 3,
}

impl Layout {
    fn from_u32(v: u32) -> Result<Layout> {
        Ok(match v {
            0 => Layout::Nhd,
            1 => Layout::Hnd,
            2 => Layout::VllmCpuVec,
            3 => Layout::VllmCpuAmx,
            _ => {
                return Err(Error::invalid_arg(format!(
                    "cache.layout = {v} is not a kvs_layout; use KVS_LAYOUT_NHD (0), KVS_LAYOUT_HND (1), \
                     KVS_LAYOUT_VLLM_CPU_VEC (2) or KVS_LAYOUT_VLLM_CPU_AMX (3)"
                )))
            }
        })
    }

    fn packed(self) -> bool {
        matches!(self, Layout::VllmCpuVec | Layout::VllmCpuAmx)
    }
}

/// Where the memory behind a pointer lives.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu = 0,
    Cuda = 1,
}

impl Device {
    pub fn from_u32(v: u32, what: &str) -> Result<Device> {
        match v {
            0 => Ok(Device::Cpu),
            1 => Ok(Device::Cuda),
            _ => Err(Error::invalid_arg(format!(
                "{what} = {v} is not a kvs_device; use KVS_DEVICE_CPU (0) or KVS_DEVICE_CUDA (1)"
            ))),
        }
    }
}

/// One layer's paged KV cache as the engine holds it (`kvs_kv_cache` in C).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvCacheDesc {
    /// Base of the K tensor (and of V too for the packed vLLM CPU layouts).
    pub k: *mut c_void,
    /// Base of the V tensor; NULL for the packed vLLM CPU layouts.
    pub v: *mut c_void,
    /// A `kvs_dtype`.
    pub dtype: u32,
    /// A `kvs_layout`.
    pub layout: u32,
    /// A `kvs_device`.
    pub device: u32,
    pub num_blocks: u32,
    pub block_size: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// Elements between consecutive blocks; 0 for the layout's packed default.
    pub block_stride: u64,
    /// Elements between consecutive slots of a block (NHD/HND only); 0 for the default.
    pub token_stride: u64,
    /// Elements between consecutive KV heads; 0 for the default.
    pub head_stride: u64,
}

/// A validated cache: every address computed from it for `block < num_blocks`,
/// `head < num_kv_heads`, `slot < block_size`, `d < head_dim` lies inside the tensor the caller
/// described, and distinct coordinates never alias.
#[derive(Debug, Clone, Copy)]
pub struct KvCache {
    pub k: *mut u8,
    pub v: *mut u8,
    pub dtype: DType,
    pub layout: Layout,
    pub device: Device,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_stride: usize,
    pub token_stride: usize,
    pub head_stride: usize,
}

// SAFETY: the pointers are the engine's tensors; kvsieve only touches them inside calls the
// engine makes, and the engine serialises calls that touch the same sequence.
unsafe impl Send for KvCache {}
unsafe impl Sync for KvCache {}

impl KvCache {
    /// Validate a descriptor. Pointers are checked for NULL and alignment, shapes for zero and
    /// overflow, strides for aliasing; the caller still vouches that the tensor spans
    /// `num_blocks * block_stride` elements.
    pub fn new(desc: &KvCacheDesc) -> Result<KvCache> {
        let dtype = DType::from_u32(desc.dtype, "cache.dtype")?;
        let layout = Layout::from_u32(desc.layout)?;
        let device = Device::from_u32(desc.device, "cache.device")?;
        ensure_arg!(!desc.k.is_null(), "cache.k is NULL");
        for (name, v) in [
            ("cache.num_blocks", desc.num_blocks),
            ("cache.block_size", desc.block_size),
            ("cache.num_kv_heads", desc.num_kv_heads),
            ("cache.head_dim", desc.head_dim),
        ] {
            ensure_arg!(v > 0, "{name} is 0");
        }
        ensure_arg!(
            (desc.num_blocks as u64) <= i32::MAX as u64,
            "cache.num_blocks = {} does not fit the int32 page tables",
            desc.num_blocks
        );
        let (bs, h, d) = (
            desc.block_size as usize,
            desc.num_kv_heads as usize,
            desc.head_dim as usize,
        );
        let align = dtype.size();
        ensure_arg!(
            desc.k as usize % align == 0,
            "cache.k = {:p} is not aligned to its {} elements",
            desc.k,
            dtype.name()
        );
        let (block_stride, token_stride, head_stride, v) = if layout.packed() {
            let probed: &[DType] = match layout {
                Layout::VllmCpuVec => &[DType::F32, DType::Bf16],
                _ => &[DType::Bf16],
            };
            if !probed.contains(&dtype) {
                let names: Vec<&str> = probed.iter().map(|d| d.name()).collect();
                return Err(Error::unsupported(format!(
                    "cache.layout {layout:?} with dtype {} was never probed against vLLM; it is \
                     supported with {} only",
                    dtype.name(),
                    names.join(", ")
                )));
            }
            ensure_arg!(
                desc.v.is_null() || desc.v == desc.k,
                "cache.v must be NULL for {layout:?}: K and V share one tensor"
            );
            ensure_arg!(
                desc.token_stride == 0,
                "cache.token_stride must be 0 for {layout:?} (the packing fixes it)"
            );
            if layout == Layout::VllmCpuAmx {
                ensure_arg!(
                    bs % 16 == 0 && d % 16 == 0,
                    "the AMX packing needs block_size and head_dim multiples of 16 (got {bs}, {d})"
                );
            }
            let chunk = 2 * bs * d;
            let hs = or_default(desc.head_stride, chunk);
            ensure_arg!(
                hs >= chunk,
                "cache.head_stride = {hs} is below 2*block_size*head_dim = {chunk}"
            );
            let bstr = or_default(desc.block_stride, hs * h);
            ensure_arg!(
                bstr >= hs * h,
                "cache.block_stride = {bstr} is below num_kv_heads*head_stride = {}",
                hs * h
            );
            (bstr, 0, hs, desc.k as *mut u8)
        } else {
            ensure_arg!(!desc.v.is_null(), "cache.v is NULL");
            ensure_arg!(
                desc.v != desc.k,
                "cache.v equals cache.k; K and V must be distinct tensors or pages"
            );
            ensure_arg!(
                desc.v as usize % align == 0,
                "cache.v = {:p} is not aligned to its {} elements",
                desc.v,
                dtype.name()
            );
            let (ts0, hs0, bs0) = match layout {
                Layout::Nhd => (h * d, d, bs * h * d),
                _ => (d, bs * d, h * bs * d),
            };
            let ts = or_default(desc.token_stride, ts0);
            let hs = or_default(desc.head_stride, hs0);
            let bstr = or_default(desc.block_stride, bs0);
            let mut dims = [
                (ts, bs, "token_stride"),
                (hs, h, "head_stride"),
                (bstr, desc.num_blocks as usize, "block_stride"),
            ];
            check_no_alias(&mut dims, d)?;
            // K and V may interleave (FlashInfer's [num_blocks, 2, ...] pages) but never share
            // an element: V's base, seen from K's, must not be a difference of two offsets.
            let delta = (desc.v as i128 - desc.k as i128) / align as i128;
            let mut nested: Vec<(i128, i128)> = dims
                .iter()
                .map(|&(s, n, _)| (s as i128, n as i128))
                .collect();
            nested.push((1, d as i128));
            nested.sort_by_key(|&(s, _)| std::cmp::Reverse(s));
            ensure_arg!(
                !is_offset_difference(delta, &nested),
                "cache.v - cache.k = {delta} elements: V elements would share memory with K \
                 elements under these strides; K and V must be disjoint"
            );
            (bstr, ts, hs, desc.v as *mut u8)
        };
        let span = (desc.num_blocks as usize)
            .checked_mul(block_stride)
            .and_then(|x| x.checked_mul(dtype.size()))
            .filter(|&x| x <= isize::MAX as usize);
        ensure_arg!(
            span.is_some(),
            "cache spans more than the address space (num_blocks * block_stride overflows)"
        );
        Ok(KvCache {
            k: desc.k as *mut u8,
            v,
            dtype,
            layout,
            device,
            num_blocks: desc.num_blocks as usize,
            block_size: bs,
            num_kv_heads: h,
            head_dim: d,
            block_stride,
            token_stride,
            head_stride,
        })
    }

    /// Elements from the K (or V) base to one past the last element the cache addresses.
    pub fn extent_elems(&self) -> usize {
        let (nb, h, bs, d) = (
            self.num_blocks,
            self.num_kv_heads,
            self.block_size,
            self.head_dim,
        );
        let last = (nb - 1) * self.block_stride + (h - 1) * self.head_stride;
        if self.layout.packed() {
            last + 2 * bs * d
        } else {
            last + (bs - 1) * self.token_stride + d
        }
    }

    /// True when the `head_dim` elements of one (block, head, slot) are contiguous in K and V.
    pub fn rows_contiguous(&self) -> bool {
        !self.layout.packed()
    }

    /// Element offset of K[block][head][slot][d] from `self.k`.
    #[inline(always)]
    pub fn k_offset(&self, block: usize, head: usize, slot: usize, d: usize) -> usize {
        let base = block * self.block_stride + head * self.head_stride;
        match self.layout {
            Layout::Nhd | Layout::Hnd => base + slot * self.token_stride + d,
            Layout::VllmCpuVec => base + d * self.block_size + slot,
            Layout::VllmCpuAmx => {
                base + ((slot / 16) * (self.head_dim / 2) + d / 2) * 32 + (slot % 16) * 2 + d % 2
            }
        }
    }

    /// Element offset of V[block][head][slot][d] from `self.v`.
    #[inline(always)]
    pub fn v_offset(&self, block: usize, head: usize, slot: usize, d: usize) -> usize {
        let base = block * self.block_stride + head * self.head_stride;
        let kv = self.block_size * self.head_dim;
        match self.layout {
            Layout::Nhd | Layout::Hnd => base + slot * self.token_stride + d,
            Layout::VllmCpuVec => base + kv + slot * self.head_dim + d,
            Layout::VllmCpuAmx => {
                base + kv
                    + ((d / 16) * (self.block_size / 2) + slot / 2) * 32
                    + (d % 16) * 2
                    + slot % 2
            }
        }
    }

    pub fn require_device(&self, device: Device) -> Result<()> {
        if self.device != device {
            return Err(Error::unsupported(format!(
                "cache.device is {:?} but this backend runs on {device:?}; use the matching kvs_kernels",
                self.device
            )));
        }
        Ok(())
    }
}

fn or_default(v: u64, default: usize) -> usize {
    if v == 0 {
        default
    } else {
        v as usize
    }
}

/// Strided dims (stride, extent) around a contiguous `head_dim`: sorted by stride, each must
/// clear the full extent of the one inside it, so no two coordinates share an element.
/// Whether `delta` is the difference of two offsets `Σ i_k s_k` (`0 <= i_k < n_k`) of the
/// dims `(s_k, n_k)`, sorted by stride descending and nested (each stride at least the span of
/// the dims after it, as `check_no_alias` ensures): the remainder after a digit must fit the
/// dims below it, which leaves two candidate digits per level.
fn is_offset_difference(delta: i128, dims: &[(i128, i128)]) -> bool {
    match dims.split_first() {
        None => delta == 0,
        Some((&(s, n), rest)) => {
            let q = delta.div_euclid(s);
            [q, q + 1]
                .iter()
                .any(|&t| t.abs() < n && is_offset_difference(delta - t * s, rest))
        }
    }
}

fn check_no_alias(dims: &mut [(usize, usize, &str)], head_dim: usize) -> Result<()> {
    dims.sort_by_key(|d| d.0);
    let mut inner = head_dim;
    for &(stride, extent, name) in dims.iter() {
        if extent > 1 {
            ensure_arg!(
                stride >= inner,
                "cache.{name} = {stride} makes elements overlap (needs >= {inner} given the inner dimensions)"
            );
            inner = stride
                .checked_mul(extent)
                .ok_or_else(|| Error::invalid_arg(format!("cache.{name} overflows")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(layout: Layout, dtype: DType, k: *mut c_void, v: *mut c_void) -> KvCacheDesc {
        KvCacheDesc {
            k,
            v,
            dtype: dtype as u32,
            layout: layout as u32,
            device: 0,
            num_blocks: 3,
            block_size: 16,
            num_kv_heads: 2,
            head_dim: 32,
            block_stride: 0,
            token_stride: 0,
            head_stride: 0,
        }
    }

    /// Every coordinate maps to a distinct element inside the tensor, K and V both.
    fn assert_bijective(c: &KvCache, k_len: usize) {
        let mut seen = vec![false; k_len * 2];
        let v_base = (c.v as usize - c.k as usize) / c.dtype.size();
        for b in 0..c.num_blocks {
            for h in 0..c.num_kv_heads {
                for s in 0..c.block_size {
                    for d in 0..c.head_dim {
                        for off in [c.k_offset(b, h, s, d), v_base + c.v_offset(b, h, s, d)] {
                            assert!(
                                off < seen.len() && !seen[off],
                                "{:?} ({b},{h},{s},{d}) -> {off}",
                                c.layout
                            );
                            seen[off] = true;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn default_strides_tile_each_layout_exactly() {
        let n = 3 * 16 * 2 * 32;
        let mut buf = vec![0f32; 2 * n];
        let k = buf.as_mut_ptr() as *mut c_void;
        let v = unsafe { buf.as_mut_ptr().add(n) } as *mut c_void;
        for layout in [Layout::Nhd, Layout::Hnd] {
            let c = KvCache::new(&desc(layout, DType::F32, k, v)).unwrap();
            assert_bijective(&c, n);
        }
        let c = KvCache::new(&desc(
            Layout::VllmCpuVec,
            DType::F32,
            k,
            std::ptr::null_mut(),
        ))
        .unwrap();
        assert_bijective(&c, n);
        let mut b16 = vec![0u16; 2 * n];
        let c = KvCache::new(&desc(
            Layout::VllmCpuAmx,
            DType::Bf16,
            b16.as_mut_ptr().cast(),
            std::ptr::null_mut(),
        ))
        .unwrap();
        assert_bijective(&c, n);
    }

    #[test]
    fn flashinfer_interleaved_kv_pages_are_accepted() {
        // [num_blocks, 2, block_size, heads, dim]: V one page after K, block stride two pages.
        let page = 16 * 2 * 32;
        let mut buf = vec![0f32; 3 * 2 * page];
        let k = buf.as_mut_ptr() as *mut c_void;
        let v = unsafe { buf.as_mut_ptr().add(page) } as *mut c_void;
        let mut d = desc(Layout::Nhd, DType::F32, k, v);
        d.block_stride = 2 * page as u64;
        let c = KvCache::new(&d).unwrap();
        assert_eq!(c.v_offset(1, 0, 0, 0) + page, 3 * page);
    }

    #[test]
    fn overlapping_k_and_v_are_refused_element_by_element() {
        // NHD, 3 blocks of 16 x 2 heads x 32: one K tensor spans 3 * 1024 elements.
        let mut buf = vec![0f32; 8192];
        let base = buf.as_mut_ptr();
        let at = |i: usize| unsafe { base.add(i) } as *mut c_void;
        // V starting inside K's range: shares elements (shift by one head, one token, one block,
        // or a single element) -> refused.
        for shift in [1, 32, 64, 1024, 2047, 3071] {
            let e = KvCache::new(&desc(Layout::Nhd, DType::F32, at(0), at(shift))).unwrap_err();
            assert!(
                e.message.contains("cache.v - cache.k"),
                "{shift}: {}",
                e.message
            );
            let e = KvCache::new(&desc(Layout::Nhd, DType::F32, at(shift), at(0))).unwrap_err();
            assert!(
                e.message.contains("cache.v - cache.k"),
                "-{shift}: {}",
                e.message
            );
        }
        // Right after K, or in the gaps of a strided K (every other head slot), is disjoint.
        assert!(KvCache::new(&desc(Layout::Nhd, DType::F32, at(0), at(3072))).is_ok());
        let mut gappy = desc(Layout::Nhd, DType::F32, at(0), at(32));
        gappy.head_stride = 64;
        gappy.token_stride = 128;
        gappy.block_stride = 2048;
        let c = KvCache::new(&gappy).unwrap();
        assert_bijective(&c, 2 * 2048 + 64);
    }

    #[test]
    fn extent_ends_at_the_last_addressed_element() {
        let mut buf = vec![0f32; 8192];
        let (k, v) = (
            buf.as_mut_ptr() as *mut c_void,
            unsafe { buf.as_mut_ptr().add(4096) } as *mut c_void,
        );
        for layout in [Layout::Nhd, Layout::Hnd] {
            let c = KvCache::new(&desc(layout, DType::F32, k, v)).unwrap();
            assert_eq!(c.extent_elems(), 3 * 16 * 2 * 32);
        }
        let c = KvCache::new(&desc(
            Layout::VllmCpuVec,
            DType::F32,
            k,
            std::ptr::null_mut(),
        ))
        .unwrap();
        assert_eq!(c.extent_elems(), 3 * 2 * 2 * 16 * 32);
        let max = (0..3)
            .flat_map(|b| {
                (0..2).flat_map(move |h| {
                    (0..16).flat_map(move |s| (0..32).map(move |d| (b, h, s, d)))
                })
            })
            .map(|(b, h, s, d)| c.k_offset(b, h, s, d).max(c.v_offset(b, h, s, d)))
            .max()
            .unwrap();
        assert_eq!(c.extent_elems(), max + 1);
    }

    #[test]
    fn bad_descriptors_are_named() {
        let mut buf = vec![0f32; 8192];
        let k = buf.as_mut_ptr() as *mut c_void;
        let v = unsafe { buf.as_mut_ptr().add(4096) } as *mut c_void;
        let cases: Vec<(KvCacheDesc, &str)> = vec![
            (
                KvCacheDesc {
                    dtype: 9,
                    ..desc(Layout::Nhd, DType::F32, k, v)
                },
                "cache.dtype = 9",
            ),
            (
                KvCacheDesc {
                    layout: 7,
                    ..desc(Layout::Nhd, DType::F32, k, v)
                },
                "cache.layout = 7",
            ),
            (
                KvCacheDesc {
                    head_dim: 0,
                    ..desc(Layout::Nhd, DType::F32, k, v)
                },
                "cache.head_dim is 0",
            ),
            (
                desc(Layout::Nhd, DType::F32, k, std::ptr::null_mut()),
                "cache.v is NULL",
            ),
            (
                desc(Layout::Nhd, DType::F32, k, k),
                "cache.v equals cache.k",
            ),
            (
                KvCacheDesc {
                    token_stride: 16,
                    ..desc(Layout::Nhd, DType::F32, k, v)
                },
                "overlap",
            ),
            (
                desc(Layout::VllmCpuVec, DType::F32, k, v),
                "cache.v must be NULL",
            ),
            (
                desc(Layout::VllmCpuAmx, DType::F32, k, std::ptr::null_mut()),
                "never probed",
            ),
            (
                desc(Layout::VllmCpuVec, DType::F16, k, std::ptr::null_mut()),
                "never probed",
            ),
            (
                desc(Layout::Nhd, DType::F32, (k as usize + 2) as *mut c_void, v),
                "not aligned",
            ),
        ];
        for (d, msg) in cases {
            let e = KvCache::new(&d).unwrap_err();
            assert!(e.message.contains(msg), "{msg}: {}", e.message);
        }
    }
}
