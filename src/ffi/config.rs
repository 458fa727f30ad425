//! `kvs_config`: a parsed, validated TOML configuration.

use super::boundary::{arg_cstr, ffi_boundary, ffi_void_boundary};
use crate::config::{Budget, Config, Policy, Pooling, RequestOptions};
use crate::error::Error;
use crate::plan::Phase;
use crate::status::Status;
use std::ffi::c_char;
use std::path::Path;

/// A validated kvsieve configuration. Immutable once made: share it freely between threads.
pub struct KvsConfig {
    pub(crate) config: Config,
}

fn publish(config: Config, out: *mut *mut KvsConfig) {
    let handle = Box::into_raw(Box::new(KvsConfig { config }));
    // SAFETY: `out` was checked non-NULL and aligned by `arg_out!` before any work.
    unsafe { *out = handle };
}

/// Parse and validate `len` bytes of TOML at `text` (need not be NUL-terminated).
/// On success `*out` owns a new config; release it with `kvs_config_free`.
/// Errors: `KVS_STATUS_CONFIG_PARSE` (not TOML, unknown key, wrong type),
/// `KVS_STATUS_CONFIG_INVALID` (value out of range, impossible combination), each with a message
/// naming the key, the value, what is allowed and the line.
///
/// # Safety
/// `text` must point to `len` readable bytes and `out` to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn kvs_config_from_str(
    text: *const c_char,
    len: usize,
    out: *mut *mut KvsConfig,
) -> Status {
    ffi_boundary("kvs_config_from_str", || {
        let out = arg_out!(out, "out");
        if len == 0 {
            return Err(Error::invalid_arg(
                "len is 0; pass the length of the TOML text in bytes",
            ));
        }
        let bytes = arg_slice!(text as *const u8, len, "text");
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Error::new(Status::ConfigParse, format!("config is not UTF-8: {e}")))?;
        publish(Config::from_toml_str(text)?, out);
        Ok(())
    })
}

/// Read, parse and validate the TOML file at the NUL-terminated `path`.
/// Errors as `kvs_config_from_str`, plus `KVS_STATUS_IO` when the file cannot be read.
///
/// # Safety
/// `path` must be a NUL-terminated string and `out` a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn kvs_config_from_file(
    path: *const c_char,
    out: *mut *mut KvsConfig,
) -> Status {
    ffi_boundary("kvs_config_from_file", || {
        let out = arg_out!(out, "out");
        let path = arg_cstr(path, "path")?;
        publish(Config::from_file(Path::new(path))?, out);
        Ok(())
    })
}

/// Release a config made by `kvs_config_from_str`/`_from_file`. NULL is a no-op.
///
/// # Safety
/// `config` must be NULL or a handle from this library not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvs_config_free(config: *mut KvsConfig) {
    ffi_void_boundary("kvs_config_free", || {
        if !config.is_null() {
            // SAFETY: the caller passes a handle made by `publish` and frees it once.
            drop(unsafe { Box::from_raw(config) });
        }
    })
}

/// A config's parameters for one phase, for engines that drive the kernels themselves.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyParams {
    /// A `kvs_policy` value; `KVS_POLICY_NONE` when the phase has no compression configured.
    pub policy: u32,
    /// Budget in tokens when absolute; 0 when a ratio is configured.
    pub budget_tokens: u32,
    /// Budget as a fraction of the logical length; 0 when absolute.
    pub budget_ratio: f64,
    pub sink_tokens: u32,
    /// Trailing tokens always kept (for SnapKV, in any phase: max(recent_tokens, window)).
    pub protected_tail: u32,
    pub window: u32,
    /// SnapKV's pooling width: `[sparsity]`'s, for decode `[decode]`'s.
    pub pool_kernel: u32,
    /// A `kvs_pooling` value.
    pub pool: u32,
    pub min_length: u32,
    /// Decode and prefill chunks: tokens the cache may outgrow the budget by before the next event.
    pub interval: u32,
    /// Decode SnapKV (`[decode] carry`; 0 otherwise): the engine ranks each token the last
    /// decode event kept by max(`kvs_score_snapkv`'s score, carry x the score it was ranked by
    /// then) before `kvs_select_tokens`, and keeps the kept tokens' ranking scores for the next
    /// event (dropping them when the request recomputes). New in ABI 5, in what was ABI 4's
    /// padding (the size is unchanged), so a library of ABI 4 leaves it unspecified.
    pub carry: f32,
}

