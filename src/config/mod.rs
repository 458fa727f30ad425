//! The validated kvsieve configuration (TOML; docs/design.md, "Layers").
//!
//! `raw` is what serde reads (every value with its source span); `validate` turns it into the
//! types below or an error naming the key, the bad value, what is allowed and the line. Code past
//! this module only ever sees values that passed validation.

mod raw;
mod request;
mod validate;

pub use request::RequestOptions;

use crate::error::{Error, Result};
use crate::status::Status;
use std::path::Path;

/// How cached tokens are scored when a compression event runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// No scores: keep `sink_tokens` and the `recent_tokens` most recent.
    Streaming,
    /// Window attention of the last `window` prompt queries, pooled (SnapKV).
    SnapKv,
    /// Negative key L2 norm: low-norm keys are kept.
    KNorm,
    /// Query-aware block selection per decode step (`[selection]` only); nothing is evicted.
    Quest,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Streaming => "streaming",
            Policy::SnapKv => "snapkv",
            Policy::KNorm => "knorm",
            Policy::Quest => "quest",
        }
    }
}

/// 1-D pooling applied to SnapKV scores along the token axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Max,
    Avg,
}

/// How many tokens a sequence keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// An absolute count of cached tokens.
    Tokens(u32),
    /// A fraction in (0, 1] of the sequence's logical length at the event, rounded up.
    Ratio(f64),
}

impl Budget {
    /// The budget in tokens for a sequence of `logical_len` tokens.
    pub fn tokens(self, logical_len: u64) -> u64 {
        match self {
            Budget::Tokens(n) => n as u64,
            Budget::Ratio(r) => (r * logical_len as f64).ceil() as u64,
        }
    }
}

/// `[sparsity]`: the compression event at the end of prefill.
#[derive(Debug, Clone, PartialEq)]
pub struct Sparsity {
    pub policy: Policy,
    pub budget: Budget,
    /// Leading cached tokens always kept (attention sinks).
    pub sink_tokens: u32,
    /// Trailing cached tokens always kept.
    pub recent_tokens: u32,
    /// SnapKV observation window (last prompt queries); these tokens are always kept.
    pub window: u32,
    /// SnapKV pooling width, odd.
    pub pool_kernel: u32,
    pub pool: Pooling,
    /// Sequences shorter than this (logical tokens) are never compressed.
    pub min_length: u32,
}

impl Sparsity {
    /// Trailing tokens that must stay: the recent window, and for SnapKV its observation window.
    pub fn protected_tail(&self) -> u32 {
        self.tail_for(self.policy)
    }

    /// The trailing tokens an event scoring with `policy` keeps (prefill end or prefill chunks).
    pub fn tail_for(&self, policy: Policy) -> u32 {
        match policy {
            Policy::SnapKv => self.recent_tokens.max(self.window),
            _ => self.recent_tokens,
        }
    }
}

/// `[decode]`: optional re-compression while generating. SnapKV scores with the queries of the
/// last `[sparsity] window` generated tokens (the engine records them), keeps those tokens, and
/// waits until that many were generated since the request (re)started decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Decode {
    pub policy: Policy,
    /// A decode event runs once the cache has grown this many tokens past the budget.
    pub interval: u32,
    /// Budget after a decode event; `[sparsity]`'s unless `[decode]` sets its own.
    pub budget: Budget,
    /// SnapKV: a token kept by the last decode event ranks by max(this event's score, `carry` x
    /// its score then), so what earlier windows attended to fades instead of vanishing; 0 ranks
    /// by this event's window alone. 0 for the other policies.
    pub carry: f32,
    /// SnapKV's pooling width for decode events (`[decode] pool_kernel`).
    pub pool_kernel: u32,
}

impl Decode {
    /// Trailing tokens a decode event keeps: the recent window, and for SnapKV its window.
    pub fn protected_tail(&self, sparsity: &Sparsity) -> u32 {
        sparsity.tail_for(self.policy)
    }

    /// Generated tokens whose queries a decode event scores with (SnapKV's window), 0 for the
    /// policies that need none.
    pub fn window(&self, sparsity: &Sparsity) -> u32 {
        if self.policy == Policy::SnapKv {
            sparsity.window
        } else {
            0
        }
    }
}

