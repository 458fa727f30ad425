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

/// When the event happens: at the end of prefill (`[sparsity]`), while decoding (`[decode]`),
/// or between prefill chunks (`[prefill]`, planned by `plan_prefill_chunk`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prefill = 0,
    Decode = 1,
    PrefillChunk = 2,
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

/// Plan one sequence's compression event at the end of prefill or while decoding. Returns an
/// unchanged plan when no event is due. Chunk events need the prompt's length:
/// `plan_prefill_chunk`.
pub fn plan_keep_count(config: &Config, phase: Phase, lens: &SequenceLengths) -> Result<KeepPlan> {
    check(lens)?;
    let sp = &config.sparsity;
    let (policy, budget, tail, slack) = match phase {
        Phase::Prefill => (sp.policy, sp.budget, sp.protected_tail(), 0u64),
        Phase::Decode => match &config.decode {
            None => return Ok(KeepPlan::unchanged(lens)),
            Some(d) => (d.policy, d.budget, sp.recent_tokens, d.interval as u64),
        },
        Phase::PrefillChunk => {
            return Err(crate::error::Error::invalid_arg(
                "phase = KVS_PHASE_PREFILL_CHUNK needs the prompt's length; plan it with kvs_plan_prefill_chunk",
            ))
        }
    };
    if !policy.evicts() || lens.logical_len < sp.min_length as u64 {
        return Ok(KeepPlan::unchanged(lens));
    }
    Ok(evict(
        config,
        lens,
        budget.tokens(lens.logical_len),
        tail,
        slack,
    ))
}

/// Plan an event between prefill chunks (`[prefill]`): `lens` as computed so far, `prompt_len`
/// the whole prompt (a ratio budget is of it; `min_length` applies to it). Due once the cache
/// has outgrown the budget by `interval` tokens; unchanged otherwise or without `[prefill]`.
pub fn plan_prefill_chunk(
    config: &Config,
    lens: &SequenceLengths,
    prompt_len: u64,
) -> Result<KeepPlan> {
    check(lens)?;
    ensure_arg!(
        prompt_len >= lens.logical_len,
        "prompt_len = {} is less than logical_len = {}; pass the whole prompt's length (chunk events run \
         while it is prefilled)",
        prompt_len,
        lens.logical_len
    );
    let sp = &config.sparsity;
    let Some(pf) = &config.prefill else {
        return Ok(KeepPlan::unchanged(lens));
    };
    if prompt_len < sp.min_length as u64 {
        return Ok(KeepPlan::unchanged(lens));
    }
    let tail = pf.protected_tail(sp);
    Ok(evict(
        config,
        lens,
        pf.budget.tokens(prompt_len),
        tail,
        pf.interval as u64,
    ))
}

/// The most cached tokens one sequence of at most `max_len` tokens can hold at once when served
/// with `config`, prefilled in chunks of at most `chunk` tokens: what an engine may reserve per
/// sequence instead of `max_len`. Bounded only when every phase is: chunk events (`[prefill]`),
/// decode events (`[decode]`), and no request may opt out (`requests.allow_opt_out = false`);
/// a request's own budget counts up to `[requests]`' largest. Otherwise `max_len`.
pub fn max_cached_tokens(config: &Config, max_len: u64, chunk: u64, block_size: u32) -> u64 {
    let (Some(pf), Some(d)) = (&config.prefill, &config.decode) else {
        return max_len;
    };
    if config.requests.allow_opt_out || !config.sparsity.policy.evicts() {
        return max_len;
    }
    let bs = block_size.max(1) as u64;
    let sp = &config.sparsity;
    let r = &config.requests;
    // The largest budget any request may hold: the config's, or its own within [requests].
    let own = (r.max_budget_tokens as u64).max((r.max_budget_ratio * max_len as f64).ceil() as u64);
    let budget = |b: crate::config::Budget| b.tokens(max_len).max(own);
    let always = sp.sink_tokens as u64 + sp.protected_tail().max(pf.protected_tail(sp)) as u64;
    // Before an event the cache may hold its floor + interval - 1 + one more chunk (or token),
    // and eviction leaves up to a block - 1 over the floor.
    let prefill = budget(pf.budget).max(always) + pf.interval as u64 + chunk + bs;
    let decode = budget(d.budget).max(always) + d.interval as u64 + bs;
    // Below min_length nothing is compressed until the sequence reaches it.
    let short = sp.min_length as u64 + chunk + d.interval as u64 + bs;
    prefill.max(decode).max(short).min(max_len)
}

