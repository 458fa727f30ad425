//! Keep-count planning across the ABI.

use super::boundary::ffi_boundary;
use super::config::{phase_from_u32, KvsConfig};
use crate::plan::{plan_keep_count, KeepPlan, SequenceLengths};
use crate::status::Status;

/// Plan one sequence's compression event for `phase` (a `kvs_phase`): how many cached tokens
/// stay, how many are evicted (whole blocks) and how many blocks (the last ones of the row) are
/// released. When no event is due the plan keeps everything and releases nothing.
/// Errors: `KVS_STATUS_INVALID_ARGUMENT` for NULLs, an unknown phase, `block_size == 0`,
/// `cached_len > logical_len`, or a protected prefix that is not whole blocks within the cache.
///
/// # Safety
/// `config` must be a live handle, `lengths` readable and `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kvs_plan_keep_count(
    config: *const KvsConfig,
    phase: u32,
    lengths: *const SequenceLengths,
    out: *mut KeepPlan,
) -> Status {
    ffi_boundary("kvs_plan_keep_count", || {
        let out = arg_out!(out, "out");
        let config = arg_ref!(config, "config");
        let lengths = arg_ref!(lengths, "lengths");
        let plan = plan_keep_count(&config.config, phase_from_u32(phase)?, lengths)?;
        // SAFETY: checked by `arg_out!`.
        unsafe { *out = plan };
        Ok(())
    })
}