/// `[prefill]`: optional compression between prefill chunks (opt-in: a chunk is compressed
/// before the question at the end of the prompt is seen). Sinks, the recent tail and SnapKV's
/// window are `[sparsity]`'s; the event at prefill end still runs with `[sparsity]`'s budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Prefill {
    pub policy: Policy,
    /// A chunk event runs once the cache has grown this many tokens past the budget.
    pub interval: u32,
    /// Budget while prefilling; a ratio is of the whole prompt. `[sparsity]`'s unless set.
    pub budget: Budget,
}

impl Prefill {
    /// Trailing tokens a chunk event keeps: the recent window, and for SnapKV its window.
    pub fn protected_tail(&self, sparsity: &Sparsity) -> u32 {
        sparsity.tail_for(self.policy)
    }
}

/// `[requests]`: what one request may ask for itself (an engine passes it per request, e.g.
/// vLLM's `SamplingParams.extra_args`); see `Config::for_request`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requests {
    /// Whether a request may turn compression off for itself.
    pub allow_opt_out: bool,
    /// Bounds of a request's own `budget_tokens` (inclusive).
    pub min_budget_tokens: u32,
    pub max_budget_tokens: u32,
    /// Bounds of a request's own `budget_ratio` (inclusive).
    pub min_budget_ratio: f64,
    pub max_budget_ratio: f64,
}

/// `[selection]`: per decode step, attention reads only the blocks that can matter to the
/// current query (Quest); every token stays cached. Composes with eviction: it selects among the
/// blocks a compressed sequence kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub policy: Policy,
    /// Tokens one decode step reads per sequence (a ratio: of its length), rounded up to blocks.
    pub budget: Budget,
    /// Sequences shorter than this (cached tokens) are read whole.
    pub min_length: u32,
    /// The first `dense_layers` layers always read every block (Quest's paper keeps two).
    pub dense_layers: u32,
    /// How much of a block's key range (per channel, min..max) its score counts, 0..=1: 1 is
    /// Quest's upper bound of q.k, smaller values shrink the range about its centre (a block is
    /// then ranked more by its typical keys than by its extremes).
    pub spread: f32,
    /// Key ranges kept per block (1: Quest's, one per block): a block is split into this many
    /// runs of slots, each with its own range, and scores as its best run. A tighter bound for
    /// `key_ranges` times the metadata and scoring; must divide the engine's block size.
    pub key_ranges: u32,
}

/// The first block (attention sinks) is always read; so is the last, the one being written.
pub const SELECTION_SINK_BLOCKS: u64 = 1;

impl Selection {
    /// How many blocks a decode step reads of a sequence of `seq_len` cached tokens in blocks of
    /// `block_size`: all of them below `min_length` or within the budget, else the budget
    /// rounded up to whole blocks, never fewer than the first and the last.
    pub fn keep_blocks(&self, seq_len: u64, block_size: u32) -> u64 {
        let bs = block_size.max(1) as u64;
        let blocks = seq_len.div_ceil(bs);
        if seq_len < self.min_length as u64 {
            return blocks;
        }
        let want = self.budget.tokens(seq_len).div_ceil(bs);
        want.max(SELECTION_SINK_BLOCKS + 1).min(blocks)
    }
}

/// A validated configuration: eviction (`[sparsity]`, with `[decode]` / `[prefill]`),
/// selection (`[selection]`) or both; at least one.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// None: nothing is evicted (a selection-only config, or a request that opted out).
    pub sparsity: Option<Sparsity>,
    pub decode: Option<Decode>,
    pub prefill: Option<Prefill>,
    pub selection: Option<Selection>,
    pub requests: Requests,
}

impl Config {
    /// Parse and validate TOML text.
    pub fn from_toml_str(text: &str) -> Result<Config> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            Error::new(
                Status::ConfigParse,
                format!("config: {}", e.to_string().trim_end()),
            )
        })?;
        validate::validate(raw, text)
    }

    /// Read, parse and validate a TOML file; errors name the path.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::new(Status::Io, format!("config file {}: {e}", path.display())))?;
        Config::from_toml_str(&text).map_err(|e| Error {
            status: e.status,
            message: format!("{}: {}", path.display(), e.message),
        })
    }
}

#[cfg(test)]
mod tests;
