//! The C ABI as a C caller sees it: statuses, messages, NULLs, and out-params left untouched on
//! failure.

use kvsieve::ffi::*;
use kvsieve::plan::{KeepPlan, SequenceLengths};
use kvsieve::Status;
use std::ffi::{CStr, CString};
use std::ptr::{null, null_mut};

fn last_error() -> String {
    unsafe { CStr::from_ptr(kvs_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn config(text: &str) -> *mut KvsConfig {
    let mut out = null_mut();
    let s = unsafe { kvs_config_from_str(text.as_ptr().cast(), text.len(), &mut out) };
    assert_eq!(s, Status::Ok, "{}", last_error());
    assert!(!out.is_null());
    out
}

const SNAP: &str = "[sparsity]\npolicy = \"snapkv\"\nbudget_tokens = 1024\n";

#[test]
fn status_names_cover_every_number() {
    for &s in Status::all() {
        let name = unsafe { CStr::from_ptr(kvs_status_str(s as u32)) }
            .to_str()
            .unwrap();
        assert!(name.starts_with("KVS_STATUS_"), "{name}");
    }
    let unknown = unsafe { CStr::from_ptr(kvs_status_str(9999)) };
    assert_eq!(unknown.to_str().unwrap(), "KVS_STATUS_UNKNOWN");
    assert_eq!(kvs_abi_version(), kvsieve::version::KVS_ABI_VERSION);
}

#[test]
fn config_from_str_checks_its_arguments() {
    let sentinel = std::ptr::dangling_mut::<KvsConfig>();
    let mut out = sentinel;
    let s = unsafe { kvs_config_from_str(null(), 10, &mut out) };
    assert_eq!(s, Status::InvalidArgument);
    assert!(last_error().contains("text is NULL"), "{}", last_error());
    assert_eq!(out, sentinel, "out must be untouched on failure");

    let s = unsafe { kvs_config_from_str(SNAP.as_ptr().cast(), 0, &mut out) };
    assert_eq!(s, Status::InvalidArgument);
    assert!(last_error().contains("len is 0"));

    let s = unsafe { kvs_config_from_str(SNAP.as_ptr().cast(), SNAP.len(), null_mut()) };
    assert_eq!(s, Status::InvalidArgument);
    assert!(last_error().contains("out is NULL"));

    let bad = "[sparsity]\npolicy = \"snapkv\"\nbudget_tokens = -4\n";
    let s = unsafe { kvs_config_from_str(bad.as_ptr().cast(), bad.len(), &mut out) };
    assert_eq!(s, Status::ConfigInvalid);
    assert!(
        last_error()
            .starts_with("kvs_config_from_str: config: sparsity.budget_tokens = -4 (line 3)"),
        "{}",
        last_error()
    );
    assert_eq!(out, sentinel);

    let not_utf8 = b"[sparsity]\npolicy = \"\xff\"\n";
    let s = unsafe { kvs_config_from_str(not_utf8.as_ptr().cast(), not_utf8.len(), &mut out) };
    assert_eq!(s, Status::ConfigParse);
    assert!(last_error().contains("UTF-8"));
    // Only `len` bytes are read: a prefix of valid text parses even without a NUL.
    let padded = format!("{SNAP}garbage that is not TOML");
    let mut ok = null_mut();
    let s = unsafe { kvs_config_from_str(padded.as_ptr().cast(), SNAP.len(), &mut ok) };
    assert_eq!(s, Status::Ok);
    unsafe { kvs_config_free(ok) };
}

#[test]
fn config_from_file_reports_io_and_names_the_path() {
    let mut out = null_mut();
    let missing = CString::new("/nonexistent/kvsieve.toml").unwrap();
    let s = unsafe { kvs_config_from_file(missing.as_ptr(), &mut out) };
    assert_eq!(s, Status::Io);
    assert!(last_error().contains("/nonexistent/kvsieve.toml"));
    assert!(out.is_null());

    let dir = std::env::temp_dir().join(format!("kvsieve-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[sparsity]\npolicy = \"snapkv\"\nbudget_ratio = 2.0\n",
    )
    .unwrap();
    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    let s = unsafe { kvs_config_from_file(c_path.as_ptr(), &mut out) };
    assert_eq!(s, Status::ConfigInvalid);
    assert!(
        last_error().contains("bad.toml") && last_error().contains("budget_ratio = 2"),
        "{}",
        last_error()
    );

    std::fs::write(&path, SNAP).unwrap();
    let s = unsafe { kvs_config_from_file(c_path.as_ptr(), &mut out) };
    assert_eq!(s, Status::Ok);
    unsafe { kvs_config_free(out) };
    unsafe { kvs_config_free(null_mut()) };
    assert_eq!(
        unsafe { kvs_config_from_file(null(), &mut out) },
        Status::InvalidArgument
    );
}

#[test]
fn plan_keep_count_through_the_abi() {
    let c = config(SNAP);
    let lens = SequenceLengths {
        logical_len: 5000,
        cached_len: 5000,
        protected_len: 0,
        block_size: 16,
    };
    let mut plan = KeepPlan::default();
    let s = unsafe { kvs_plan_keep_count(c, 0, &lens, &mut plan) };
    assert_eq!(s, Status::Ok);
    assert_eq!((plan.kept_tokens, plan.released_blocks), (1032, 248));

    let before = KeepPlan {
        kept_tokens: 7,
        ..KeepPlan::default()
    };
    let mut out = before;
    assert_eq!(
        unsafe { kvs_plan_keep_count(c, 3, &lens, &mut out) },
        Status::InvalidArgument
    );
    assert!(last_error().contains("phase = 3"));
    assert_eq!(
        unsafe { kvs_plan_keep_count(null(), 0, &lens, &mut out) },
        Status::InvalidArgument
    );
    assert!(last_error().contains("config is NULL"));
    assert_eq!(
        unsafe { kvs_plan_keep_count(c, 0, null(), &mut out) },
        Status::InvalidArgument
    );
    assert!(last_error().contains("lengths is NULL"));
    assert_eq!(
        unsafe { kvs_plan_keep_count(c, 0, &lens, null_mut()) },
        Status::InvalidArgument
    );
    let zero_block = SequenceLengths {
        block_size: 0,
        ..lens
    };
    assert_eq!(
        unsafe { kvs_plan_keep_count(c, 0, &zero_block, &mut out) },
        Status::InvalidArgument
    );
    assert!(last_error().contains("block_size is 0"));
    assert_eq!(out, before, "out must be untouched on failure");
    unsafe { kvs_config_free(c) };
}

#[test]
fn prefill_chunk_plans_and_params_through_the_abi() {
    let c = config("[sparsity]\npolicy = \"snapkv\"\nbudget_ratio = 0.25\n[prefill]\npolicy = \"snapkv\"\ninterval = 32\n");
    let lens = SequenceLengths {
        logical_len: 3000,
        cached_len: 3000,
        protected_len: 0,
        block_size: 16,
    };
    let mut plan = KeepPlan::default();
    assert_eq!(
        unsafe { kvs_plan_prefill_chunk(c, &lens, 8000, &mut plan) },
        Status::Ok
    );
    // 25% of the 8000-token prompt: 2000 kept, whole blocks evicted.
    assert_eq!((plan.kept_tokens, plan.released_blocks), (2008, 62));
    let before = plan;
    assert_eq!(
        unsafe { kvs_plan_prefill_chunk(c, &lens, 2000, &mut plan) },
        Status::InvalidArgument
    );
    assert!(
        last_error().contains("prompt_len = 2000"),
        "{}",
        last_error()
    );
    assert_eq!(
        unsafe { kvs_plan_keep_count(c, 2, &lens, &mut plan) },
        Status::InvalidArgument
    );
    assert!(last_error().contains("kvs_plan_prefill_chunk"));
    assert_eq!(
        unsafe { kvs_plan_prefill_chunk(c, null(), 8000, &mut plan) },
        Status::InvalidArgument
    );
    assert_eq!(plan, before, "out must be untouched on failure");
    let mut params = PolicyParams::default();
    assert_eq!(
        unsafe { kvs_config_policy_params(c, 2, &mut params) },
        Status::Ok
    );
    assert_eq!(
        (
            params.policy,
            params.budget_ratio,
            params.interval,
            params.protected_tail
        ),
        (2, 0.25, 32, 64)
    );
    unsafe { kvs_config_free(c) };
}

#[test]
fn config_for_request_through_the_abi() {
    let c = config(SNAP);
    let lens = SequenceLengths {
        logical_len: 5000,
        cached_len: 5000,
        protected_len: 0,
        block_size: 16,
    };
    let kept = |cfg: *const KvsConfig| {
        let mut plan = KeepPlan::default();
        assert_eq!(
            unsafe { kvs_plan_keep_count(cfg, 0, &lens, &mut plan) },
            Status::Ok
        );
        plan.kept_tokens
    };
    let derive = |args: RequestArgs| {
        let mut out = null_mut();
        let s = unsafe { kvs_config_for_request(c, &args, &mut out) };
        (s, out)
    };
    // Its own ratio: half of 5000 kept (whole blocks evicted, so a little more).
    let (s, half) = derive(RequestArgs {
        budget_ratio: 0.5,
        ..RequestArgs::default()
    });
    assert_eq!(s, Status::Ok, "{}", last_error());
    assert_eq!(kept(half), 2504);
    let (s, off) = derive(RequestArgs {
        opt_out: 1,
        ..RequestArgs::default()
    });
    assert_eq!(s, Status::Ok);
    assert_eq!(kept(off), 5000);
    let (s, same) = derive(RequestArgs::default());
    assert_eq!(s, Status::Ok);
    assert_eq!(kept(same), kept(c));
    for h in [half, off, same] {
        unsafe { kvs_config_free(h) };
    }

    let sentinel = std::ptr::dangling_mut::<KvsConfig>();
    for (args, msg) in [
        (
            RequestArgs {
                budget_tokens: 600,
                budget_ratio: 0.5,
                ..RequestArgs::default()
            },
            "both set",
        ),
        (
            RequestArgs {
                budget_ratio: 0.01,
                ..RequestArgs::default()
            },
            "requests.min_budget_ratio",
        ),
        (
            RequestArgs {
                budget_tokens: 3,
                ..RequestArgs::default()
            },
            "requests.min_budget_tokens",
        ),
    ] {
        let mut out = sentinel;
        assert_eq!(
            unsafe { kvs_config_for_request(c, &args, &mut out) },
            Status::InvalidArgument
        );
        assert!(last_error().contains(msg), "{}", last_error());
        assert_eq!(out, sentinel, "out must be untouched on failure");
    }
    let mut out = sentinel;
    assert_eq!(
        unsafe { kvs_config_for_request(c, null(), &mut out) },
        Status::InvalidArgument
    );
    assert!(last_error().contains("args is NULL"));
    assert_eq!(
        unsafe { kvs_config_for_request(null(), &RequestArgs::default(), &mut out) },
        Status::InvalidArgument
    );
    assert_eq!(out, sentinel);
    unsafe { kvs_config_free(c) };
}

#[test]
fn policy_params_reflect_the_config() {
    let c = config("[sparsity]\npolicy='snapkv'\nbudget_ratio=0.25\nrecent_tokens=16\nwindow=48\n[decode]\npolicy='streaming'\ninterval=128\n");
    let mut p = PolicyParams::default();
    assert_eq!(
        unsafe { kvs_config_policy_params(c, 0, &mut p) },
        Status::Ok
    );
    assert_eq!(p.policy, PolicyId::Snapkv as u32);
    assert_eq!(
        (p.budget_tokens, p.budget_ratio, p.protected_tail, p.window),
        (0, 0.25, 48, 48)
    );
    assert_eq!(
        unsafe { kvs_config_policy_params(c, 1, &mut p) },
        Status::Ok
    );
    assert_eq!(
        (p.policy, p.interval, p.protected_tail, p.carry),
        (PolicyId::Streaming as u32, 128, 16, 0.0)
    );
    unsafe { kvs_config_free(c) };
    // Decode SnapKV carries its scores (default 0.5); no other phase does.
    let c = config("[sparsity]\npolicy='snapkv'\nbudget_ratio=0.25\n[decode]\npolicy='snapkv'\ninterval=64\ncarry=0.25\n");
    for (phase, carry, pool) in [(0, 0.0, 31), (1, 0.25, 1), (2, 0.0, 31)] {
        assert_eq!(
            unsafe { kvs_config_policy_params(c, phase, &mut p) },
            Status::Ok
        );
        assert_eq!((p.carry, p.pool_kernel), (carry, pool), "phase {phase}");
    }
    unsafe { kvs_config_free(c) };
    // `carry` (ABI 5) sits in ABI 4's padding: the struct's size is unchanged.
    assert_eq!(std::mem::size_of::<PolicyParams>(), 48);
    let c = config(SNAP);
    assert_eq!(
        unsafe { kvs_config_policy_params(c, 1, &mut p) },
        Status::Ok
    );
    assert_eq!(p.policy, PolicyId::None as u32);
    unsafe { kvs_config_free(c) };
}

/// Every exported function runs inside a panic boundary (`ffi_boundary` or one of its
/// status-less forms), so no panic unwinds into C. Read from the sources, so a new export
/// without one fails here.
#[test]
fn every_export_is_inside_the_panic_boundary() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi");
    let mut exports = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        for (i, chunk) in src.split("extern \"C\" fn ").enumerate().skip(1) {
            let name: String = chunk
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // The body: up to the next top-level item.
            let body = chunk.split("\n}\n").next().unwrap();
            exports += 1;
            assert!(
                [
                    "ffi_boundary(",
                    "ffi_void_boundary(",
                    "ffi_value_boundary(",
                    "catch_unwind("
                ]
                .iter()
                .any(|b| body.contains(b)),
                "{}: export #{i} `{name}` runs outside the panic boundary",
                path.display()
            );
        }
    }
    assert!(exports >= 20, "found only {exports} exports");
}

/// `kvs_plan_selection` on four rows into out-params that start at -1: (status, keep, lengths).
fn plan_selection(
    c: *mut KvsConfig,
    lens: &[i32; 4],
    block_size: u32,
) -> (Status, [i32; 4], [i32; 4]) {
    let (mut keep, mut reduced) = ([-1i32; 4], [-1i32; 4]);
    let st = unsafe {
        kvs_plan_selection(
            c,
            lens.as_ptr(),
            4,
            block_size,
            keep.as_mut_ptr(),
            reduced.as_mut_ptr(),
        )
    };
    (st, keep, reduced)
}

#[test]
fn selection_params_and_plan_through_the_abi() {
    let c =
        config("[selection]\npolicy='quest'\nbudget_tokens=100\nmin_length=1000\ndense_layers=3\nspread=0.25\n");
    let mut s = SelectionParams::default();
    assert_eq!(
        unsafe { kvs_config_selection_params(c, &mut s) },
        Status::Ok
    );
    assert_eq!(
        (
            s.policy,
            s.budget_tokens,
            s.budget_ratio,
            s.min_length,
            s.dense_layers,
            s.spread
        ),
        (PolicyId::Quest as u32, 100, 0.0, 1000, 3, 0.25)
    );
    // No [sparsity]: every phase evicts nothing.
    let mut p = PolicyParams::default();
    for phase in 0..3 {
        assert_eq!(
            unsafe { kvs_config_policy_params(c, phase, &mut p) },
            Status::Ok
        );
        assert_eq!(p.policy, PolicyId::None as u32);
    }
    // 100 tokens in blocks of 16: 7 blocks, the last one partial (5 of 16 tokens in a row of
    // 4000 + 5): 6 * 16 + 5 = 101 tokens read. Below min_length, and within the budget: all.
    let lens = [4005i32, 999, 90, 0];
    assert_eq!(
        plan_selection(c, &lens, 16),
        (Status::Ok, [7, 63, 6, 0], [101, 999, 90, 0])
    );
    // Bad arguments: named, nothing written.
    let bad = [100i32, -3, 5, 5];
    assert_eq!(
        plan_selection(c, &bad, 16),
        (Status::InvalidArgument, [-1; 4], [-1; 4])
    );
    assert!(
        last_error().contains("seq_lens[1] = -3"),
        "{}",
        last_error()
    );
    assert_eq!(
        plan_selection(c, &lens, 0),
        (Status::InvalidArgument, [-1; 4], [-1; 4])
    );
    assert!(last_error().contains("block_size is 0"), "{}", last_error());
    unsafe { kvs_config_free(c) };
    // An eviction-only config: no selection, every block read.
    let c = config(SNAP);
    assert_eq!(
        unsafe { kvs_config_selection_params(c, &mut s) },
        Status::Ok
    );
    assert_eq!(s.policy, PolicyId::None as u32);
    assert_eq!(
        plan_selection(c, &lens, 16),
        (Status::Ok, [251, 63, 6, 0], lens)
    );
    unsafe { kvs_config_free(c) };
}
