//! Keep-count planning: how many cached tokens a sequence keeps at a compression event.
//!
//! The count is policy-determined and the choice data-determined (docs/design.md, "Layers"): this module
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

use crate::config::{Config, Sparsity};
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
    ensure_arg!(
        phase != Phase::PrefillChunk,
        "phase = KVS_PHASE_PREFILL_CHUNK needs the prompt's length; plan it with kvs_plan_prefill_chunk"
    );
    let Some(sp) = &config.sparsity else {
        return Ok(KeepPlan::unchanged(lens)); // selection only: nothing is evicted
    };
    let (budget, tail, slack) = match (phase, &config.decode) {
        (Phase::Decode, None) => return Ok(KeepPlan::unchanged(lens)),
        (Phase::Decode, Some(d)) => (d.budget, d.protected_tail(sp), d.interval as u64),
        _ => (sp.budget, sp.protected_tail(), 0u64),
    };
    if lens.logical_len < sp.min_length as u64 {
        return Ok(KeepPlan::unchanged(lens));
    }
    Ok(evict(
        sp,
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
    let (Some(sp), Some(pf)) = (&config.sparsity, &config.prefill) else {
        return Ok(KeepPlan::unchanged(lens));
    };
    if prompt_len < sp.min_length as u64 {
        return Ok(KeepPlan::unchanged(lens));
    }
    let tail = pf.protected_tail(sp);
    Ok(evict(
        sp,
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
///
/// The engine plans by one rule (kvsieve's vLLM scheduler; `tests::simulate` replays it and a
/// property test holds this bound to it): a chunk event may follow any chunk but one that
/// computes part of the prefill-end SnapKV window (its queries are recorded instead), the
/// prefill-end event follows the last chunk, and a decode event may follow every generated
/// token (SnapKV's once the queries of its window were recorded by consecutive decode steps).
/// Each term below is the most the cache holds in one of those stretches.
pub fn max_cached_tokens(config: &Config, max_len: u64, chunk: u64, block_size: u32) -> u64 {
    let (Some(sp), Some(pf), Some(d)) = (&config.sparsity, &config.prefill, &config.decode) else {
        return max_len;
    };
    if config.requests.allow_opt_out {
        return max_len;
    }
    let bs = block_size.max(1) as u64;
    let r = &config.requests;
    // The largest budget any request may hold: the config's, or its own within [requests].
    let own = (r.max_budget_tokens as u64).max((r.max_budget_ratio * max_len as f64).ceil() as u64);
    let sinks = sp.sink_tokens as u64;
    // What an event of each phase cuts down to at most: the budget, never below what it keeps.
    let floor =
        |b: crate::config::Budget, tail: u32| b.tokens(max_len).max(own).max(sinks + tail as u64);
    let (pf_floor, end_floor) = (
        floor(pf.budget, pf.protected_tail(sp)),
        floor(sp.budget, sp.protected_tail()),
    );
    let d_floor = floor(d.budget, d.protected_tail(sp));
    // Between events the cache stays below floor + interval, and an event leaves it under
    // floor + one block (whole blocks are evicted).
    let before_chunk = pf_floor + (pf.interval as u64).max(bs) - 1;
    // The chunks that compute the end window run no chunk event: the first of them starts
    // fewer than `chunk + window` tokens before the prompt's end.
    let window = if sp.policy == crate::config::Policy::SnapKv {
        sp.window as u64
    } else {
        0
    };
    let prefill = before_chunk + chunk + window.saturating_sub(1);
    // A SnapKV decode event also waits until its window's queries were recorded by `wait`
    // consecutive decode steps (decoding's start, a preemption, or a step that recorded nothing
    // starts them again).
    let wait = d.window(sp) as u64;
    // After the prefill-end event (which cuts only what prefilling left above its floor), one
    // generated token (or SnapKV's window of them) before a decode event can run.
    let end = (end_floor + bs - 1).min(prefill) + wait.max(1);
    let decode = d_floor + (d.interval as u64).max(bs) + wait;
    // Below min_length nothing is compressed until the sequence reaches it; a prompt shorter
    // than min_length starts decoding uncompressed, so a SnapKV decode event may then still wait
    // for its window: up to `wait` tokens past the longest such prompt (min_length - 1).
    let short = sp.min_length as u64 + wait.max(1) - 1;
    prefill.max(end).max(decode).max(short).min(max_len)
}

/// Evict whole blocks down to `target` (never below the prefix, the sinks and the `tail`),
/// once the cache holds at least `slack` (>= 1) tokens more than that.
fn evict(sp: &Sparsity, lens: &SequenceLengths, target: u64, tail: u32, slack: u64) -> KeepPlan {
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
    fn short_sequences_and_selection_only_are_left_alone() {
        let p = plan_keep_count(&cfg(SNAP), Phase::Prefill, &lens(1000, 1000, 0, 16)).unwrap();
        assert_eq!((p.kept_tokens, p.released_blocks), (1000, 0));
        let min = cfg("[sparsity]\npolicy='knorm'\nbudget_tokens=100\nmin_length=4096\n");
        let p = plan_keep_count(&min, Phase::Prefill, &lens(4000, 4000, 0, 16)).unwrap();
        assert_eq!(p.released_blocks, 0);
        let q = cfg("[selection]\npolicy='quest'\nbudget_tokens=256\n");
        for phase in [Phase::Prefill, Phase::Decode] {
            let p = plan_keep_count(&q, phase, &lens(9000, 9000, 0, 16)).unwrap();
            assert_eq!((p.kept_tokens, p.released_blocks), (9000, 0));
        }
        let p = plan_prefill_chunk(&q, &lens(4096, 4096, 0, 16), 9000).unwrap();
        assert_eq!(p.released_blocks, 0);
        assert_eq!(max_cached_tokens(&q, 9000, 512, 16), 9000);
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

    /// The engine's planning rule (kvsieve's vLLM scheduler, `_plan_request`) replayed on
    /// lengths: the prompt computed in chunks of `chunks(step)` tokens (at most the engine's
    /// chunk), a chunk event after every chunk but those that compute part of the prefill-end
    /// SnapKV window, the prefill-end event after the last, then `generate` decode steps with a
    /// decode event planned after each. Returns the most tokens cached at once.
    fn simulate(
        config: &Config,
        prompt: u64,
        generate: u64,
        bs: u32,
        mut chunks: impl FnMut(usize) -> u64,
    ) -> u64 {
        let sp = config.sparsity.as_ref().expect("an eviction config");
        let window = match sp.policy {
            crate::config::Policy::SnapKv => sp.window as u64,
            _ => 0,
        };
        let (mut computed, mut cached, mut peak) = (0u64, 0u64, 0u64);
        let mut step = 0;
        while computed < prompt {
            let n = chunks(step).clamp(1, prompt - computed);
            step += 1;
            let lo = computed;
            computed += n;
            cached += n;
            peak = peak.max(cached);
            let captures = window > 0 && lo.max(prompt.saturating_sub(window)) < computed;
            let l = lens(computed, cached, 0, bs);
            let plan = if computed == prompt {
                plan_keep_count(config, Phase::Prefill, &l).unwrap()
            } else if captures {
                continue;
            } else {
                plan_prefill_chunk(config, &l, prompt).unwrap()
            };
            cached = plan.kept_tokens;
        }
        // Decode SnapKV records a step's queries while an event falls due within its window
        // (`ring_from`: the first position of the run recorded), and fires once the run holds
        // the whole window.
        let ring = config.decode.as_ref().map_or(0, |d| d.window(sp) as u64);
        let mut ring_from = None;
        for _ in 0..generate {
            computed += 1;
            cached += 1;
            peak = peak.max(cached);
            if ring > 0 {
                let ahead = lens(computed + ring - 1, cached + ring - 1, 0, bs);
                if plan_keep_count(config, Phase::Decode, &ahead)
                    .unwrap()
                    .released_blocks
                    == 0
                {
                    ring_from = None;
                    continue;
                }
                if computed - *ring_from.get_or_insert(computed - 1) < ring {
                    continue;
                }
            }
            cached = plan_keep_count(config, Phase::Decode, &lens(computed, cached, 0, bs))
                .unwrap()
                .kept_tokens;
        }
        peak
    }

    /// The most any request served with `config` holds in `simulate`, searched over prompt
    /// lengths in `prompts`: every size of its first chunk (vLLM gives a request less than a
    /// whole chunk when others share the step) then whole chunks, with one generated token;
    /// and whole chunks with a generation long enough for decode events to repeat.
    fn worst_case(
        config: &Config,
        max_len: u64,
        chunk: u64,
        bs: u32,
        prompts: std::ops::Range<u64>,
    ) -> u64 {
        let mut worst = 0;
        for p in prompts {
            for first in 1..=chunk.min(p) {
                worst = worst.max(simulate(config, p, 1, bs, |step| {
                    if step == 0 {
                        first
                    } else {
                        chunk
                    }
                }));
            }
            let generate = (max_len - p).min(3 * (bs as u64 + 512));
            worst = worst.max(simulate(config, p, generate, bs, |_| chunk));
        }
        worst
    }

    #[test]
    fn the_bound_per_sequence_needs_every_phase_bounded() {
        let bounded = "[sparsity]\npolicy='streaming'\nbudget_tokens=256\nrecent_tokens=32\nmin_length=256\n\
                       [prefill]\npolicy='streaming'\n[decode]\npolicy='streaming'\ninterval=32\n\
                       [requests]\nallow_opt_out=false\nmax_budget_tokens=512\nmax_budget_ratio=0.1\n";
        // 8192 tokens at most, chunks of 128, blocks of 32: a request may ask for 820 tokens
        // (10% of 8192, rounded up), and holds that + one block - 1 before a chunk, then the chunk.
        assert_eq!(
            max_cached_tokens(&cfg(bounded), 8192, 128, 32),
            820 + 31 + 128
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
    fn the_bound_counts_a_snapkv_decode_window_after_a_prompt_under_min_length() {
        // The property test's case: a 2,005-token prompt under min_length (2,061) decodes
        // uncompressed, and its first SnapKV decode event waits for 57 generated queries, so it
        // holds 2,062 tokens; the longest prompt under min_length reaches min_length + 56.
        let c = cfg("[sparsity]\npolicy='streaming'\nbudget_tokens=240\nwindow=57\nrecent_tokens=0\nsink_tokens=0\n\
                     min_length=2061\n[prefill]\npolicy='streaming'\n[decode]\npolicy='snapkv'\ninterval=1\n\
                     [requests]\nallow_opt_out=false\nmax_budget_tokens=340\nmax_budget_ratio=0.1\n");
        assert_eq!(simulate(&c, 2005, 57, 1, |_| 16), 2005 + 57);
        let bound = max_cached_tokens(&c, 4096, 16, 1);
        assert_eq!(bound, 2061 + 57 - 1);
        assert_eq!(
            worst_case(&c, 4096, 16, 1, 2000..2061),
            bound,
            "reached by the prompt just under min_length"
        );
    }

    #[test]
    fn the_bound_counts_the_chunk_that_computes_the_end_window() {
        // The review's case: budget 1000, chunks of 256, blocks of 16, SnapKV window 32. A
        // 1,809-token prompt's 8th chunk computes part of the window, so it runs no chunk event,
        // and the last chunk adds the rest of the window before the prefill-end event.
        let c = cfg("[sparsity]\npolicy='snapkv'\nbudget_tokens=1000\nwindow=32\n[prefill]\npolicy='snapkv'\n\
                     [decode]\npolicy='streaming'\ninterval=64\n[requests]\nallow_opt_out=false\nmax_budget_tokens=1000\n\
                     max_budget_ratio=0.1\n");
        let peak = simulate(&c, 1809, 8, 16, |_| 256);
        assert_eq!(peak, 1281);
        let bound = max_cached_tokens(&c, 4096, 256, 16);
        assert!(peak <= bound, "{peak} > {bound}");
        let worst = worst_case(&c, 4096, 256, 16, 1200..1700);
        assert_eq!(worst, bound, "the bound is reached by some prompt");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]
        /// No request, whatever its own budget within `[requests]`, prompt, chunking and length
        /// of generation, ever holds more than `max_cached_tokens`.
        #[test]
        fn no_request_holds_more_than_the_bound(
            policies in (0usize..3, 0usize..3, 0usize..3),
            budget in 240u32..2048, ratio in proptest::option::of(0.05f64..0.9),
            chunk in 16u64..1024, bs in proptest::sample::select(vec![1u32, 8, 16, 32, 128]),
            window in 1u32..96, recent in 0u32..128, sinks in 0u32..16,
            intervals in (1u32..300, 1u32..300), min_length in 0u32..3000,
            own in (0usize..3, 0.1f64..0.6),
            prompt in 1u64..6000, generate in 0u64..700, schedule in proptest::collection::vec(1u64..1024, 1..6),
        ) {
            let names = ["streaming", "snapkv", "knorm"];
            let budget_line = match ratio {
                Some(r) => format!("budget_ratio = {r}"),
                None => format!("budget_tokens = {budget}"),
            };
            let text = format!(
                "[sparsity]\npolicy = '{}'\n{budget_line}\nwindow = {window}\nrecent_tokens = {recent}\n\
                 sink_tokens = {sinks}\nmin_length = {min_length}\n[prefill]\npolicy = '{}'\ninterval = {}\n\
                 [decode]\npolicy = '{}'\ninterval = {}\n[requests]\nallow_opt_out = false\n\
                 max_budget_tokens = {}\nmin_budget_ratio = 0.01\nmax_budget_ratio = {}\n",
                names[policies.0], names[policies.1], intervals.0, names[policies.2], intervals.1,
                budget + 100, own.1,
            );
            let base = cfg(&text);
            let max_len = 8192u64;
            let bound = max_cached_tokens(&base, max_len, chunk, bs);
            let request = match own.0 {
                0 => base.clone(),
                1 => base.for_request(&crate::config::RequestOptions {
                    opt_out: false, budget: Some(crate::config::Budget::Tokens(budget + 100)) }).unwrap(),
                _ => base.for_request(&crate::config::RequestOptions {
                    opt_out: false, budget: Some(crate::config::Budget::Ratio(own.1)) }).unwrap(),
            };
            let generate = generate.min(max_len - prompt.min(max_len));
            let peak = simulate(&request, prompt.min(max_len), generate, bs,
                                |step| schedule[step % schedule.len()].min(chunk));
            proptest::prop_assert!(peak <= bound, "peak {} > bound {} ({})", peak, bound, text);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]
        /// With token budgets the bound is the true maximum: some prompt reaches it exactly.
        #[test]
        fn the_bound_is_reached(
            snapkv in proptest::bool::ANY, budgets in (48u32..160, 48u32..160, 48u32..160), chunk in 4u64..40,
            bs in proptest::sample::select(vec![1u32, 4, 8, 16]), window in 1u32..24,
            recent in 0u32..24, sinks in 0u32..8, intervals in (1u32..40, 1u32..60), min_length in 0u32..300,
        ) {
            let text = format!(
                "[sparsity]\npolicy = '{}'\nbudget_tokens = {}\nwindow = {window}\nrecent_tokens = {recent}\n\
                 sink_tokens = {sinks}\nmin_length = {min_length}\n[prefill]\npolicy = 'knorm'\ninterval = {}\n\
                 budget_tokens = {}\n[decode]\npolicy = 'streaming'\ninterval = {}\nbudget_tokens = {}\n\
                 [requests]\nallow_opt_out = false\nmax_budget_tokens = 40\nmax_budget_ratio = 0.01\n",
                if snapkv { "snapkv" } else { "streaming" }, budgets.0, intervals.0, budgets.1, intervals.1, budgets.2,
            );
            let c = cfg(&text);
            let bound = max_cached_tokens(&c, 4096, chunk, bs);
            proptest::prop_assert_eq!(worst_case(&c, 4096, chunk, bs, 1..(bound + 2 * chunk + 64)), bound, "{}", text);
        }
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