/// Evict whole blocks down to `target` (never below the prefix, the sinks and the `tail`),
/// once the cache holds at least `slack` (>= 1) tokens more than that.
fn evict(config: &Config, lens: &SequenceLengths, target: u64, tail: u32, slack: u64) -> KeepPlan {
    let sp = &config.sparsity;
    let c = lens.cached_len;
    let p = lens.protected_len;
    // Never below what is always kept: the prefix, the sinks, and the protected tail.
    // Saturating: lengths come from the engine and may be anything up to u64::MAX.
    let always = p
        .max(sp.sink_tokens as u64)
        .saturating_add(tail as u64)
        .min(c);
    let floor = target.max(always).max(p);
    // Decode and chunk events wait until the cache has outgrown the budget by `slack` tokens.
    if c < floor.saturating_add(slack.max(1)) {
        return KeepPlan::unchanged(lens);
    }
    let bs = lens.block_size as u64;
    let released = (c - floor) / bs;
    let evicted = released * bs;
    let kept = c - evicted;
    KeepPlan {
        kept_tokens: kept,
        evicted_tokens: evicted,
        released_blocks: released,
        selected_tokens: kept - p,
    }
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
    fn chunk_events_bound_the_cache_by_the_whole_prompts_budget() {
        let c = cfg("[sparsity]\npolicy='snapkv'\nbudget_ratio=0.25\nmin_length=1024\n[prefill]\npolicy='snapkv'\n");
        // 8192-token prompt, 25% = 2048 tokens; chunks of 512 tokens, blocks of 16.
        let (prompt, chunk, bs) = (8192u64, 512u64, 16u32);
        let (mut logical, mut cached, mut peak, mut events) = (0u64, 0u64, 0u64, 0);
        while logical < prompt {
            logical += chunk;
            cached += chunk;
            peak = peak.max(cached);
            let p = plan_prefill_chunk(&c, &lens(logical, cached, 0, bs), prompt).unwrap();
            assert_eq!(p.kept_tokens + p.evicted_tokens, cached);
            if p.released_blocks > 0 {
                events += 1;
                assert!(p.kept_tokens >= 2048 && p.kept_tokens < 2048 + bs as u64);
                cached = p.kept_tokens;
            }
        }
        // Nothing is evicted until the budget is reached; after that every chunk is compressed.
        assert_eq!(events, (prompt - 2048) / chunk);
        assert!(
            peak < 2048 + chunk + bs as u64,
            "peak {peak}: budget + one chunk + one block"
        );
        // Short prompts (min_length) and configs without [prefill] never see chunk events.
        assert_eq!(
            plan_prefill_chunk(&c, &lens(900, 900, 0, bs), 1000)
                .unwrap()
                .released_blocks,
            0
        );
        let plain = cfg(SNAP);
        assert_eq!(
            plan_prefill_chunk(&plain, &lens(4096, 4096, 0, bs), 8192)
                .unwrap()
                .released_blocks,
            0
        );
        // The interval delays the event, and the prompt must cover what was computed.
        let lazy = cfg("[sparsity]\npolicy='knorm'\nbudget_tokens=512\n[prefill]\npolicy='knorm'\ninterval=256\n");
        assert_eq!(
            plan_prefill_chunk(&lazy, &lens(700, 700, 0, bs), 4096)
                .unwrap()
                .released_blocks,
            0
        );
        assert_eq!(
            plan_prefill_chunk(&lazy, &lens(768, 768, 0, bs), 4096)
                .unwrap()
                .kept_tokens,
            512
        );
        let e = plan_prefill_chunk(&lazy, &lens(768, 768, 0, bs), 700).unwrap_err();
        assert!(e.message.contains("prompt_len = 700"), "{}", e.message);
        let e = plan_keep_count(&lazy, Phase::PrefillChunk, &lens(768, 768, 0, bs)).unwrap_err();
        assert!(
            e.message.contains("kvs_plan_prefill_chunk"),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_bound_per_sequence_needs_every_phase_bounded() {
        let bounded = "[sparsity]\npolicy='streaming'\nbudget_tokens=256\nrecent_tokens=32\nmin_length=256\n\
                       [prefill]\npolicy='streaming'\n[decode]\npolicy='streaming'\ninterval=32\n\
                       [requests]\nallow_opt_out=false\nmax_budget_tokens=512\nmax_budget_ratio=0.1\n";
        // 8192 tokens at most, chunks of 128, blocks of 32: a request may ask for 820 tokens
        // (10% of 8192, rounded up), and holds that + one chunk + one block + the interval at most.
        assert_eq!(
            max_cached_tokens(&cfg(bounded), 8192, 128, 32),
            820 + 1 + 128 + 32
        );
        // Any phase left unbounded, or opting out allowed: the whole length.
        for unbounded in [
            bounded.replace("allow_opt_out=false", "allow_opt_out=true"),
            bounded.replace("[prefill]\npolicy='streaming'\n", ""),
            bounded.replace("[decode]\npolicy='streaming'\ninterval=32\n", ""),
        ] {
            assert_eq!(max_cached_tokens(&cfg(&unbounded), 8192, 128, 32), 8192);
        }
        assert_eq!(
            max_cached_tokens(&cfg(bounded), 600, 128, 32),
            600,
            "never above max_len"
        );
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
