//! Any bytes through `kvs_config_from_str`: never a panic (it would show as KVS_STATUS_PANIC),
//! and a refused config always explains itself.
#![no_main]

use kvsieve::ffi::{kvs_config_free, kvs_config_from_str, kvs_last_error, kvs_plan_keep_count};
use kvsieve::plan::{KeepPlan, SequenceLengths};
use kvsieve::Status;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut config = std::ptr::null_mut();
    let status = unsafe { kvs_config_from_str(data.as_ptr().cast(), data.len(), &mut config) };
    assert_ne!(status, Status::Panic);
    if status != Status::Ok {
        assert!(config.is_null());
        assert!(unsafe { *kvs_last_error() } != 0, "failure without a message");
        return;
    }
    // Every accepted config must plan every reasonable sequence without panicking.
    for len in [0u64, 1, 15, 16, 17, 1000, 4096, 100_000] {
        let lens = SequenceLengths { logical_len: len, cached_len: len, protected_len: 0, block_size: 16 };
        for phase in 0..2 {
            let mut plan = KeepPlan::default();
            let s = unsafe { kvs_plan_keep_count(config, phase, &lens, &mut plan) };
            assert_eq!(s, Status::Ok);
            assert_eq!(plan.kept_tokens + plan.evicted_tokens, len);
            assert_eq!(plan.evicted_tokens, plan.released_blocks * 16);
        }
    }
    unsafe { kvs_config_free(config) };
});