/// Policies as numbers in `kvs_policy_params.policy`.
#[repr(u32)]
pub enum PolicyId {
    None = 0,
    Streaming = 1,
    Snapkv = 2,
    Knorm = 3,
    Quest = 4,
}

/// Pooling kinds as numbers in `kvs_policy_params.pool`.
#[repr(u32)]
pub enum PoolingId {
    Max = 0,
    Avg = 1,
}

fn policy_id(p: Policy) -> u32 {
    (match p {
        Policy::Streaming => PolicyId::Streaming,
        Policy::SnapKv => PolicyId::Snapkv,
        Policy::KNorm => PolicyId::Knorm,
        Policy::Quest => PolicyId::Quest,
    }) as u32
}

pub(super) fn phase_from_u32(phase: u32) -> crate::error::Result<Phase> {
    match phase {
        0 => Ok(Phase::Prefill),
        1 => Ok(Phase::Decode),
        2 => Ok(Phase::PrefillChunk),
        other => Err(Error::invalid_arg(format!(
            "phase = {other} is not a kvs_phase; use KVS_PHASE_PREFILL (0), KVS_PHASE_DECODE (1) or \
             KVS_PHASE_PREFILL_CHUNK (2)"
        ))),
    }
}

fn budget_fields(budget: Option<Budget>) -> (u32, f64) {
    match budget {
        Some(Budget::Tokens(n)) => (n, 0.0),
        Some(Budget::Ratio(r)) => (0, r),
        None => (0, 0.0),
    }
}

/// Write the parameters of `phase` (a `kvs_phase`) of `config` to `*out` (all zero, policy
/// `KVS_POLICY_NONE`, for a config without `[sparsity]`: it evicts nothing).
///
/// # Safety
/// `config` must be a live handle and `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kvs_config_policy_params(
    config: *const KvsConfig,
    phase: u32,
    out: *mut PolicyParams,
) -> Status {
    ffi_boundary("kvs_config_policy_params", || {
        let out = arg_out!(out, "out");
        let c = &arg_ref!(config, "config").config;
        let phase = phase_from_u32(phase)?;
        let Some(sp) = &c.sparsity else {
            // Selection only: no phase evicts.
            // SAFETY: checked by `arg_out!`.
            unsafe { *out = PolicyParams::default() };
            return Ok(());
        };
        // What differs by phase; sinks, window and pooling kind are [sparsity]'s.
        struct Phased {
            policy: u32,
            budget: Option<Budget>,
            tail: u32,
            interval: u32,
            pool_kernel: u32,
            carry: f32,
        }
        let none = Phased {
            policy: PolicyId::None as u32,
            budget: None,
            tail: sp.recent_tokens,
            interval: 0,
            pool_kernel: sp.pool_kernel,
            carry: 0.0,
        };
        let p = match (phase, &c.decode, &c.prefill) {
            (Phase::Prefill, _, _) => Phased {
                policy: policy_id(sp.policy),
                budget: Some(sp.budget),
                tail: sp.protected_tail(),
                ..none
            },
            (Phase::Decode, Some(d), _) => Phased {
                policy: policy_id(d.policy),
                budget: Some(d.budget),
                tail: d.protected_tail(sp),
                interval: d.interval,
                pool_kernel: d.pool_kernel,
                carry: d.carry,
            },
            (Phase::PrefillChunk, _, Some(pf)) => Phased {
                policy: policy_id(pf.policy),
                budget: Some(pf.budget),
                tail: pf.protected_tail(sp),
                interval: pf.interval,
                ..none
            },
            (Phase::Decode, None, _) | (Phase::PrefillChunk, _, None) => none,
        };
        let (budget_tokens, budget_ratio) = budget_fields(p.budget);
        let params = PolicyParams {
            policy: p.policy,
            budget_tokens,
            budget_ratio,
            sink_tokens: sp.sink_tokens,
            protected_tail: p.tail,
            window: sp.window,
            pool_kernel: p.pool_kernel,
            pool: match sp.pool {
                Pooling::Max => PoolingId::Max as u32,
                Pooling::Avg => PoolingId::Avg as u32,
            },
            min_length: sp.min_length,
            interval: p.interval,
            carry: p.carry,
        };
        // SAFETY: checked by `arg_out!`.
        unsafe { *out = params };
        Ok(())
    })
}

