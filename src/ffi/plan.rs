//! Keep-count planning across the ABI.

use super::boundary::ffi_boundary;
use super::config::{phase_from_u32, KvsConfig};
use crate::error::Error;
use crate::kernels::score::quest::reduced_len;
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

/// Plan one step's Quest selection (`[selection]`) for `num_rows` decode rows of `seq_lens[r]`
/// cached tokens in `block_size`-token blocks: `keep[r]`, the blocks row r reads (every one of
/// them when the row is below `selection.min_length` or within the budget, or when the config has
/// no `[selection]`), and `reduced_lens[r]`, the tokens attention then reads: its sequence length
/// for the step. The same for every layer; `keep` is what `kvs_quest_select` takes.
/// Errors: `KVS_STATUS_INVALID_ARGUMENT` for NULLs, `block_size == 0` or a negative length,
/// nothing written.
///
/// # Safety
/// `config` must be a live handle; `seq_lens` readable and `keep`, `reduced_lens` writable for
/// `num_rows` entries each.
#[no_mangle]
pub unsafe extern "C" fn kvs_plan_selection(
    config: *const KvsConfig,
    seq_lens: *const i32,
    num_rows: u32,
    block_size: u32,
    keep: *mut i32,
    reduced_lens: *mut i32,
) -> Status {
    ffi_boundary("kvs_plan_selection", || {
        let config = arg_ref!(config, "config");
        let lens = arg_slice!(seq_lens, num_rows, "seq_lens");
        let keep = arg_slice_mut!(keep, num_rows, "keep");
        let reduced = arg_slice_mut!(reduced_lens, num_rows, "reduced_lens");
        if block_size == 0 {
            return Err(Error::invalid_arg(
                "block_size is 0; pass the engine's KV block size in tokens (e.g. 16)",
            ));
        }
        if let Some(i) = lens.iter().position(|&l| l < 0) {
            return Err(Error::invalid_arg(format!(
                "seq_lens[{i}] = {} is negative",
                lens[i]
            )));
        }
        for ((&l, k), r) in lens.iter().zip(keep.iter_mut()).zip(reduced.iter_mut()) {
            let blocks = (l as u64).div_ceil(block_size as u64);
            let n = config
                .config
                .selection
                .as_ref()
                .map_or(blocks, |s| s.keep_blocks(l as u64, block_size));
            // At most the row's own block count, so both fit an i32.
            *k = n as i32;
            *r = reduced_len(l as usize, block_size as usize, n as usize) as i32;
        }
        Ok(())
    })
}
