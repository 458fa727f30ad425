//! CUDA kernel benchmarks (run by scripts/gpu-check.sh on a GPU machine): compaction GB/s
//! against the device's copy bandwidth measured in the same run, SnapKV scoring and token
//! selection times. Prints one JSON object. Needs `--features cuda`.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use kvsieve::ffi::*;
use kvsieve::kernels::{DType, KvCacheDesc, Layout};
use kvsieve::Status;
use std::sync::Arc;

const HEADS: usize = 8;
const DIM: usize = 128;
const Q_HEADS: usize = 32;
const WINDOW: usize = 32;
const ITERS: usize = 20;

fn ptr<T>(s: &CudaSlice<T>, st: &Arc<CudaStream>) -> u64 {
    s.device_ptr(st).0
}

/// Milliseconds per run of `f`, by CUDA events around `ITERS` runs after one warm-up.
fn time_ms(ctx: &Arc<CudaContext>, st: &Arc<CudaStream>, mut f: impl FnMut()) -> f64 {
    f();
    let (a, b) = (
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap(),
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap(),
    );
    a.record(st).unwrap();
    for _ in 0..ITERS {
        f();
    }
    b.record(st).unwrap();
    b.synchronize().unwrap();
    a.elapsed_ms(&b).unwrap() as f64 / ITERS as f64
}

fn check(s: Status) {
    if s != Status::Ok {
        let msg = unsafe { std::ffi::CStr::from_ptr(kvs_last_error()) };
        panic!("{s:?}: {}", msg.to_string_lossy());
    }
}

fn main() {
    // SAFETY: only probes for libcuda; cudarc panics on first use without it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        println!("{{\"error\": \"no CUDA driver (libcuda.so) on this machine\"}}");
        std::process::exit(1);
    }
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let st = ctx.new_stream().unwrap();
    let mut kernels = std::ptr::null_mut();
    check(unsafe { kvs_kernels_new_cuda(0, st.cu_stream() as *mut _, &mut kernels) });
    let mut rows = Vec::new();
    for &len in &[4096usize, 16384, 32768] {
        for &bs in &[16usize, 128] {
            let blocks = len.div_ceil(bs);
            let elems = blocks * bs * HEADS * DIM;
            let k: CudaSlice<u16> = st.alloc_zeros(elems).unwrap();
            let v: CudaSlice<u16> = st.alloc_zeros(elems).unwrap();
            let desc = KvCacheDesc {
                k: ptr(&k, &st) as *mut _,
                v: ptr(&v, &st) as *mut _,
                dtype: DType::Bf16 as u32,
                layout: Layout::Nhd as u32,
                device: 1,
                num_blocks: blocks as u32,
                block_size: bs as u32,
                num_kv_heads: HEADS as u32,
                head_dim: DIM as u32,
                block_stride: 0,
                token_stride: 0,
                head_stride: 0,
            };
            let row: Vec<i32> = (0..blocks as i32).rev().collect();
            let sel = len / 4;
            // Every 4th token per head, offset by head: a realistic scattered 25%.
            let keep: Vec<u32> = (0..HEADS)
                .flat_map(|h| (0..sel).map(move |j| (4 * j + h % 4) as u32))
                .collect();
            let (drow, dkeep) = (st.clone_htod(&row).unwrap(), st.clone_htod(&keep).unwrap());
            let released: CudaSlice<i32> = st.alloc_zeros(blocks).unwrap();
            let seq = SequenceDesc {
                row: ptr(&drow, &st) as *const i32,
                row_len: blocks as u32,
                cached_len: len as u32,
                protected_len: 0,
            };
            let mut n = 0u32;
            let compact_ms = time_ms(&ctx, &st, || {
                check(unsafe {
                    kvs_compact(
                        kernels,
                        &desc,
                        &seq,
                        ptr(&dkeep, &st) as *const u32,
                        keep.len(),
                        sel as u32,
                        ptr(&released, &st) as *mut i32,
                        blocks,
                        &mut n,
                    )
                })
            });
            check(unsafe { kvs_kernels_synchronize(kernels) });
            let bytes = 2 * HEADS * sel * DIM * 2;
            let src: CudaSlice<u8> = st.alloc_zeros(bytes).unwrap();
            let mut dst: CudaSlice<u8> = st.alloc_zeros(bytes).unwrap();
            let copy_ms = time_ms(&ctx, &st, || st.memcpy_dtod(&src, &mut dst).unwrap());
            let scores: CudaSlice<f32> = st.alloc_zeros(HEADS * len).unwrap();
            let q: CudaSlice<u16> = st.alloc_zeros(WINDOW * Q_HEADS * DIM).unwrap();
            let args = SnapKvArgs {
                queries: ptr(&q, &st) as *const _,
                queries_dtype: DType::Bf16 as u32,
                window: WINDOW as u32,
                num_q_heads: Q_HEADS as u32,
                pool_kernel: 7,
                pool: 0,
            };
            let snapkv_ms = time_ms(&ctx, &st, || {
                check(unsafe {
                    kvs_score_snapkv(
                        kernels,
                        &desc,
                        &seq,
                        &args,
                        ptr(&scores, &st) as *mut f32,
                        HEADS * len,
                    )
                })
            });
            let tsel = TokenSelectArgs {
                cached_len: len as u32,
                protected_len: 0,
                sink_tokens: 4,
                protected_tail: 64,
                selected: sel as u32,
            };
            let kout: CudaSlice<u32> = st.alloc_zeros(HEADS * sel).unwrap();
            let select_ms = time_ms(&ctx, &st, || {
                check(unsafe {
                    kvs_select_tokens(
                        kernels,
                        ptr(&scores, &st) as *const f32,
                        HEADS * len,
                        HEADS as u32,
                        &tsel,
                        ptr(&kout, &st) as *mut u32,
                        HEADS * sel,
                    )
                })
            });
            check(unsafe { kvs_kernels_synchronize(kernels) });
            let gbps = |ms: f64| bytes as f64 / (ms * 1e6);
            rows.push(format!(
                "{{\"tokens\": {len}, \"block_size\": {bs}, \"bytes_moved\": {bytes}, \"compact_ms\": {compact_ms:.4}, \"compact_gbps\": {:.1}, \
                 \"copy_ms\": {copy_ms:.4}, \"copy_gbps\": {:.1}, \"compact_over_copy\": {:.3}, \"snapkv_ms\": {snapkv_ms:.4}, \"select_ms\": {select_ms:.4}}}",
                gbps(compact_ms),
                gbps(copy_ms),
                copy_ms / compact_ms
            ));
        }
    }
    unsafe { kvs_kernels_free(kernels) };
    println!("{{\"shape\": {{\"kv_heads\": {HEADS}, \"head_dim\": {DIM}, \"q_heads\": {Q_HEADS}, \"window\": {WINDOW}, \"dtype\": \"bf16\", \"layout\": \"NHD\", \"kept\": 0.25}}, \"runs\": [{}]}}", rows.join(", "));
}
