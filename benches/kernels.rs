//! Kernel benchmarks, each against the physical bound it is held to, measured in the same run:
//! - compaction bytes/s against `memcpy` of the same bytes;
//! - token selection against one plain read (sum) of the same scores;
//! - SnapKV scoring against the same number of FLOPs as bare contiguous dot products;
//! - Quest selection of a decode batch (8 rows) against one SIMD read of the metadata it reads,
//!   and against scoring and selecting row by row (`quest_bound` + `select_blocks_row`).
//!
//! Shapes follow a Llama-3-8B layer (8 KV heads, head_dim 128, 32 query heads); a sequence
//! costs 32 such layers. After criterion's own report, a table prints kernel/bound ratios.
//! Run: `cargo bench --bench kernels` (set KVSIEVE_BENCH_FULL=1 for 32k-token sequences).

use criterion::{black_box, criterion_group, BenchmarkId, Criterion, Throughput};
use kvsieve::config::Pooling;
use kvsieve::kernels::compact::{compact, Compaction};
use kvsieve::kernels::score::quest::{quest_bound, quest_select, QuestRows};
use kvsieve::kernels::score::snapkv::{score_snapkv, SnapKv};
use kvsieve::kernels::select::{select_blocks_row, select_tokens, BlockSelect, TokenSelect};
use kvsieve::kernels::{DType, KvCache, KvCacheDesc, Layout};
use std::ffi::c_void;
use std::path::PathBuf;
use std::time::Duration;

const HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const Q_HEADS: usize = 32;
const KEEP: f64 = 0.25;

