//! Keep-count planning: how many cached tokens a sequence keeps at a compression event.
//!
//! The count is policy-determined and the choice data-determined (DESIGN.md §1): this module
//! looks only at the config and the lengths, so an engine's scheduler (which frees blocks) and
//! its workers (which move data) compute the same numbers without talking.
//!
//! Invariants of every `KeepPlan` (checked by tests):
//! - `kept_tokens + evicted_tokens == cached_len`, and `kept_tokens >= protected_len`;
//! - `evicted_tokens == released_blocks * block_size`: eviction is whole blocks, so the last
//!   block's fill (`cached_len % block_size`) is unchanged and the released blocks are exactly the
//!   last `released_blocks` of the sequence's row;
//! - sinks (`sink_tokens` leading tokens), the recent tail and SnapKV's window always fit in
//!   `kept_tokens`.

use crate::config::Config;
use crate::ensure_arg;
use crate::error::Result;

/// When the event happens: at the end of prefill (`[sparsity]`) or while decoding (`[decode]`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prefill = 0,
    Decode = 1,
}

/// A sequence's lengths at the moment of planning.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SequenceLengths {
    /// Tokens the sequence has seen (`L`); RoPE position of the next token.
    pub logical_len: u64,
    /// Tokens whose K/V are held now (`C <= L`).
    pub cached_len: u64,
    /// Leading cached tokens shared with other sequences (prefix-cache hits); whole blocks,
    /// never rewritten. A multiple of `block_size`, at most `cached_len`.
    pub protected_len: u64,
    /// Token slots per KV block (> 0).
    pub block_size: u32,
}

/// What a compression event does to one sequence.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeepPlan {
    /// Cached tokens after the event (protected prefix included).
    pub kept_tokens: u64,
    /// Cached tokens removed; a multiple of `block_size`.
    pub evicted_tokens: u64,
    /// Blocks handed back: the last `released_blocks` of the row.
    pub released_blocks: u64,
    /// Kept tokens after the protected prefix, i.e. the per-(layer, KV head) selection size.
    pub selected_tokens: u64,
}

impl KeepPlan {
    fn unchanged(lens: &SequenceLengths) -> KeepPlan {
        KeepPlan {
            kept_tokens: lens.cached_len,
            evicted_tokens: 0,
            released_blocks: 0,
            selected_tokens: lens.cached_len - lens.protected_len,
        }
    }
}

fn check(lens: &SequenceLengths) -> Result<()> {
    ensure_arg!(
        lens.block_size > 0,
        "block_size is 0; pass the engine's KV block size in tokens (e.g. 16)"
    );
    ensure_arg!(
        lens.cached_len <= lens.logical_len,
        "cached_len = {} exceeds logical_len = {}; the cache cannot hold tokens the sequence has not seen",
        lens.cached_len,
        lens.logical_len
    );
    ensure_arg!(
        lens.protected_len <= lens.cached_len,
        "protected_len = {} exceeds cached_len = {}",
        lens.protected_len,
        lens.cached_len
    );
    ensure_arg!(
        lens.protected_len % lens.block_size as u64 == 0,
        "protected_len = {} is not a multiple of block_size = {}; pass the shared prefix in whole blocks",
        lens.protected_len,
        lens.block_size
    );
    Ok(())
}

