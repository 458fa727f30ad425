//! The kernel entry points across the C ABI: they work on caller-owned buffers, and every class
//! of bad input is refused with a status and a message before any byte of the cache moves.

mod common;

use common::{random_meta, random_row, Rng, TestCache};
use kvsieve::ffi::*;
use kvsieve::kernels::{DType, Layout};
use kvsieve::Status;
use std::ffi::CStr;
use std::ptr::{null, null_mut};

fn last_error() -> String {
    unsafe { CStr::from_ptr(kvs_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn cpu() -> *mut KvsKernels {
    let mut k = null_mut();
    assert_eq!(unsafe { kvs_kernels_new_cpu(&mut k) }, Status::Ok);
    k
}

struct Fixture {
    t: TestCache,
    row: Vec<i32>,
    keep: Vec<u32>,
    selected: u32,
}

/// NHD f32, 2 heads, 100 cached tokens in 7 blocks of 16, 3 guard blocks.
fn fixture() -> Fixture {
    let mut rng = Rng(3);
    let mut t = TestCache::new(Layout::Nhd, DType::F32, 10, 16, 2, 8);
    t.fill_bits(&mut rng);
    let row = random_row(&mut rng, 10, 7);
    let selected = 40u32;
    let mut keep = Vec::new();
    for h in 0..2u32 {
        keep.extend((0..selected).map(|j| j * 2 + h + 16));
    }
    Fixture {
        t,
        row,
        keep,
        selected,
    }
}

impl Fixture {
    fn seq(&self) -> SequenceDesc {
        SequenceDesc {
            row: self.row.as_ptr(),
            row_len: self.row.len() as u32,
            cached_len: 100,
            protected_len: 16,
        }
    }

    /// Run kvs_compact and return (status, whether any cache byte changed).
    fn compact(
        &mut self,
        seq: SequenceDesc,
        keep: &[u32],
        selected: u32,
        cap: usize,
    ) -> (Status, bool, Vec<i32>) {
        let k = cpu();
        let before = (self.t.k.clone(), self.t.v.clone());
        let mut released = vec![-1i32; cap.max(1)];
        let mut n = 0u32;
        let s = unsafe {
            kvs_compact(
                k,
                &self.t.desc,
                &seq,
                keep.as_ptr(),
                keep.len(),
                selected,
                released.as_mut_ptr(),
                cap,
                &mut n,
            )
        };
        unsafe { kvs_kernels_free(k) };
        let moved = before != (self.t.k.clone(), self.t.v.clone());
        released.truncate(n as usize);
        (s, moved, released)
    }
}

#[test]
fn compaction_through_the_abi_releases_the_tail_blocks() {
    let mut f = fixture();
    let (seq, keep, sel) = (f.seq(), f.keep.clone(), f.selected);
    let k = cpu();
    let before = (f.t.k.clone(), f.t.v.clone());
    let s = unsafe { kvs_compact_check(k, &f.t.desc, &seq, keep.as_ptr(), keep.len(), sel, 8) };
    unsafe { kvs_kernels_free(k) };
    assert_eq!(s, Status::Ok, "{}", last_error());
    assert!(
        (f.t.k.clone(), f.t.v.clone()) == before,
        "kvs_compact_check moved data"
    );
    let (s, moved, released) = f.compact(seq, &keep, sel, 8);
    assert_eq!(s, Status::Ok, "{}", last_error());
    assert!(moved);
    // 16 protected + 40 kept = 56 tokens = 4 blocks; blocks 4..7 of the row go back.
    assert_eq!(released, f.row[4..7].to_vec());
}

/// Out of place through the ABI: with protected_len 16, the 40 kept tokens of each head land in
/// the 3 free blocks of the cache (guards of the fixture), the row keeps every byte, and bad
/// destinations (in the row, repeated, out of range, too few, NULL) are refused with nothing
/// written, by the check and the call alike.
#[test]
fn out_of_place_compaction_through_the_abi_writes_only_dest() {
    let mut f = fixture();
    let seq = f.seq();
    let free: Vec<i32> = (0..10).filter(|b| !f.row.contains(b)).collect();
    assert_eq!(free.len(), 3);
    let k = cpu();
    let into = |f: &mut Fixture, dest: &[i32], n: u32, check: bool| -> (Status, bool) {
        let before = (f.t.k.clone(), f.t.v.clone());
        let (keep, sel) = (f.keep.clone(), f.selected);
        let d = if dest.is_empty() {
            null()
        } else {
            dest.as_ptr()
        };
        let s = unsafe {
            if check {
                kvs_compact_into_check(k, &f.t.desc, &seq, keep.as_ptr(), keep.len(), sel, d, n)
            } else {
                kvs_compact_into(k, &f.t.desc, &seq, keep.as_ptr(), keep.len(), sel, d, n)
            }
        };
        (s, before != (f.t.k.clone(), f.t.v.clone()))
    };
    let (r1, r0) = (f.row[1], f.row[0]);
    let bad: Vec<(&str, Vec<i32>, u32, &str)> = vec![
        (
            "a row block",
            vec![free[0], r1, free[2]],
            3,
            "in the source row",
        ),
        (
            "the protected block",
            vec![r0, free[1], free[2]],
            3,
            "in the source row",
        ),
        (
            "a repeat",
            vec![free[0], free[1], free[0]],
            3,
            "twice in dest",
        ),
        (
            "out of range",
            vec![free[0], 10, free[2]],
            3,
            "not a block id",
        ),
        (
            "too few",
            vec![free[0], free[1]],
            2,
            "need ceil(selected / block_size) = 3",
        ),
        ("NULL", vec![], 3, "dest"),
    ];
    for (what, dest, n, msg) in &bad {
        for check in [true, false] {
            let (s, moved) = into(&mut f, dest, *n, check);
            assert_eq!(
                s,
                Status::InvalidArgument,
                "{what} (check {check}): {}",
                last_error()
            );
            assert!(last_error().contains(msg), "{what}: {}", last_error());
            assert!(!moved, "{what}: bytes moved on a refused call");
        }
    }
    let (s, moved) = into(&mut f, &free, 3, true);
    assert_eq!((s, moved), (Status::Ok, false), "{}", last_error());
    let before = f.t.k.clone();
    let (s, moved) = into(&mut f, &free, 3, false);
    assert_eq!((s, moved), (Status::Ok, true), "{}", last_error());
    unsafe { kvs_kernels_free(k) };
    // Row blocks unchanged; dest holds the kept tokens, slot by slot.
    let c = f.t.cache();
    let word = |b: usize, h: usize, slot: usize, d: usize| c.k_offset(b, h, slot, d);
    for &b in &f.row {
        for h in 0..2 {
            for slot in 0..16 {
                for d in 0..8 {
                    let o = word(b as usize, h, slot, d);
                    assert_eq!(f.t.k[o], before[o], "row block {b} changed");
                }
            }
        }
    }
    for h in 0..2 {
        for j in 0..f.selected as usize {
            let src = f.keep[h * f.selected as usize + j] as usize;
            let (sb, ss) = (f.row[src / 16] as usize, src % 16);
            let (db, ds) = (free[j / 16] as usize, j % 16);
            for d in 0..8 {
                assert_eq!(
                    f.t.k[word(db, h, ds, d)],
                    before[word(sb, h, ss, d)],
                    "head {h} token {j}"
                );
            }
        }
    }
}

/// A named bad input: how to spoil the fixture, the status and a piece of the message expected.
type Case = (
    String,
    Box<dyn Fn(&mut Fixture) -> (SequenceDesc, Vec<u32>, u32, usize)>,
    Status,
    &'static str,
);

#[test]
fn bad_compactions_are_refused_before_any_byte_moves() {
    let f0 = fixture();
    let mut cases: Vec<Case> = Vec::new();
    cases.push((
        "duplicate block id".into(),
        Box::new(|f: &mut Fixture| {
            f.row[3] = f.row[1];
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "appears twice",
    ));
    cases.push((
        "block id out of range".into(),
        Box::new(|f: &mut Fixture| {
            f.row[2] = 10;
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "row[2] = 10",
    ));
    cases.push((
        "negative block id".into(),
        Box::new(|f: &mut Fixture| {
            f.row[0] = -3;
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "row[0] = -3",
    ));
    cases.push((
        "keep not sorted".into(),
        Box::new(|f: &mut Fixture| {
            f.keep.swap(44, 45);
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "keep[1] is not strictly ascending",
    ));
    cases.push((
        "keep not unique".into(),
        Box::new(|f: &mut Fixture| {
            f.keep[5] = f.keep[4];
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "not strictly ascending",
    ));
    cases.push((
        "keep inside the prefix".into(),
        Box::new(|f: &mut Fixture| {
            f.keep[0] = 3;
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "outside the selectable range [16, 100)",
    ));
    cases.push((
        "keep past the cache".into(),
        Box::new(|f: &mut Fixture| {
            f.keep[79] = 100;
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "keep[1][39] = 100",
    ));
    cases.push((
        "keep length mismatch".into(),
        Box::new(|f: &mut Fixture| (f.seq(), f.keep[..79].to_vec(), f.selected, 8)),
        Status::InvalidArgument,
        "keep has 79 entries",
    ));
    cases.push((
        "row too short".into(),
        Box::new(|f: &mut Fixture| {
            let mut s = f.seq();
            s.row_len = 6;
            (s, f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "needs 7",
    ));
    cases.push((
        "prefix not whole blocks".into(),
        Box::new(|f: &mut Fixture| {
            let mut s = f.seq();
            s.protected_len = 10;
            (s, f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "protected_len = 10",
    ));
    cases.push((
        "released buffer too small".into(),
        Box::new(|f: &mut Fixture| (f.seq(), f.keep.clone(), f.selected, 2)),
        Status::BufferTooSmall,
        "releases 3",
    ));
    cases.push((
        "AMX packing with f32".into(),
        Box::new(|f: &mut Fixture| {
            f.t.desc.layout = Layout::VllmCpuAmx as u32;
            f.t.desc.v = null_mut();
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::Unsupported,
        "never probed",
    ));
    cases.push((
        "unknown dtype".into(),
        Box::new(|f: &mut Fixture| {
            f.t.desc.dtype = 5;
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "cache.dtype = 5",
    ));
    cases.push((
        "device memory on the CPU backend".into(),
        Box::new(|f: &mut Fixture| {
            f.t.desc.device = 1;
            (f.seq(), f.keep.clone(), f.selected, 8)
        }),
        Status::Unsupported,
        "cache.device is Cuda",
    ));
    cases.push((
        "NULL row".into(),
        Box::new(|f: &mut Fixture| {
            let mut s = f.seq();
            s.row = null();
            (s, f.keep.clone(), f.selected, 8)
        }),
        Status::InvalidArgument,
        "seq.row is NULL",
    ));
    for (name, make, status, msg) in cases {
        let mut f = fixture();
        assert_eq!(f.t.k, f0.t.k);
        let (seq, keep, sel, cap) = make(&mut f);
        // kvs_compact_check refuses exactly what kvs_compact refuses.
        let k = cpu();
        let checked =
            unsafe { kvs_compact_check(k, &f.t.desc, &seq, keep.as_ptr(), keep.len(), sel, cap) };
        unsafe { kvs_kernels_free(k) };
        assert_eq!(checked, status, "{name} (check): {}", last_error());
        assert!(
            last_error().contains(msg),
            "{name} (check): {}",
            last_error()
        );
        let (s, moved, _) = f.compact(seq, &keep, sel, cap);
        assert_eq!(s, status, "{name}: {}", last_error());
        assert!(
            last_error().contains(msg),
            "{name}: message {:?} should mention {msg:?}",
            last_error()
        );
        assert!(
            !moved,
            "{name}: cache bytes moved although the call was refused"
        );
    }
}

#[test]
fn scoring_and_selection_through_the_abi() {
    let f = fixture();
    let k = cpu();
    let seq = f.seq();
    let mut scores = vec![0f32; 2 * 100];
    assert_eq!(
        unsafe { kvs_score_knorm(k, &f.t.desc, &seq, scores.as_mut_ptr(), scores.len()) },
        Status::Ok,
        "{}",
        last_error()
    );
    let mut values = TestCache::new(Layout::Nhd, DType::F32, 10, 16, 2, 8);
    values.fill_values(&mut Rng(5));
    let q = vec![half::bf16::from_f32(0.5); 4 * 4 * 8];
    let args = SnapKvArgs {
        queries: q.as_ptr().cast(),
        queries_dtype: DType::Bf16 as u32,
        window: 4,
        num_q_heads: 4,
        pool_kernel: 3,
        pool: 1,
    };
    assert_eq!(
        unsafe {
            kvs_score_snapkv(
                k,
                &values.desc,
                &seq,
                &args,
                scores.as_mut_ptr(),
                scores.len(),
            )
        },
        Status::Ok,
        "{}",
        last_error()
    );
    assert!(scores.iter().all(|x| x.is_finite() && *x >= 0.0));
    let bad = SnapKvArgs {
        num_q_heads: 3,
        ..args
    };
    assert_eq!(
        unsafe {
            kvs_score_snapkv(
                k,
                &values.desc,
                &seq,
                &bad,
                scores.as_mut_ptr(),
                scores.len(),
            )
        },
        Status::InvalidArgument
    );
    assert!(last_error().contains("num_q_heads = 3"), "{}", last_error());
    assert_eq!(
        unsafe { kvs_score_snapkv(k, &values.desc, &seq, &args, scores.as_mut_ptr(), 199) },
        Status::InvalidArgument
    );
    assert!(last_error().contains("scores has 199"));

    let sel = TokenSelectArgs {
        cached_len: 100,
        protected_len: 16,
        sink_tokens: 4,
        protected_tail: 8,
        selected: 40,
    };
    let mut keep = vec![0u32; 80];
    assert_eq!(
        unsafe {
            kvs_select_tokens(
                k,
                scores.as_ptr(),
                scores.len(),
                2,
                &sel,
                keep.as_mut_ptr(),
                keep.len(),
            )
        },
        Status::Ok
    );
    assert!(keep[..40].windows(2).all(|w| w[0] < w[1]) && keep[0] >= 16 && keep[39] == 99);
    // Streaming: NULL scores keep the most recent.
    assert_eq!(
        unsafe { kvs_select_tokens(k, null(), 0, 2, &sel, keep.as_mut_ptr(), keep.len()) },
        Status::Ok
    );
    assert_eq!(keep[0], 60);
    let few = TokenSelectArgs { selected: 5, ..sel };
    assert_eq!(
        unsafe { kvs_select_tokens(k, null(), 0, 2, &few, keep.as_mut_ptr(), 10) },
        Status::InvalidArgument
    );
    assert!(
        last_error().contains("fewer than the 8"),
        "{}",
        last_error()
    );

    let mut row_out = vec![0i32; 7];
    let mut kept = 0u32;
    let bscores = [0.0f32, 5.0, 1.0, 4.0, 0.0, 0.0, 0.0];
    let bsel = BlockSelectArgs {
        keep_blocks: 4,
        sink_blocks: 1,
        recent_blocks: 1,
    };
    assert_eq!(
        unsafe {
            kvs_select_blocks_row(
                k,
                f.row.as_ptr(),
                7,
                bscores.as_ptr(),
                &bsel,
                -1,
                row_out.as_mut_ptr(),
                7,
                &mut kept,
            )
        },
        Status::Ok
    );
    assert_eq!(kept, 4);
    assert_eq!(
        row_out,
        vec![f.row[0], f.row[1], f.row[3], f.row[6], -1, -1, -1]
    );
    let zero_recent = BlockSelectArgs {
        recent_blocks: 0,
        ..bsel
    };
    assert_eq!(
        unsafe {
            kvs_select_blocks_row(
                k,
                f.row.as_ptr(),
                7,
                bscores.as_ptr(),
                &zero_recent,
                -1,
                row_out.as_mut_ptr(),
                7,
                &mut kept,
            )
        },
        Status::InvalidArgument
    );
    unsafe { kvs_kernels_free(k) };
}

#[test]
fn cuda_backend_reports_its_absence() {
    let mut k = null_mut();
    let s = unsafe { kvs_kernels_new_cuda(0, null_mut(), &mut k) };
    assert_eq!(
        k.is_null(),
        s != Status::Ok,
        "out is written exactly on success"
    );
    if cfg!(feature = "cuda") {
        assert!(
            matches!(s, Status::Ok | Status::NoCudaDriver | Status::NoDevice),
            "{s:?}: {}",
            last_error()
        );
        unsafe { kvs_kernels_free(k) };
    } else {
        assert_eq!(s, Status::NotCompiled);
        assert!(last_error().contains("--features cuda"));
    }
    let c = cpu();
    let mut dev = 9u32;
    assert_eq!(unsafe { kvs_kernels_device(c, &mut dev) }, Status::Ok);
    assert_eq!(dev, 0);
    unsafe { kvs_kernels_free(c) };
    unsafe { kvs_kernels_free(null_mut()) };
}

/// Overlapping caller buffers are refused with `INVALID_ARGUMENT` naming both, before anything
/// is read or written: out_row over row, released over the row or over the KV tensors, CSR
/// outputs over their inputs, scores over the cache.
#[test]
fn overlapping_buffers_are_refused_before_any_read_or_write() {
    let k = cpu();
    let expect = |s: Status, a: &str, b: &str| {
        assert_eq!(s, Status::InvalidArgument, "{a}/{b}: {}", last_error());
        let m = last_error();
        assert!(
            m.contains(a) && m.contains(b) && m.contains("overlaps"),
            "{m}"
        );
    };

    // kvs_select_blocks_row with out_row == row: the row must come back untouched.
    let mut row = vec![4i32, 2, 9, 7, 1, 0, 3];
    let before = row.clone();
    let bscores = [0.0f32, 5.0, 1.0, 4.0, 0.0, 0.0, 0.0];
    let bsel = BlockSelectArgs {
        keep_blocks: 4,
        sink_blocks: 1,
        recent_blocks: 1,
    };
    let mut kept = 99u32;
    let p = row.as_mut_ptr();
    let s = unsafe { kvs_select_blocks_row(k, p, 7, bscores.as_ptr(), &bsel, -1, p, 7, &mut kept) };
    expect(s, "row", "out_row");
    assert_eq!((row.clone(), kept), (before.clone(), 99));

    // kvs_compact with released inside the row, then inside the K tensor.
    let mut f = fixture();
    let (k_before, v_before, row_before) = (f.t.k.clone(), f.t.v.clone(), f.row.clone());
    let seq = f.seq();
    let mut n = 77u32;
    let s = unsafe {
        kvs_compact(
            k,
            &f.t.desc,
            &seq,
            f.keep.as_ptr(),
            f.keep.len(),
            f.selected,
            f.row.as_mut_ptr().add(2),
            3,
            &mut n,
        )
    };
    expect(s, "seq.row", "released");
    let into_k = f.t.k.as_mut_ptr().wrapping_add(5) as *mut i32;
    let s = unsafe {
        kvs_compact(
            k,
            &f.t.desc,
            &seq,
            f.keep.as_ptr(),
            f.keep.len(),
            f.selected,
            into_k,
            3,
            &mut n,
        )
    };
    expect(s, "cache.k", "released");
    // keep living inside V, which the call rewrites.
    let keep_in_v = f.t.v.as_ptr();
    let s = unsafe {
        kvs_compact(
            k,
            &f.t.desc,
            &seq,
            keep_in_v,
            f.keep.len(),
            f.selected,
            null_mut(),
            0,
            &mut n,
        )
    };
    expect(s, "cache.v", "keep");
    assert_eq!(n, 77, "num_released untouched");
    assert!(
        f.t.k == k_before && f.t.v == v_before && f.row == row_before,
        "nothing moved"
    );

    // Scores written over the K tensor they are computed from.
    let scores_in_k = f.t.k.as_mut_ptr() as *mut f32;
    let s = unsafe { kvs_score_knorm(k, &f.t.desc, &seq, scores_in_k, 200) };
    expect(s, "cache.k", "scores");
    assert!(f.t.k == k_before);

    // kvs_select_tokens writing keep over its scores.
    let mut scores = vec![1f32; 200];
    let sel = TokenSelectArgs {
        cached_len: 100,
        protected_len: 16,
        sink_tokens: 4,
        protected_tail: 8,
        selected: 40,
    };
    let sp = scores.as_mut_ptr();
    let s = unsafe { kvs_select_tokens(k, sp, 200, 2, &sel, sp as *mut u32, 80) };
    expect(s, "scores", "keep");
    assert!(scores.iter().all(|&x| x == 1.0));

    // CSR: out_indices over indices.
    let indptr = [0i32, 4, 7];
    let mut indices = vec![3i32, 1, 2, 0, 6, 5, 4];
    let lpl = [5i32, 3];
    let bs = [1.0f32; 7];
    let mut out_indptr = [0i32; 3];
    let mut out_lpl = [0i32; 2];
    let ip = indices.as_mut_ptr();
    let s = unsafe {
        kvs_select_blocks_csr(
            k,
            indptr.as_ptr(),
            2,
            ip,
            7,
            lpl.as_ptr(),
            bs.as_ptr(),
            &BlockSelectArgs {
                keep_blocks: 2,
                sink_blocks: 1,
                recent_blocks: 1,
            },
            out_indptr.as_mut_ptr(),
            ip,
            7,
            out_lpl.as_mut_ptr(),
        )
    };
    expect(s, "indices", "out_indices");
    assert_eq!(indices, vec![3, 1, 2, 0, 6, 5, 4]);
    unsafe { kvs_kernels_free(k) };
}

/// `kvs_kernels_reserve` takes a cache geometry before the cache exists (only the descriptor is
/// read) and refuses what a later call would refuse: a NULL handle or cache, a cache on another
/// device, a window without query heads, query heads that do not group over the KV heads.
#[test]
fn reserving_scratch_checks_the_geometry_and_reads_no_cache_memory() {
    let k = cpu();
    let t = TestCache::new(Layout::Nhd, DType::Bf16, 4, 16, 2, 64);
    let mut geometry = t.desc;
    // Never dereferenced: the engine reserves before it allocates its KV cache.
    geometry.k = (1usize << 20) as *mut std::ffi::c_void;
    geometry.v = (2usize << 20) as *mut std::ffi::c_void;
    assert_eq!(
        unsafe { kvs_kernels_reserve(k, &geometry, 8192, 32, 6) },
        Status::Ok,
        "{}",
        last_error()
    );
    assert_eq!(
        unsafe { kvs_kernels_reserve(k, &geometry, 8192, 0, 0) },
        Status::Ok
    );
    let refused = |got: Status, status: Status, needle: &str| {
        assert_eq!(got, status, "{needle}");
        assert!(last_error().contains(needle), "{needle}: {}", last_error());
    };
    let bad = Status::InvalidArgument;
    refused(
        unsafe { kvs_kernels_reserve(null(), &geometry, 64, 0, 0) },
        bad,
        "kernels",
    );
    refused(
        unsafe { kvs_kernels_reserve(k, null(), 64, 0, 0) },
        bad,
        "cache",
    );
    refused(
        unsafe { kvs_kernels_reserve(k, &geometry, 64, 32, 0) },
        bad,
        "num_q_heads = 0",
    );
    refused(
        unsafe { kvs_kernels_reserve(k, &geometry, 64, 32, 3) },
        bad,
        "not a multiple of cache.num_kv_heads = 2",
    );
    let mut cuda = geometry;
    cuda.device = DeviceId::Cuda as u32;
    refused(
        unsafe { kvs_kernels_reserve(k, &cuda, 64, 0, 0) },
        Status::Unsupported,
        "cache.device",
    );
    unsafe { kvs_kernels_free(k) };
}

/// Quest selection of a decode batch through the ABI equals the Rust kernel's, and a workspace
/// too small for the table is refused by name with the cache untouched.
#[test]
fn quest_selection_of_a_batch_through_the_abi() {
    use kvsieve::kernels::score::quest::{quest_select, QuestRows};
    let mut rng = Rng(11);
    let t = TestCache::new(Layout::Nhd, DType::F32, 40, 16, 2, 8);
    let meta = 40 * 2 * 8;
    let (lo, hi) = random_meta(&mut rng, meta);
    let stride = 12usize;
    let mut table = random_row(&mut rng, 40, 2 * stride);
    table[stride + 9..].fill(-1); // row 1 has 9 blocks
    let (blocks, keep) = ([12i32, 9], [5i32, 5]);
    let q: Vec<f32> = (0..2 * 4 * 8).map(|_| rng.unit()).collect();
    let desc = QuestRowsDesc {
        table: table.as_ptr(),
        num_rows: 2,
        stride: stride as u32,
        blocks: blocks.as_ptr(),
        keep: keep.as_ptr(),
        sink_blocks: 1,
        spread: 1.0,
    };
    let k = cpu();
    let (mut ws, mut out) = (vec![0f32; 2 * stride], vec![0i32; 2 * 6]);
    let s = unsafe {
        kvs_quest_select(
            k,
            &t.desc,
            &desc,
            q.as_ptr().cast(),
            DType::F32 as u32,
            4,
            lo.as_ptr(),
            hi.as_ptr(),
            meta,
            ws.as_mut_ptr(),
            ws.len(),
            out.as_mut_ptr(),
            out.len(),
            6,
            -1,
        )
    };
    assert_eq!(s, Status::Ok, "{}", last_error());
    let rows = QuestRows {
        table: &table,
        stride,
        blocks: &blocks,
        keep: &keep,
        sink_blocks: 1,
        spread: 1.0,
    };
    let (mut ws2, mut want) = (vec![0f32; 2 * stride], vec![0i32; 2 * 6]);
    quest_select(
        &t.cache(),
        &rows,
        &q,
        4,
        &lo,
        &hi,
        &mut ws2,
        &mut want,
        6,
        -1,
    )
    .unwrap();
    assert_eq!(out, want);
    assert_eq!((out[0], out[4], out[5]), (table[0], table[11], -1));
    out.fill(7);
    let s = unsafe {
        kvs_quest_select(
            k,
            &t.desc,
            &desc,
            q.as_ptr().cast(),
            DType::F32 as u32,
            4,
            lo.as_ptr(),
            hi.as_ptr(),
            meta,
            ws.as_mut_ptr(),
            2 * stride - 1,
            out.as_mut_ptr(),
            out.len(),
            6,
            -1,
        )
    };
    assert_eq!(s, Status::BufferTooSmall);
    assert!(
        last_error().contains("workspace holds 23 scores"),
        "{}",
        last_error()
    );
    assert!(out.iter().all(|&x| x == 7), "out written by a refused call");
    // The metadata itself, for the blocks a step filled, in one call.
    let (mut lo2, mut hi2) = (vec![0f32; meta], vec![0f32; meta]);
    let (ids, fills) = ([4i32, 9], [16i32, 3]);
    let s = unsafe {
        kvs_quest_update_blocks(
            k,
            &t.desc,
            ids.as_ptr(),
            fills.as_ptr(),
            2,
            lo2.as_mut_ptr(),
            hi2.as_mut_ptr(),
            meta,
        )
    };
    assert_eq!(s, Status::Ok, "{}", last_error());
    let (mut lo3, mut hi3) = (vec![0f32; meta], vec![0f32; meta]);
    for (&b, &f) in ids.iter().zip(&fills) {
        let s = unsafe {
            kvs_quest_update_block(
                k,
                &t.desc,
                b as u32,
                f as u32,
                lo3.as_mut_ptr(),
                hi3.as_mut_ptr(),
                meta,
            )
        };
        assert_eq!(s, Status::Ok, "{}", last_error());
    }
    assert_eq!((lo2, hi2), (lo3, hi3));
    unsafe { kvs_kernels_free(k) };
}