fn lengths() -> Vec<usize> {
    if std::env::var_os("KVSIEVE_BENCH_FULL").is_some() {
        vec![4096, 16384, 32768]
    } else {
        vec![4096, 16384]
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// A bf16 NHD layer cache holding one sequence of `len` tokens in a shuffled row.
struct Layer {
    k: Vec<u16>,
    v: Vec<u16>,
    row: Vec<i32>,
    desc: KvCacheDesc,
}

fn layer(len: usize, block_size: usize, layout: Layout, rng: &mut Rng) -> Layer {
    let blocks = len.div_ceil(block_size);
    let n = blocks * block_size * HEADS * HEAD_DIM;
    let mut l = Layer {
        k: (0..n)
            .map(|_| half::bf16::from_f32(rng.unit()).to_bits())
            .collect(),
        v: (0..n)
            .map(|_| half::bf16::from_f32(rng.unit()).to_bits())
            .collect(),
        row: (0..blocks as i32).collect(),
        desc: KvCacheDesc {
            k: std::ptr::null_mut(),
            v: std::ptr::null_mut(),
            dtype: DType::Bf16 as u32,
            layout: layout as u32,
            device: 0,
            num_blocks: blocks as u32,
            block_size: block_size as u32,
            num_kv_heads: HEADS as u32,
            head_dim: HEAD_DIM as u32,
            block_stride: 0,
            token_stride: 0,
            head_stride: 0,
        },
    };
    for i in (1..blocks).rev() {
        l.row.swap(i, rng.next() as usize % (i + 1));
    }
    l.desc.k = l.k.as_mut_ptr() as *mut c_void;
    l.desc.v = l.v.as_mut_ptr() as *mut c_void;
    l
}

/// Per head, a sorted random 25% of the positions (what SnapKV selection produces).
fn keep_lists(len: usize, rng: &mut Rng) -> (Vec<u32>, usize) {
    let k = (len as f64 * KEEP) as usize;
    let mut out = Vec::with_capacity(HEADS * k);
    for _ in 0..HEADS {
        let mut pos: Vec<u32> = (0..len as u32).collect();
        for i in (1..len).rev() {
            pos.swap(i, rng.next() as usize % (i + 1));
        }
        pos.truncate(k);
        pos.sort_unstable();
        out.extend(pos);
    }
    (out, k)
}

fn quick(c: &mut Criterion) {
    // Long enough for stable means on 2 cores, short enough for the suite of shapes.
    *c = std::mem::take(c)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

fn bench_compact(c: &mut Criterion) {
    quick(c);
    let mut rng = Rng(0x5eed);
    for &bs in &[16usize, 128] {
        for layout in [Layout::Nhd, Layout::Hnd] {
            for &len in &lengths() {
                let l = layer(len, bs, layout, &mut rng);
                let cache = KvCache::new(&l.desc).unwrap();
                let (keep, k) = keep_lists(len, &mut rng);
                let bytes = 2 * HEADS * k * HEAD_DIM * 2; // K and V, bf16
                let mut g =
                    c.benchmark_group(format!("compact_{layout:?}_b{bs}_{len}").to_lowercase());
                g.throughput(Throughput::Bytes(bytes as u64));
                g.bench_function("kernel", |b| {
                    b.iter(|| {
                        let req = Compaction {
                            row: &l.row,
                            cached_len: len,
                            protected_len: 0,
                            keep: &keep,
                            selected: k,
                            dest: None,
                        };
                        black_box(unsafe { compact(&cache, &req) }.unwrap())
                    })
                });
                let src = vec![1u8; bytes];
                let mut dst = vec![0u8; bytes];
                g.bench_function("bound", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
                g.finish();
            }
        }
    }
}

fn bench_select(c: &mut Criterion) {
    quick(c);
    let mut rng = Rng(0xfeed);
    for &len in &lengths() {
        let scores: Vec<f32> = (0..HEADS * len).map(|_| rng.unit()).collect();
        let sel = TokenSelect {
            cached_len: len,
            protected_len: 0,
            sink_tokens: 4,
            protected_tail: 64,
            selected: (len as f64 * KEEP) as usize,
        };
        let mut out = vec![0u32; HEADS * sel.selected];
        let mut g = c.benchmark_group(format!("select_{len}"));
        g.throughput(Throughput::Bytes((scores.len() * 4) as u64));
        g.bench_function("kernel", |b| {
            b.iter(|| select_tokens(Some(black_box(&scores)), HEADS, &sel, &mut out).unwrap())
        });
        g.bench_function("bound", |b| {
            b.iter(|| black_box(&scores).iter().sum::<f32>())
        });
        // For reference: the same read with 8 independent accumulators (what SIMD reaches).
        g.bench_function("read_simd", |b| {
            b.iter(|| {
                black_box(&scores)
                    .chunks_exact(8)
                    .fold([0f32; 8], |mut a, c| {
                        for i in 0..8 {
                            a[i] += c[i];
                        }
                        a
                    })
            })
        });
        g.finish();
    }
}

/// One layer's Quest selection for 8 decode rows of `len` tokens (blocks of 32, 1,024 tokens
/// kept: 32 blocks), each row's blocks distinct and shuffled over the pool.
fn bench_quest(c: &mut Criterion) {
    quick(c);
    const ROWS: usize = 8;
    const BS: usize = 32;
    const KEEP_BLOCKS: usize = 1024 / BS;
    let mut rng = Rng(0x9e57);
    for &len in &lengths() {
        let nb = len / BS;
        let num_blocks = ROWS * nb;
        // Only the metadata is read; K and V are zeroed (calloc: their pages are never touched).
        let mut k = vec![0f32; num_blocks * BS * HEADS * HEAD_DIM];
        let mut v = vec![0f32; num_blocks * BS * HEADS * HEAD_DIM];
        let cache = KvCache::new(&KvCacheDesc {
            k: k.as_mut_ptr() as *mut c_void,
            v: v.as_mut_ptr() as *mut c_void,
            dtype: DType::F32 as u32,
            layout: Layout::Nhd as u32,
            device: 0,
            num_blocks: num_blocks as u32,
            block_size: BS as u32,
            num_kv_heads: HEADS as u32,
            head_dim: HEAD_DIM as u32,
            block_stride: 0,
            token_stride: 0,
            head_stride: 0,
        })
        .unwrap();
        quest_group(c, &cache, len, nb, KEEP_BLOCKS, ROWS, &mut rng);
    }
}

fn quest_group(
    c: &mut Criterion,
    cache: &KvCache,
    len: usize,
    nb: usize,
    keep_blocks: usize,
    rows: usize,
    rng: &mut Rng,
) {
    let meta = cache.num_blocks * HEADS * HEAD_DIM;
    let (lo, hi): (Vec<f32>, Vec<f32>) = (0..meta)
        .map(|_| {
            let (a, b) = (rng.unit(), rng.unit());
            (a.min(b), a.max(b))
        })
        .unzip();
    let mut table: Vec<i32> = (0..(rows * nb) as i32).collect();
    for i in (1..table.len()).rev() {
        table.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let (blocks, keep) = (vec![nb as i32; rows], vec![keep_blocks as i32; rows]);
    let query: Vec<f32> = (0..rows * Q_HEADS * HEAD_DIM).map(|_| rng.unit()).collect();
    let sel = QuestRows {
        table: &table,
        stride: nb,
        blocks: &blocks,
        keep: &keep,
        sink_blocks: 1,
        spread: 0.5,
    };
    let mut ws = vec![0f32; rows * nb];
    let mut out = vec![0i32; rows * keep_blocks];
    let mut g = c.benchmark_group(format!("quest_{len}"));
    g.throughput(Throughput::Bytes(
        (2 * rows * nb * HEADS * HEAD_DIM * 4) as u64,
    ));
    g.bench_function("kernel", |b| {
        b.iter(|| {
            quest_select(
                cache,
                &sel,
                black_box(&query),
                Q_HEADS,
                &lo,
                &hi,
                &mut ws,
                &mut out,
                keep_blocks,
                0,
            )
            .unwrap()
        })
    });
    let per_row = BlockSelect {
        keep_blocks,
        sink_blocks: 1,
        recent_blocks: 1,
    };
    g.bench_function("scalar", |b| {
        b.iter(|| {
            for r in 0..rows {
                let row = &table[r * nb..(r + 1) * nb];
                let q = &query[r * Q_HEADS * HEAD_DIM..(r + 1) * Q_HEADS * HEAD_DIM];
                let mut scores = vec![0f32; nb];
                quest_bound(cache, row, black_box(q), Q_HEADS, &lo, &hi, &mut scores).unwrap();
                select_blocks_row(
                    row,
                    &scores,
                    &per_row,
                    0,
                    &mut out[r * keep_blocks..(r + 1) * keep_blocks],
                )
                .unwrap();
            }
        })
    });
    // The bound: one SIMD read (8 accumulators) of the min and max rows the kernel reads.
    let span = HEADS * HEAD_DIM;
    g.bench_function("bound", |b| {
        b.iter(|| {
            let mut a = [0f32; 8];
            for &blk in black_box(&table) {
                let at = blk as usize * span;
                for m in [&lo[at..at + span], &hi[at..at + span]] {
                    for c in m.chunks_exact(8) {
                        for i in 0..8 {
                            a[i] += c[i];
                        }
                    }
                }
            }
            a
        })
    });
    g.finish();
}

fn bench_snapkv(c: &mut Criterion) {
    quick(c);
    let mut rng = Rng(0xabc);
    let window = 32;
    for &len in &[2048usize, 4096] {
        let l = layer(len, 16, Layout::Nhd, &mut rng);
        let cache = KvCache::new(&l.desc).unwrap();
        let q: Vec<f32> = (0..window * Q_HEADS * HEAD_DIM)
            .map(|_| rng.unit())
            .collect();
        let p = SnapKv {
            cached_len: len,
            window,
            num_q_heads: Q_HEADS,
            pool_kernel: 31, // the default
            pool: Pooling::Max,
        };
        let mut out = vec![0f32; HEADS * len];
        // QK^T over the causal window: ~window * q_heads * len dot products of head_dim.
        let flops = 2 * window * Q_HEADS * len * HEAD_DIM;
        let mut g = c.benchmark_group(format!("snapkv_{len}"));
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(BenchmarkId::new("kernel", "flops"), |b| {
            b.iter(|| unsafe { score_snapkv(&cache, &l.row, &q, &p, &mut out) }.unwrap())
        });
        // The bound: the same FLOPs as bare dot products over contiguous f32 keys, on as many
        // threads as the kernel uses.
        let keys: Vec<f32> = (0..len * HEAD_DIM).map(|_| rng.unit()).collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(HEADS);
        g.bench_function(BenchmarkId::new("bound", "flops"), |b| {
            b.iter(|| {
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let (keys, q) = (&keys, &q);
                        s.spawn(move || {
                            let mut acc = 0f32;
                            let per_head = window * Q_HEADS / HEADS; // window queries of the GQA group
                            for h in (t..HEADS).step_by(threads) {
                                for i in 0..per_head {
                                    let qv = &q[(h * per_head + i) * HEAD_DIM..][..HEAD_DIM];
                                    for kv in keys.chunks_exact(HEAD_DIM) {
                                        acc += dot(qv, kv);
                                    }
                                }
                            }
                            black_box(acc)
                        });
                    }
                })
            })
        });
        g.finish();
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum()
}

/// criterion's mean estimate (ns) of `group/bench`, from its JSON report.
fn mean_ns(group: &str, bench: &str) -> Option<f64> {
    let root = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let text = std::fs::read_to_string(
        root.join("criterion")
            .join(group)
            .join(bench)
            .join("new/estimates.json"),
    )
    .ok()?;
    let at = text.find("\"mean\"")?;
    let rest = &text[at..];
    let p = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    rest[p..].split([',', '}']).next()?.trim().parse().ok()
}

fn summary() {
    println!("\nkernel / bound (same bytes or FLOPs, same run; >1 means faster than the bound):");
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "group", "kernel", "bound", "ratio"
    );
    let mut groups = Vec::new();
    for &bs in &[16usize, 128] {
        for layout in ["nhd", "hnd"] {
            for &len in &lengths() {
                groups.push((
                    format!("compact_{layout}_b{bs}_{len}"),
                    "kernel".to_string(),
                    "bound".to_string(),
                ));
            }
        }
    }
    for &len in &lengths() {
        groups.push((format!("select_{len}"), "kernel".into(), "bound".into()));
        groups.push((format!("select_{len}"), "kernel".into(), "read_simd".into()));
    }
    for &len in &lengths() {
        groups.push((format!("quest_{len}"), "kernel".into(), "bound".into()));
        groups.push((format!("quest_{len}"), "kernel".into(), "scalar".into()));
    }
    for len in [2048, 4096] {
        groups.push((
            format!("snapkv_{len}"),
            "kernel/flops".into(),
            "bound/flops".into(),
        ));
    }
    for (g, k, b) in groups {
        if let (Some(tk), Some(tb)) = (mean_ns(&g, &k), mean_ns(&g, &b)) {
            let name = if b == "read_simd" {
                format!("{g} (vs SIMD read)")
            } else if b == "scalar" {
                format!("{g} (vs row by row)")
            } else {
                g
            };
            println!(
                "{name:<28} {:>10.1}us {:>10.1}us {:>8.3}",
                tk / 1e3,
                tb / 1e3,
                tb / tk
            );
        }
    }
}

criterion_group!(
    benches,
    bench_compact,
    bench_select,
    bench_quest,
    bench_snapkv
);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
