//! The kernel entry points across the C ABI: they work on caller-owned buffers, and every class
//! of bad input is refused with a status and a message before any byte of the cache moves.

mod common;

use common::{random_row, Rng, TestCache};
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
    let (s, moved, released) = f.compact(seq, &keep, sel, 8);
    assert_eq!(s, Status::Ok, "{}", last_error());
    assert!(moved);
    // 16 protected + 40 kept = 56 tokens = 4 blocks; blocks 4..7 of the row go back.
    assert_eq!(released, f.row[4..7].to_vec());
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