/// A config's `[selection]` (`kvs_config_selection_params`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SelectionParams {
    /// `KVS_POLICY_QUEST`, or `KVS_POLICY_NONE` when the config has no `[selection]`.
    pub policy: u32,
    /// Tokens one decode step reads per sequence when absolute; 0 when a ratio is configured.
    pub budget_tokens: u32,
    /// The budget as a fraction of the sequence's length; 0 when absolute.
    pub budget_ratio: f64,
    /// Sequences shorter than this are read whole.
    pub min_length: u32,
    /// The first `dense_layers` layers read every block.
    pub dense_layers: u32,
    /// The fraction of each block's key range its score counts (`kvs_quest_rows.spread`).
    pub spread: f32,
    /// Key ranges kept per block (1: Quest's): the metadata of every Quest call holds
    /// `num_blocks * key_ranges * num_kv_heads * head_dim` floats (`kvs_quest_update_block`).
    pub key_ranges: u32,
}

/// Write `config`'s `[selection]` to `*out` (policy `KVS_POLICY_NONE` and zeros without one).
/// Plan a step's kept blocks with `kvs_plan_selection`.
///
/// # Safety
/// `config` must be a live handle and `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kvs_config_selection_params(
    config: *const KvsConfig,
    out: *mut SelectionParams,
) -> Status {
    ffi_boundary("kvs_config_selection_params", || {
        let out = arg_out!(out, "out");
        let c = &arg_ref!(config, "config").config;
        let params = match &c.selection {
            None => SelectionParams::default(),
            Some(s) => {
                let (budget_tokens, budget_ratio) = budget_fields(Some(s.budget));
                SelectionParams {
                    policy: policy_id(s.policy),
                    budget_tokens,
                    budget_ratio,
                    min_length: s.min_length,
                    dense_layers: s.dense_layers,
                    spread: s.spread,
                    key_ranges: s.key_ranges,
                }
            }
        };
        // SAFETY: checked by `arg_out!`.
        unsafe { *out = params };
        Ok(())
    })
}

/// What one request asks for itself (`kvs_config_for_request`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestArgs {
    /// Nonzero: no compression for this request (refused unless `requests.allow_opt_out`).
    pub opt_out: u32,
    /// Its own budget in tokens; 0 keeps the config's.
    pub budget_tokens: u32,
    /// Its own budget as a fraction of the logical length; 0 keeps the config's.
    pub budget_ratio: f64,
}

/// Derive the config one request is served with: `config` with the request's own budget
/// (every configured phase) or with compression off, within the bounds of the config's
/// `[requests]` section. Plan and compress that request with `*out` (free it with
/// `kvs_config_free`); scheduler and workers derive the same config from the same arguments.
/// Errors: `KVS_STATUS_INVALID_ARGUMENT` naming the request field, its value and the bounds
/// (a budget outside them, both a token and a ratio budget, an opt-out the config forbids).
///
/// # Safety
/// `config` must be a live handle, `args` readable and `out` writable.
#[no_mangle]
pub unsafe extern "C" fn kvs_config_for_request(
    config: *const KvsConfig,
    args: *const RequestArgs,
    out: *mut *mut KvsConfig,
) -> Status {
    ffi_boundary("kvs_config_for_request", || {
        let out = arg_out!(out, "out");
        let c = &arg_ref!(config, "config").config;
        let a = arg_ref!(args, "args");
        let budget = match (a.budget_tokens, a.budget_ratio) {
            (0, 0.0) => None,
            (0, r) => Some(Budget::Ratio(r)),
            (n, 0.0) => Some(Budget::Tokens(n)),
            (n, r) => {
                return Err(Error::invalid_arg(format!(
                    "budget_tokens = {n} and budget_ratio = {r} are both set; ask for one of them"
                )))
            }
        };
        let req = RequestOptions {
            opt_out: a.opt_out != 0,
            budget,
        };
        publish(c.for_request(&req)?, out);
        Ok(())
    })
}