/// Plan one sequence's compression event. Returns an unchanged plan when no event is due.
pub fn plan_keep_count(config: &Config, phase: Phase, lens: &SequenceLengths) -> Result<KeepPlan> {
    check(lens)?;
    let sp = &config.sparsity;
    let (policy, budget, tail, slack) = match phase {
        Phase::Prefill => (sp.policy, sp.budget, sp.protected_tail(), 0u64),
        Phase::Decode => match &config.decode {
            None => return Ok(KeepPlan::unchanged(lens)),
            Some(d) => (d.policy, d.budget, sp.recent_tokens, d.interval as u64),
        },
    };
    if !policy.evicts() || lens.logical_len < sp.min_length as u64 {
        return Ok(KeepPlan::unchanged(lens));
    }
    let c = lens.cached_len;
    let p = lens.protected_len;
    let target = budget.tokens(lens.logical_len);
    // Never below what is always kept: the prefix, the sinks, and the protected tail.
    // Saturating: lengths come from the engine and may be anything up to u64::MAX.
    let always = p
        .max(sp.sink_tokens as u64)
        .saturating_add(tail as u64)
        .min(c);
    let floor = target.max(always).max(p);
    // Decode re-compresses only once the cache has outgrown the budget by `interval` tokens.
    if c < floor.saturating_add(slack.max(1)) {
        return Ok(KeepPlan::unchanged(lens));
    }
    let bs = lens.block_size as u64;
    let released = (c - floor) / bs;
    let evicted = released * bs;
    let kept = c - evicted;
    Ok(KeepPlan {
        kept_tokens: kept,
        evicted_tokens: evicted,
        released_blocks: released,
        selected_tokens: kept - p,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::from_toml_str(text).unwrap()
    }

    fn lens(l: u64, c: u64, p: u64, b: u32) -> SequenceLengths {
        SequenceLengths {
            logical_len: l,
            cached_len: c,
            protected_len: p,
            block_size: b,
        }
    }

    const SNAP: &str = "[sparsity]\npolicy='snapkv'\nbudget_tokens=1024\nsink_tokens=4\nrecent_tokens=64\nwindow=32\n";

    #[test]
    fn prefill_evicts_whole_blocks_down_to_budget() {
        let plan = plan_keep_count(&cfg(SNAP), Phase::Prefill, &lens(5000, 5000, 0, 16)).unwrap();
        // 5000 - 1024 = 3976 = 248 blocks of 16 + 8: 248 blocks go, 1032 tokens stay.
        assert_eq!(plan.released_blocks, 248);
        assert_eq!(plan.evicted_tokens, 248 * 16);
        assert_eq!(plan.kept_tokens, 1032);
        assert_eq!(plan.selected_tokens, 1032);
    }

    #[test]
    fn short_sequences_and_quest_are_left_alone() {
        let p = plan_keep_count(&cfg(SNAP), Phase::Prefill, &lens(1000, 1000, 0, 16)).unwrap();
        assert_eq!((p.kept_tokens, p.released_blocks), (1000, 0));
        let min = cfg("[sparsity]\npolicy='knorm'\nbudget_tokens=100\nmin_length=4096\n");
        let p = plan_keep_count(&min, Phase::Prefill, &lens(4000, 4000, 0, 16)).unwrap();
        assert_eq!(p.released_blocks, 0);
        let q = cfg("[sparsity]\npolicy='quest'\nbudget_tokens=256\n");
        let p = plan_keep_count(&q, Phase::Prefill, &lens(9000, 9000, 0, 16)).unwrap();
        assert_eq!(p.released_blocks, 0);
    }

    #[test]
    fn protected_prefix_is_kept_and_excluded_from_selection() {
        let plan =
            plan_keep_count(&cfg(SNAP), Phase::Prefill, &lens(4096, 4096, 2048, 128)).unwrap();
        assert!(plan.kept_tokens >= 2048 + 64);
        assert_eq!(plan.selected_tokens, plan.kept_tokens - 2048);
        // The budget counts the prefix: floor = 2048 + 64 recent = 2112, rounded up to whole
        // evicted blocks of 128: 15 blocks go, 2176 tokens stay.
        assert_eq!(plan.released_blocks, 15);
        assert_eq!(plan.kept_tokens, 2176);
        // A prefix larger than the budget still stays whole.
        let plan =
            plan_keep_count(&cfg(SNAP), Phase::Prefill, &lens(4096, 4096, 3968, 128)).unwrap();
        assert_eq!(plan.kept_tokens, 4096);
    }

    #[test]
    fn ratio_budget_rounds_up_and_decode_waits_for_interval() {
        let c = cfg("[sparsity]\npolicy='streaming'\nbudget_ratio=0.25\nsink_tokens=4\nrecent_tokens=16\n[decode]\npolicy='streaming'\ninterval=64\nbudget_tokens=256\n");
        let p = plan_keep_count(&c, Phase::Prefill, &lens(1001, 1001, 0, 16)).unwrap();
        // ceil(0.25 * 1001) = 251; 750 tokens over = 46 blocks.
        assert_eq!(p.kept_tokens, 1001 - 46 * 16);
        assert!(p.kept_tokens >= 251);
        let wait = plan_keep_count(&c, Phase::Decode, &lens(2000, 300, 0, 16)).unwrap();
        assert_eq!(wait.released_blocks, 0, "300 < 256 + 64: not due yet");
        let due = plan_keep_count(&c, Phase::Decode, &lens(2000, 320, 0, 16)).unwrap();
        assert_eq!((due.released_blocks, due.kept_tokens), (4, 256));
    }

    #[test]
    fn extreme_lengths_do_not_overflow() {
        // Found by the abi_args fuzz target: u64::MAX lengths overflowed `floor + interval`.
        let c = cfg("[sparsity]\npolicy='knorm'\nbudget_ratio=1.0\n[decode]\npolicy='streaming'\ninterval=7\n");
        let m = u64::MAX;
        let plan = plan_keep_count(&c, Phase::Decode, &lens(m, m, 0, u32::MAX)).unwrap();
        assert_eq!(plan.kept_tokens + plan.evicted_tokens, m);
        let plan = plan_keep_count(&cfg(SNAP), Phase::Prefill, &lens(m, m - 5, 0, 1)).unwrap();
        assert_eq!(plan.kept_tokens, 1024);
    }

    #[test]
    fn bad_lengths_name_the_field() {
        let c = cfg(SNAP);
        for (l, msg) in [
            (lens(10, 20, 0, 16), "cached_len"),
            (lens(20, 20, 32, 16), "protected_len"),
            (lens(40, 40, 8, 16), "multiple of block_size"),
            (lens(40, 40, 0, 0), "block_size"),
        ] {
            let e = plan_keep_count(&c, Phase::Prefill, &l).unwrap_err();
            assert_eq!(e.status, crate::Status::InvalidArgument);
            assert!(e.message.contains(msg), "{}", e.message);
        }
    }
}
