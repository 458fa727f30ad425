//! The config as serde reads it: every key optional or typed loosely enough (signed integers,
//! strings for enums) that range and name checks happen in `validate`, where the message can
//! say what is allowed. Unknown keys are refused here.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub sparsity: Option<Spanned<RawSparsity>>,
    pub selection: Option<Spanned<RawSelection>>,
    pub decode: Option<Spanned<RawDecode>>,
    pub prefill: Option<Spanned<RawPrefill>>,
    pub requests: Option<Spanned<RawRequests>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSparsity {
    pub policy: Option<Spanned<String>>,
    pub budget_tokens: Option<Spanned<i64>>,
    pub budget_ratio: Option<Spanned<f64>>,
    pub sink_tokens: Option<Spanned<i64>>,
    pub recent_tokens: Option<Spanned<i64>>,
    pub window: Option<Spanned<i64>>,
    pub pool_kernel: Option<Spanned<i64>>,
    pub pool: Option<Spanned<String>>,
    pub min_length: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDecode {
    pub policy: Option<Spanned<String>>,
    pub interval: Option<Spanned<i64>>,
    pub budget_tokens: Option<Spanned<i64>>,
    pub budget_ratio: Option<Spanned<f64>>,
    pub carry: Option<Spanned<f64>>,
    pub pool_kernel: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRequests {
    pub allow_opt_out: Option<Spanned<bool>>,
    pub min_budget_tokens: Option<Spanned<i64>>,
    pub max_budget_tokens: Option<Spanned<i64>>,
    pub min_budget_ratio: Option<Spanned<f64>>,
    pub max_budget_ratio: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrefill {
    pub policy: Option<Spanned<String>>,
    pub interval: Option<Spanned<i64>>,
    pub budget_tokens: Option<Spanned<i64>>,
    pub budget_ratio: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSelection {
    pub policy: Option<Spanned<String>>,
    pub budget_tokens: Option<Spanned<i64>>,
    pub budget_ratio: Option<Spanned<f64>>,
    pub min_length: Option<Spanned<i64>>,
    pub dense_layers: Option<Spanned<i64>>,
    pub spread: Option<Spanned<f64>>,
    pub key_ranges: Option<Spanned<i64>>,
}
