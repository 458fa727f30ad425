//! CUDA kernels against the CPU reference on random inputs: compaction bit for bit, scores
//! within 1e-3 relative, identical keep sets where scores have no near-ties; and the backend's
//! error contract (per-call device checks, host out-params written at synchronize).
//!
//! Every test needs an NVIDIA GPU, so each is `#[ignore]`d: a plain `cargo test` reports them
//! as ignored (skipped), never as passed. `scripts/gpu-check.sh` (and `scripts/test.sh` on a
//! machine where `nvidia-smi` sees a GPU) runs them with `--include-ignored`, and then a missing
//! GPU is a failure. Without a GPU, `scripts/cuda-emulated.sh` runs them on the emulated device of
//! `tests/cuda_emu/` (EMULATED: kernels compiled for the host behind a fake libcuda).
#![cfg(feature = "cuda")]

mod common;

use common::{random_keep, random_meta, random_row, Rng, TestCache};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use kvsieve::ffi::*;
use kvsieve::kernels::{DType, KvCacheDesc, Layout};
use kvsieve::Status;
use std::ffi::CStr;
use std::ptr::null_mut;
use std::sync::Arc;

struct Gpu {
    kernels: *mut KvsKernels,
    cpu: *mut KvsKernels,
    stream: Arc<CudaStream>,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        unsafe {
            kvs_kernels_free(self.kernels);
            kvs_kernels_free(self.cpu);
        }
    }
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(kvs_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn gpu(test: &str) -> Gpu {
    let mut k = null_mut();
    let s = unsafe { kvs_kernels_new_cuda(0, null_mut(), &mut k) };
    assert_eq!(
        s,
        Status::Ok,
        "{test} was asked to run but there is no usable GPU: {}",
        last_error()
    );
    let mut cpu = null_mut();
    assert_eq!(unsafe { kvs_kernels_new_cpu(&mut cpu) }, Status::Ok);
    let stream = CudaContext::new(0).unwrap().default_stream();
    Gpu {
        kernels: k,
        cpu,
        stream,
    }
}

impl Gpu {
    fn up<T: DeviceRepr>(&self, v: &[T]) -> CudaSlice<T> {
        self.stream.clone_htod(v).unwrap()
    }
    fn down<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Vec<T> {
        self.sync();
        self.stream.clone_dtoh(s).unwrap()
    }
    fn sync(&self) {
        assert_eq!(
            unsafe { kvs_kernels_synchronize(self.kernels) },
            Status::Ok,
            "{}",
            last_error()
        );
    }
}

fn dptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    s.device_ptr(stream).0
}

/// The cache on the device: K/V uploaded, descriptor pointing at device memory.
struct DevCache {
    k: CudaSlice<u32>,
    v: CudaSlice<u32>,
    desc: KvCacheDesc,
}

fn upload(g: &Gpu, t: &TestCache) -> DevCache {
    let (k, v) = (g.up(&t.k), g.up(&t.v));
    let mut desc = t.desc;
    desc.k = dptr(&k, &g.stream) as *mut _;
    desc.v = dptr(&v, &g.stream) as *mut _;
    desc.device = 1;
    DevCache { k, v, desc }
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-3 * a.abs().max(b.abs()) + 1e-6
}

const SHAPES: [(Layout, DType, usize); 6] = [
    (Layout::Nhd, DType::F32, 16),
    (Layout::Nhd, DType::F16, 128),
    (Layout::Nhd, DType::Bf16, 32),
    (Layout::Hnd, DType::F32, 64),
    (Layout::Hnd, DType::F16, 16),
    (Layout::Hnd, DType::Bf16, 256),
];

