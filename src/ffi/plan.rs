//! Keep-count planning across the ABI.

use super::boundary::ffi_boundary;
use super::config::{phase_from_u32, KvsConfig};
use crate::error::Error;
use crate::plan::{
    max_cached_tokens, plan_keep_count, plan_prefill_chunk, KeepPlan, SequenceLengths,
};
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

/// Plan an event between two prefill chunks (the config's `[prefill]` section): `lengths` as
/// computed so far, `prompt_len` the whole prompt's length (a ratio budget is of it). Due once
/// the cache holds `prefill.interval` tokens more than the budget; otherwise (and without a
/// `[prefill]` section) the plan keeps everything. Errors as `kvs_plan_keep_count`, plus
/// `prompt_len < logical_len`.
///
/// # Safety
/// `config` must be a live handle, `lengths` readable and `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kvs_plan_prefill_chunk(
    config: *const KvsConfig,
    lengths: *const SequenceLengths,
    prompt_len: u64,
    out: *mut KeepPlan,
) -> Status {
    ffi_boundary("kvs_plan_prefill_chunk", || {
        let out = arg_out!(out, "out");
        let config = arg_ref!(config, "config");
        let lengths = arg_ref!(lengths, "lengths");
        let plan = plan_prefill_chunk(&config.config, lengths, prompt_len)?;
        // SAFETY: checked by `arg_out!`.
        unsafe { *out = plan };
        Ok(())
    })
}

/// Write to `*out` the most cached tokens one sequence of at most `max_len` tokens can hold at
/// once under `config` when prefilled in chunks of at most `chunk` tokens (`block_size`-token
/// blocks): what an engine may size its KV space by instead of `max_len`. It is `max_len`
/// unless every phase bounds the cache: a `[prefill]` and a `[decode]` section, and
/// `requests.allow_opt_out = false` (requests' own budgets count up to `[requests]`' largest).
/// Errors: `KVS_STATUS_INVALID_ARGUMENT` for NULLs or a zero `block_size` or `chunk`.
///
/// # Safety
/// `config` must be a live handle and `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kvs_config_max_cached_tokens(
    config: *const KvsConfig,
    max_len: u64,
    chunk: u64,
    block_size: u32,
    out: *mut u64,
) -> Status {
    ffi_boundary("kvs_config_max_cached_tokens", || {
        let out = arg_out!(out, "out");
        let config = arg_ref!(config, "config");
        if block_size == 0 || chunk == 0 {
            return Err(Error::invalid_arg(format!(
                "block_size = {block_size} and chunk = {chunk} must be positive (tokens per KV block, most tokens of \
                 one sequence per engine step)"
            )));
        }
        let n = max_cached_tokens(&config.config, max_len, chunk, block_size);
        // SAFETY: checked by `arg_out!`.
        unsafe { *out = n };
        Ok(())
    })
}
