//! Arbitrary arguments across the ABI: NULLs, unknown phases, any lengths and block sizes.
//! Statuses only ever OK or INVALID_ARGUMENT, and a successful plan keeps its invariants.
#![no_main]

use arbitrary::Arbitrary;
use kvsieve::ffi::{kvs_config_free, kvs_config_from_str, kvs_plan_keep_count};
use kvsieve::plan::{KeepPlan, SequenceLengths};
use kvsieve::Status;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Args {
    null_config: bool,
    null_lengths: bool,
    null_out: bool,
    phase: u32,
    logical_len: u64,
    cached_len: u64,
    protected_len: u64,
    block_size: u32,
    budget: u16,
    ratio: bool,
}

fuzz_target!(|a: Args| {
    let text = if a.ratio {
        format!("[sparsity]\npolicy='knorm'\nbudget_ratio={}\n[decode]\npolicy='streaming'\ninterval=7\n", (a.budget as f64 + 1.0) / 65536.0)
    } else {
        format!("[sparsity]\npolicy='snapkv'\nbudget_tokens={}\nsink_tokens=0\nrecent_tokens=0\nwindow=1\n", a.budget as u32 + 1)
    };
    let mut config = std::ptr::null_mut();
    let s = unsafe { kvs_config_from_str(text.as_ptr().cast(), text.len(), &mut config) };
    assert_eq!(s, Status::Ok);
    let lens = SequenceLengths {
        logical_len: a.logical_len,
        cached_len: a.cached_len,
        protected_len: a.protected_len,
        block_size: a.block_size,
    };
    let mut plan = KeepPlan { kept_tokens: 0xdead, ..KeepPlan::default() };
    let cfg = if a.null_config { std::ptr::null() } else { config as *const _ };
    let lp = if a.null_lengths { std::ptr::null() } else { &lens as *const _ };
    let op = if a.null_out { std::ptr::null_mut() } else { &mut plan as *mut _ };
    let s = unsafe { kvs_plan_keep_count(cfg, a.phase, lp, op) };
    match s {
        Status::Ok => {
            assert_eq!(plan.kept_tokens + plan.evicted_tokens, lens.cached_len);
            assert_eq!(plan.evicted_tokens, plan.released_blocks * lens.block_size as u64);
            assert!(plan.kept_tokens >= lens.protected_len);
        }
        Status::InvalidArgument => assert_eq!(plan.kept_tokens, 0xdead),
        other => panic!("unexpected status {other:?}"),
    }
    unsafe { kvs_config_free(config) };
});