#[test]
#[ignore = "needs an NVIDIA GPU (run with --include-ignored there)"]
fn compaction_matches_cpu_bit_for_bit() {
    let g = gpu("compaction_matches_cpu_bit_for_bit");
    let mut rng = Rng(41);
    for (layout, dtype, bs) in SHAPES {
        let (heads, dim, c) = (4, 64, 3 * bs + 7);
        let blocks = c.div_ceil(bs);
        let mut t = TestCache::new(layout, dtype, blocks + 3, bs, heads, dim);
        t.fill_bits(&mut rng);
        let row = random_row(&mut rng, blocks + 3, blocks);
        let p = bs; // one protected block
        let k = (c - p) / 3;
        let keep = random_keep(&mut rng, heads, p, c, k);
        let dev = upload(&g, &t);
        // Reserved scratch (as the vLLM plugin does before vLLM sizes its cache) is then used.
        assert_eq!(
            unsafe { kvs_kernels_reserve(g.kernels, &dev.desc, c as u32, 8, 2 * heads as u32) },
            Status::Ok,
            "{}",
            last_error()
        );
        let (drow, dkeep) = (g.up(&row), g.up(&keep));
        let dreleased: CudaSlice<i32> = g.stream.alloc_zeros(blocks).unwrap();
        let seq = SequenceDesc {
            row: dptr(&drow, &g.stream) as *const i32,
            row_len: blocks as u32,
            cached_len: c as u32,
            protected_len: p as u32,
        };
        let mut n = 0u32;
        let s = unsafe {
            kvs_compact(
                g.kernels,
                &dev.desc,
                &seq,
                dptr(&dkeep, &g.stream) as *const u32,
                keep.len(),
                k as u32,
                dptr(&dreleased, &g.stream) as *mut i32,
                blocks,
                &mut n,
            )
        };
        assert_eq!(s, Status::Ok, "{}", last_error());
        // CPU on the host copy.
        let hseq = SequenceDesc {
            row: row.as_ptr(),
            row_len: blocks as u32,
            cached_len: c as u32,
            protected_len: p as u32,
        };
        let mut hreleased = vec![0i32; blocks];
        let mut hn = 0u32;
        let s = unsafe {
            kvs_compact(
                g.cpu,
                &t.desc,
                &hseq,
                keep.as_ptr(),
                keep.len(),
                k as u32,
                hreleased.as_mut_ptr(),
                blocks,
                &mut hn,
            )
        };
        assert_eq!(s, Status::Ok);
        assert!(
            g.down(&dev.k) == t.k,
            "{layout:?} {dtype:?} bs {bs}: K differs"
        );
        assert_eq!(n, hn, "*num_released is written at synchronize");
        assert!(
            g.down(&dev.v) == t.v,
            "{layout:?} {dtype:?} bs {bs}: V differs"
        );
        assert_eq!(&g.down(&dreleased)[..n as usize], &hreleased[..n as usize]);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --include-ignored there)"]
fn out_of_place_compaction_matches_cpu_bit_for_bit() {
    let g = gpu("out_of_place_compaction_matches_cpu_bit_for_bit");
    let mut rng = Rng(43);
    for (layout, dtype, bs) in SHAPES {
        let (heads, dim, c) = (4, 64, 3 * bs + 7);
        let blocks = c.div_ceil(bs);
        let p = bs; // one protected block
        let k = (c - p) / 3;
        let nd = k.div_ceil(bs);
        let total = blocks + nd + 2;
        let mut t = TestCache::new(layout, dtype, total, bs, heads, dim);
        t.fill_bits(&mut rng);
        let ids = random_row(&mut rng, total, blocks + nd);
        let (row, dest) = ids.split_at(blocks);
        let keep = random_keep(&mut rng, heads, p, c, k);
        let dev = upload(&g, &t);
        let (drow, dkeep, ddest) = (g.up(row), g.up(&keep), g.up(dest));
        let seq = SequenceDesc {
            row: dptr(&drow, &g.stream) as *const i32,
            row_len: blocks as u32,
            cached_len: c as u32,
            protected_len: p as u32,
        };
        let s = unsafe {
            kvs_compact_into(
                g.kernels,
                &dev.desc,
                &seq,
                dptr(&dkeep, &g.stream) as *const u32,
                keep.len(),
                k as u32,
                dptr(&ddest, &g.stream) as *const i32,
                nd as u32,
            )
        };
        assert_eq!(s, Status::Ok, "{}", last_error());
        assert_eq!(
            unsafe { kvs_kernels_synchronize(g.kernels) },
            Status::Ok,
            "{}",
            last_error()
        );
        let hseq = SequenceDesc {
            row: row.as_ptr(),
            ..seq
        };
        let s = unsafe {
            kvs_compact_into(
                g.cpu,
                &t.desc,
                &hseq,
                keep.as_ptr(),
                keep.len(),
                k as u32,
                dest.as_ptr(),
                nd as u32,
            )
        };
        assert_eq!(s, Status::Ok, "{}", last_error());
        assert!(
            g.down(&dev.k) == t.k,
            "{layout:?} {dtype:?} bs {bs}: K differs"
        );
        assert!(
            g.down(&dev.v) == t.v,
            "{layout:?} {dtype:?} bs {bs}: V differs"
        );
    }
    // A destination block inside the row is found on the device; nothing is written.
    let mut t = TestCache::new(Layout::Nhd, DType::F16, 8, 16, 2, 32);
    t.fill_bits(&mut rng);
    let row = random_row(&mut rng, 8, 5);
    let keep: Vec<u32> = (0..2).flat_map(|_| (10u32..40).step_by(2)).collect();
    let dest = [row[2]];
    let dev = upload(&g, &t);
    let (drow, dkeep, ddest) = (g.up(&row), g.up(&keep), g.up(&dest));
    let seq = SequenceDesc {
        row: dptr(&drow, &g.stream) as *const i32,
        row_len: 5,
        cached_len: 70,
        protected_len: 0,
    };
    let s = unsafe {
        kvs_compact_into(
            g.kernels,
            &dev.desc,
            &seq,
            dptr(&dkeep, &g.stream) as *const u32,
            30,
            15,
            dptr(&ddest, &g.stream) as *const i32,
            1,
        )
    };
    assert_eq!(s, Status::Ok, "enqueued; the device finds the overlap");
    assert_eq!(
        unsafe { kvs_kernels_synchronize(g.kernels) },
        Status::InvalidArgument
    );
    assert!(
        last_error().contains(&format!(
            "in the row or twice in dest; pass fresh blocks (block id {})",
            row[2]
        )),
        "{}",
        last_error()
    );
    assert!(g.down(&dev.k) == t.k, "K written although dest was refused");
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --include-ignored there)"]
fn bad_device_rows_move_nothing_and_are_reported_at_sync() {
    let g = gpu("bad_device_rows_move_nothing_and_are_reported_at_sync");
    let mut rng = Rng(5);
    let mut t = TestCache::new(Layout::Nhd, DType::Bf16, 8, 16, 2, 32);
    t.fill_bits(&mut rng);
    let mut row = random_row(&mut rng, 8, 5);
    row[3] = row[1];
    let keep: Vec<u32> = (0..2).flat_map(|_| (10u32..40).step_by(2)).collect();
    let dev = upload(&g, &t);
    let (drow, dkeep) = (g.up(&row), g.up(&keep));
    let dreleased: CudaSlice<i32> = g.stream.alloc_zeros(8).unwrap();
    let seq = SequenceDesc {
        row: dptr(&drow, &g.stream) as *const i32,
        row_len: 5,
        cached_len: 70,
        protected_len: 0,
    };
    let mut n = 99;
    let s = unsafe {
        kvs_compact(
            g.kernels,
            &dev.desc,
            &seq,
            dptr(&dkeep, &g.stream) as *const u32,
            30,
            15,
            dptr(&dreleased, &g.stream) as *mut i32,
            8,
            &mut n,
        )
    };
    assert_eq!(s, Status::Ok, "enqueued; the device finds the duplicate");
    // A second, valid compaction of another cache on the same backend: not silenced by the
    // first call's failure.
    let mut t2 = TestCache::new(Layout::Nhd, DType::Bf16, 8, 16, 2, 32);
    t2.fill_bits(&mut rng);
    let row2 = random_row(&mut rng, 8, 5);
    let dev2 = upload(&g, &t2);
    let drow2 = g.up(&row2);
    let dreleased2: CudaSlice<i32> = g.stream.alloc_zeros(8).unwrap();
    let seq2 = SequenceDesc {
        row: dptr(&drow2, &g.stream) as *const i32,
        ..seq
    };
    let mut n2 = 99;
    let s = unsafe {
        kvs_compact(
            g.kernels,
            &dev2.desc,
            &seq2,
            dptr(&dkeep, &g.stream) as *const u32,
            30,
            15,
            dptr(&dreleased2, &g.stream) as *mut i32,
            8,
            &mut n2,
        )
    };
    assert_eq!(s, Status::Ok);
    assert_eq!((n, n2), (99, 99), "host out-params wait for synchronize");
    assert_eq!(
        unsafe { kvs_kernels_synchronize(g.kernels) },
        Status::InvalidArgument
    );
    let m = last_error();
    assert!(
        m.contains(&format!("appears twice in the row (block id {})", row[1]))
            && m.contains("call 1 ")
            && !m.contains("call 2 "),
        "{m}"
    );
    assert!(
        g.stream.clone_dtoh(&dev.k).unwrap() == t.k,
        "K moved although the row was refused"
    );
    assert_eq!(n, 99, "the refused call wrote no out-param");
    assert!(
        g.stream.clone_dtoh(&dev2.k).unwrap() != t2.k,
        "the valid call after it ran"
    );
    assert_eq!(n2, 4, "70 cached -> 15 kept: row blocks 1..5 released");
    assert_eq!(
        unsafe { kvs_kernels_synchronize(g.kernels) },
        Status::Ok,
        "the error is reported once"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --include-ignored there)"]
fn scores_match_cpu_within_1e3() {
    let g = gpu("scores_match_cpu_within_1e3");
    let mut rng = Rng(77);
    for (layout, dtype, bs) in SHAPES {
        // A window unlike every other dimension (heads 2, query heads 8, head_dim 64, block size,
        // length), so swapped launch arguments cannot pass.
        let (heads, gqa, dim, c, window) = (2, 4, 64, 5 * bs + 3, 7);
        let blocks = c.div_ceil(bs);
        let mut t = TestCache::new(layout, dtype, blocks + 2, bs, heads, dim);
        t.fill_values(&mut rng);
        let row = random_row(&mut rng, blocks + 2, blocks);
        let dev = upload(&g, &t);
        let drow = g.up(&row);
        let hseq = SequenceDesc {
            row: row.as_ptr(),
            row_len: blocks as u32,
            cached_len: c as u32,
            protected_len: 0,
        };
        let dseq = SequenceDesc {
            row: dptr(&drow, &g.stream) as *const i32,
            ..hseq
        };
        let n = heads * c;

        let mut want = vec![0f32; n];
        assert_eq!(
            unsafe { kvs_score_knorm(g.cpu, &t.desc, &hseq, want.as_mut_ptr(), n) },
            Status::Ok
        );
        let dout: CudaSlice<f32> = g.stream.alloc_zeros(n).unwrap();
        assert_eq!(
            unsafe {
                kvs_score_knorm(
                    g.kernels,
                    &dev.desc,
                    &dseq,
                    dptr(&dout, &g.stream) as *mut f32,
                    n,
                )
            },
            Status::Ok,
            "{}",
            last_error()
        );
        for (a, b) in g.down(&dout).iter().zip(&want) {
            assert!(close(*a, *b), "knorm {layout:?} {dtype:?}: {a} vs {b}");
        }

        let q: Vec<f32> = (0..window * heads * gqa * dim)
            .map(|_| rng.unit())
            .collect();
        let dq = g.up(&q);
        for pool in [0u32, 1] {
            let args = SnapKvArgs {
                queries: q.as_ptr().cast(),
                queries_dtype: 0,
                window: window as u32,
                num_q_heads: (heads * gqa) as u32,
                pool_kernel: 5,
                pool,
            };
            assert_eq!(
                unsafe { kvs_score_snapkv(g.cpu, &t.desc, &hseq, &args, want.as_mut_ptr(), n) },
                Status::Ok
            );
            let dargs = SnapKvArgs {
                queries: dptr(&dq, &g.stream) as *const _,
                ..args
            };
            assert_eq!(
                unsafe {
                    kvs_score_snapkv(
                        g.kernels,
                        &dev.desc,
                        &dseq,
                        &dargs,
                        dptr(&dout, &g.stream) as *mut f32,
                        n,
                    )
                },
                Status::Ok,
                "{}",
                last_error()
            );
            for (i, (a, b)) in g.down(&dout).iter().zip(&want).enumerate() {
                assert!(
                    close(*a, *b),
                    "snapkv {layout:?} {dtype:?} pool {pool} [{i}]: {a} vs {b}"
                );
            }
        }

        // Quest metadata for every row block, then bounds for one query; one key range per
        // block, and two (a partial block repeats its filled range).
        for ranges in [1usize, 2].into_iter().filter(|r| bs % r == 0) {
            let meta = (blocks + 2) * ranges * heads * dim;
            let (mut lo, mut hi) = (vec![0f32; meta], vec![0f32; meta]);
            let (dlo, dhi): (CudaSlice<f32>, CudaSlice<f32>) = (
                g.stream.alloc_zeros(meta).unwrap(),
                g.stream.alloc_zeros(meta).unwrap(),
            );
            for (j, &b) in row.iter().enumerate() {
                let filled = (c - j * bs).min(bs) as u32;
                assert_eq!(
                    unsafe {
                        kvs_quest_update_block(
                            g.cpu,
                            &t.desc,
                            b as u32,
                            filled,
                            lo.as_mut_ptr(),
                            hi.as_mut_ptr(),
                            meta,
                        )
                    },
                    Status::Ok
                );
                assert_eq!(
                    unsafe {
                        kvs_quest_update_block(
                            g.kernels,
                            &dev.desc,
                            b as u32,
                            filled,
                            dptr(&dlo, &g.stream) as *mut f32,
                            dptr(&dhi, &g.stream) as *mut f32,
                            meta,
                        )
                    },
                    Status::Ok
                );
            }
            assert_eq!(g.down(&dlo), lo, "quest min is exact");
            assert_eq!(g.down(&dhi), hi, "quest max is exact");
            let mut bound = vec![0f32; blocks];
            let dbound: CudaSlice<f32> = g.stream.alloc_zeros(blocks).unwrap();
            let qh = (heads * gqa) as u32;
            assert_eq!(
                unsafe {
                    kvs_quest_bound(
                        g.cpu,
                        &t.desc,
                        &hseq,
                        q.as_ptr().cast(),
                        0,
                        qh,
                        lo.as_ptr(),
                        hi.as_ptr(),
                        meta,
                        bound.as_mut_ptr(),
                        blocks,
                    )
                },
                Status::Ok
            );
            assert_eq!(
                unsafe {
                    kvs_quest_bound(
                        g.kernels,
                        &dev.desc,
                        &dseq,
                        dptr(&dq, &g.stream) as *const _,
                        0,
                        qh,
                        dptr(&dlo, &g.stream) as *const f32,
                        dptr(&dhi, &g.stream) as *const f32,
                        meta,
                        dptr(&dbound, &g.stream) as *mut f32,
                        blocks,
                    )
                },
                Status::Ok
            );
            for (a, b) in g.down(&dbound).iter().zip(&bound) {
                assert!(close(*a, *b), "quest ({ranges} ranges) {a} vs {b}");
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --include-ignored there)"]
fn selection_matches_cpu() {
    let g = gpu("selection_matches_cpu");
    let mut rng = Rng(9);
    for &(heads, c, p) in &[(8usize, 5000usize, 0usize), (2, 300, 32), (4, 70_000, 128)] {
        // Distinct scores: no near-ties, so both sides must pick the same set.
        let mut scores: Vec<f32> = (0..heads * c).map(|i| i as f32).collect();
        rng.shuffle(&mut scores);
        let sel = TokenSelectArgs {
            cached_len: c as u32,
            protected_len: p as u32,
            sink_tokens: 4,
            protected_tail: 16,
            selected: ((c - p) / 4) as u32,
        };
        let len = heads * sel.selected as usize;
        let mut want = vec![0u32; len];
        for streaming in [false, true] {
            let sp = if streaming {
                std::ptr::null()
            } else {
                scores.as_ptr()
            };
            assert_eq!(
                unsafe {
                    kvs_select_tokens(
                        g.cpu,
                        sp,
                        scores.len(),
                        heads as u32,
                        &sel,
                        want.as_mut_ptr(),
                        len,
                    )
                },
                Status::Ok
            );
            let ds = g.up(&scores);
            let dkeep: CudaSlice<u32> = g.stream.alloc_zeros(len).unwrap();
            let dsp = if streaming { 0 } else { dptr(&ds, &g.stream) };
            assert_eq!(
                unsafe {
                    kvs_select_tokens(
                        g.kernels,
                        dsp as *const f32,
                        scores.len(),
                        heads as u32,
                        &sel,
                        dptr(&dkeep, &g.stream) as *mut u32,
                        len,
                    )
                },
                Status::Ok,
                "{}",
                last_error()
            );
            assert_eq!(
                g.down(&dkeep),
                want,
                "heads {heads}, cached {c}, streaming {streaming}"
            );
        }
    }
    // Ties: equal scores go to the earlier position on both sides.
    let scores: Vec<f32> = (0..4096).map(|i| (i % 5) as f32).collect();
    let sel = TokenSelectArgs {
        cached_len: 4096,
        protected_len: 0,
        sink_tokens: 0,
        protected_tail: 1,
        selected: 1000,
    };
    let mut want = vec![0u32; 1000];
    assert_eq!(
        unsafe {
            kvs_select_tokens(
                g.cpu,
                scores.as_ptr(),
                4096,
                1,
                &sel,
                want.as_mut_ptr(),
                1000,
            )
        },
        Status::Ok
    );
    let (ds, dkeep) = (g.up(&scores), g.stream.alloc_zeros::<u32>(1000).unwrap());
    assert_eq!(
        unsafe {
            kvs_select_tokens(
                g.kernels,
                dptr(&ds, &g.stream) as *const f32,
                4096,
                1,
                &sel,
                dptr(&dkeep, &g.stream) as *mut u32,
                1000,
            )
        },
        Status::Ok
    );
    assert_eq!(g.down(&dkeep), want, "ties");

    // Blocks, CSR and dense.
    let lens = [3usize, 40, 9, 120];
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    for &n in &lens {
        indices.extend((0..n).map(|_| rng.below(1 << 20) as i32));
        indptr.push(indices.len() as i32);
    }
    let mut bscores: Vec<f32> = (0..indices.len()).map(|i| i as f32 * 0.5).collect();
    rng.shuffle(&mut bscores);
    let last = vec![5i32, 16, 1, 9];
    let args = BlockSelectArgs {
        keep_blocks: 8,
        sink_blocks: 1,
        recent_blocks: 2,
    };
    let nnz = indices.len();
    let (mut oi, mut ox, mut ol) = (vec![0i32; 5], vec![0i32; nnz], vec![0i32; 4]);
    assert_eq!(
        unsafe {
            kvs_select_blocks_csr(
                g.cpu,
                indptr.as_ptr(),
                4,
                indices.as_ptr(),
                nnz,
                last.as_ptr(),
                bscores.as_ptr(),
                &args,
                oi.as_mut_ptr(),
                ox.as_mut_ptr(),
                nnz,
                ol.as_mut_ptr(),
            )
        },
        Status::Ok
    );
    let (dip, dix, dl, dsc) = (g.up(&indptr), g.up(&indices), g.up(&last), g.up(&bscores));
    let (doi, dox, dol): (CudaSlice<i32>, CudaSlice<i32>, CudaSlice<i32>) = (
        g.stream.alloc_zeros(5).unwrap(),
        g.stream.alloc_zeros(nnz).unwrap(),
        g.stream.alloc_zeros(4).unwrap(),
    );
    let s = unsafe {
        kvs_select_blocks_csr(
            g.kernels,
            dptr(&dip, &g.stream) as *const i32,
            4,
            dptr(&dix, &g.stream) as *const i32,
            nnz,
            dptr(&dl, &g.stream) as *const i32,
            dptr(&dsc, &g.stream) as *const f32,
            &args,
            dptr(&doi, &g.stream) as *mut i32,
            dptr(&dox, &g.stream) as *mut i32,
            nnz,
            dptr(&dol, &g.stream) as *mut i32,
        )
    };
    assert_eq!(s, Status::Ok, "{}", last_error());
    let got_oi = g.down(&doi);
    assert_eq!(got_oi, oi);
    assert_eq!(&g.down(&dox)[..oi[4] as usize], &ox[..oi[4] as usize]);
    assert_eq!(g.down(&dol), ol);

    let (a, b) = (indptr[3] as usize, indptr[4] as usize);
    let mut out_row = vec![0i32; b - a];
    let mut kept = 0u32;
    assert_eq!(
        unsafe {
            kvs_select_blocks_row(
                g.cpu,
                indices[a..].as_ptr(),
                (b - a) as u32,
                bscores[a..].as_ptr(),
                &args,
                -1,
                out_row.as_mut_ptr(),
                (b - a) as u32,
                &mut kept,
            )
        },
        Status::Ok
    );
    let (drow, dsc2) = (g.up(&indices[a..b]), g.up(&bscores[a..b]));
    let dout: CudaSlice<i32> = g.stream.alloc_zeros(b - a).unwrap();
    let mut dkept = 0u32;
    let s = unsafe {
        kvs_select_blocks_row(
            g.kernels,
            dptr(&drow, &g.stream) as *const i32,
            (b - a) as u32,
            dptr(&dsc2, &g.stream) as *const f32,
            &args,
            -1,
            dptr(&dout, &g.stream) as *mut i32,
            (b - a) as u32,
            &mut dkept,
        )
    };
    assert_eq!(s, Status::Ok, "{}", last_error());
    assert_eq!(g.down(&dout), out_row);
    assert_eq!(dkept, kept, "*num_kept is written at synchronize");
}

#[test]
#[ignore = "needs an NVIDIA GPU (run with --include-ignored there)"]
fn bad_csr_page_tables_are_refused_on_the_device() {
    let g = gpu("bad_csr_page_tables_are_refused_on_the_device");
    let args = BlockSelectArgs {
        keep_blocks: 2,
        sink_blocks: 1,
        recent_blocks: 1,
    };
    // indptr decreases at 2; then a valid table with a zero last_page_len.
    for (indptr, last, what) in [
        (vec![0i32, 4, 3, 7], vec![5i32, 3, 2], "indptr"),
        (vec![0i32, 4, 4, 7], vec![5i32, 3, 0], "last_page_len"),
    ] {
        let indices: Vec<i32> = (0..7).collect();
        let scores = vec![1.0f32; 7];
        let (dip, dix, dl, dsc) = (g.up(&indptr), g.up(&indices), g.up(&last), g.up(&scores));
        let sentinel = vec![-7i32; 7];
        let (doi, dox, dol) = (g.up(&sentinel[..4]), g.up(&sentinel), g.up(&sentinel[..3]));
        let s = unsafe {
            kvs_select_blocks_csr(
                g.kernels,
                dptr(&dip, &g.stream) as *const i32,
                3,
                dptr(&dix, &g.stream) as *const i32,
                7,
                dptr(&dl, &g.stream) as *const i32,
                dptr(&dsc, &g.stream) as *const f32,
                &args,
                dptr(&doi, &g.stream) as *mut i32,
                dptr(&dox, &g.stream) as *mut i32,
                7,
                dptr(&dol, &g.stream) as *mut i32,
            )
        };
        assert_eq!(s, Status::Ok, "enqueued");
        assert_eq!(
            unsafe { kvs_kernels_synchronize(g.kernels) },
            Status::InvalidArgument,
            "{what}"
        );
        assert!(last_error().contains(what), "{}", last_error());
        let got = (
            g.stream.clone_dtoh(&doi).unwrap(),
            g.stream.clone_dtoh(&dox).unwrap(),
            g.stream.clone_dtoh(&dol).unwrap(),
        );
        assert_eq!(
            got,
            (
                sentinel[..4].to_vec(),
                sentinel.clone(),
                sentinel[..3].to_vec()
            ),
            "{what}: wrote output"
        );
    }
}

/// One layer's Quest selection of a decode batch: the device's bounds are the CPU's bits (same
/// lane order, no fused multiply-add) and its kept rows the CPU's, for every query dtype, 0-2
/// sink blocks and tied bounds (ties go to the earlier block on both); a row the device check
/// refuses, by its counts or by a block id, fails the call at synchronize with nothing written.
#[test]
#[ignore = "needs an NVIDIA GPU (run with --include-ignored there)"]
fn quest_selection_of_a_batch_matches_cpu_bit_for_bit() {
    let g = gpu("quest_selection_of_a_batch_matches_cpu_bit_for_bit");
    let mut rng = Rng(77);
    let (num_blocks, stride, out_stride) = (300usize, 200usize, 120usize);
    let blocks = [200i32, 3, 57, 120, 1];
    let keep = [32i32, 8, 10, 119, 1];
    let n = blocks.len();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // Spreads: the configured default, Quest's bound, a box shrunk to its centre.
    // Key ranges: one per block, and four (per 4 of the 16 slots).
    for (heads, gqa, dim, qdtype, sinks, spread, ranges) in [
        (2usize, 4usize, 64usize, DType::F32, 1u32, 0.5f32, 1usize),
        (3, 3, 75, DType::Bf16, 0, 1.0, 1),
        (1, 2, 12, DType::F16, 2, 0.0, 1),
        (2, 4, 64, DType::F32, 1, 0.5, 4),
    ] {
        let t = TestCache::new(Layout::Nhd, DType::F32, num_blocks, 16, heads, dim);
        let dev = upload(&g, &t);
        let meta = num_blocks * ranges * heads * dim;
        let (mut lo, mut hi) = random_meta(&mut rng, meta);
        // Blocks 1..100 copy block 0's metadata: their bounds tie exactly in every row.
        let span = ranges * heads * dim;
        for b in 1..100 {
            lo.copy_within(0..span, b * span);
            hi.copy_within(0..span, b * span);
        }
        let mut table = vec![-1i32; n * stride];
        for (r, &nb) in blocks.iter().enumerate() {
            table[r * stride..r * stride + nb as usize].copy_from_slice(&random_row(
                &mut rng,
                num_blocks,
                nb as usize,
            ));
        }
        let nq = n * heads * gqa * dim;
        // The query in its dtype's bits (u16 words for f16/bf16).
        let qf: Vec<f32> = (0..nq).map(|_| rng.unit()).collect();
        let q16: Vec<u16> = qf
            .iter()
            .map(|&x| match qdtype {
                DType::F16 => half::f16::from_f32(x).to_bits(),
                _ => half::bf16::from_f32(x).to_bits(),
            })
            .collect();
        let hq: *const std::ffi::c_void = if qdtype == DType::F32 {
            qf.as_ptr().cast()
        } else {
            q16.as_ptr().cast()
        };
        let qh = (heads * gqa) as u32;
        let rows = QuestRowsDesc {
            table: table.as_ptr(),
            num_rows: n as u32,
            stride: stride as u32,
            blocks: blocks.as_ptr(),
            keep: keep.as_ptr(),
            sink_blocks: sinks,
            spread,
        };
        let (mut ws, mut out) = (vec![0f32; n * stride], vec![0i32; n * out_stride]);
        let s = unsafe {
            kvs_quest_select(
                g.cpu,
                &t.desc,
                &rows,
                hq,
                qdtype as u32,
                qh,
                lo.as_ptr(),
                hi.as_ptr(),
                meta,
                ws.as_mut_ptr(),
                ws.len(),
                out.as_mut_ptr(),
                out.len(),
                out_stride as u32,
                -1,
            )
        };
        assert_eq!(s, Status::Ok, "{}", last_error());
        let (dtable, dblocks, dkeep) = (g.up(&table), g.up(&blocks), g.up(&keep));
        let (dqf, dq16, dlo, dhi) = (g.up(&qf), g.up(&q16), g.up(&lo), g.up(&hi));
        let dq = if qdtype == DType::F32 {
            dptr(&dqf, &g.stream)
        } else {
            dptr(&dq16, &g.stream)
        };
        let dws: CudaSlice<f32> = g.stream.alloc_zeros(n * stride).unwrap();
        let call = |rows: &QuestRowsDesc, out: &CudaSlice<i32>| unsafe {
            kvs_quest_select(
                g.kernels,
                &dev.desc,
                rows,
                dq as *const _,
                qdtype as u32,
                qh,
                dptr(&dlo, &g.stream) as *const f32,
                dptr(&dhi, &g.stream) as *const f32,
                meta,
                dptr(&dws, &g.stream) as *mut f32,
                n * stride,
                dptr(out, &g.stream) as *mut i32,
                n * out_stride,
                out_stride as u32,
                -1,
            )
        };
        let drows = QuestRowsDesc {
            table: dptr(&dtable, &g.stream) as *const i32,
            blocks: dptr(&dblocks, &g.stream) as *const i32,
            keep: dptr(&dkeep, &g.stream) as *const i32,
            ..rows
        };
        let dout: CudaSlice<i32> = g.stream.alloc_zeros(n * out_stride).unwrap();
        assert_eq!(call(&drows, &dout), Status::Ok, "{}", last_error());
        assert_eq!(bits(&g.down(&dws)), bits(&ws), "bounds, {qdtype:?}");
        assert_eq!(g.down(&dout), out, "kept rows, {qdtype:?}, {sinks} sinks");

        // Row 1 claims more blocks than the stride, then row 2 holds an id past the cache:
        // each refused on the device, the workspace and the output untouched.
        let bad_blocks = g.up(&[200i32, stride as i32 + 1, 57, 120, 1]);
        let mut bad = table.clone();
        bad[2 * stride + 5] = num_blocks as i32;
        let bad_table = g.up(&bad);
        let cases = [
            (
                QuestRowsDesc {
                    blocks: dptr(&bad_blocks, &g.stream) as *const i32,
                    ..drows
                },
                "are not in 1..=stride",
                1,
            ),
            (
                QuestRowsDesc {
                    table: dptr(&bad_table, &g.stream) as *const i32,
                    ..drows
                },
                "a block id of a Quest row is out of range",
                2,
            ),
        ];
        for (rows, what, row) in cases {
            let fresh: CudaSlice<i32> = g.stream.alloc_zeros(n * out_stride).unwrap();
            let ws_before = g.down(&dws);
            assert_eq!(
                call(&rows, &fresh),
                Status::Ok,
                "enqueued; the device finds the bad row"
            );
            assert_eq!(
                unsafe { kvs_kernels_synchronize(g.kernels) },
                Status::InvalidArgument
            );
            let e = last_error();
            assert!(
                e.contains(what) && e.contains(&format!("(row {row})")),
                "{e}"
            );
            assert!(
                g.down(&fresh).iter().all(|&x| x == 0),
                "out written although the row was refused"
            );
            assert_eq!(
                bits(&g.down(&dws)),
                bits(&ws_before),
                "workspace written by a refused call"
            );
        }
    }
}
