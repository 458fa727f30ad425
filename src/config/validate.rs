//! Raw config → validated `Config`. Every error names the key (`section.key`), the value given,
//! what is allowed, and the line it came from.

use super::raw::{RawConfig, RawDecode, RawPrefill, RawRequests, RawSelection, RawSparsity};
use super::{Budget, Config, Decode, Policy, Pooling, Prefill, Requests, Selection, Sparsity};
use crate::error::{Error, Result};
use crate::status::Status;
use std::fmt::Display;
use toml::Spanned;

const DEFAULT_SINK_TOKENS: u32 = 4;
const DEFAULT_RECENT_TOKENS: u32 = 64;
const DEFAULT_WINDOW: u32 = 32;
// 31, not SnapKV's 7 (or kvpress's 5): on SmolLM2 a narrower pool keeps the tokens the question's
// window attends to and drops what follows them, the rest of the answer ("8883585" -> "888"); over
// the accuracy suite 31 found 9/18/18/18 of 36 at 10/25/50/75% against 8/14/16/18 with 15
// (bench/README.md, "Choosing defaults").
const DEFAULT_POOL_KERNEL: u32 = 31;
/// Page tables are int32 (FlashInfer, vLLM): token counts past this cannot be addressed.
const MAX_TOKENS: i64 = i32::MAX as i64;
const MAX_POOL_KERNEL: i64 = 255;
/// A request may ask for 10% to all of its sequence unless `[requests]` says otherwise.
const DEFAULT_MIN_BUDGET_RATIO: f64 = 0.1;
/// Quest (Tang et al. 2024) leaves the first two layers dense: their attention is spread wide.
const DEFAULT_DENSE_LAYERS: u32 = 2;
/// `[selection] spread`'s default, measured on SmolLM2 (bench/README.md, "Block selection"):
/// Quest's full bound (1.0) ranked a needle's block too low in some layers.
const DEFAULT_SPREAD: f32 = 0.5;
/// `[decode] carry`'s default for SnapKV: on held-out prose (bench/README.md, "Decode-time
/// SnapKV", two tuning splits) ranking by max(now, 0.5 x last event's score) lowered the NLL
/// increase on both; unpooled, 0.25 and 0.75 were worse (0.9 was tried pooled 5 wide only).
const DEFAULT_DECODE_CARRY: f32 = 0.5;
/// `[decode] pool_kernel`'s default for SnapKV: no pooling. With scores carried, each event's
/// own scores unpooled did best on the same passages (pooling spreads a score to neighbours,
/// and carrying then keeps the spread); the prefill default (31) serves questions in prompts.
const DEFAULT_DECODE_POOL_KERNEL: u32 = 1;
/// Checked against the model's layer count at start-up; this only bounds the number.
const MAX_DENSE_LAYERS: i64 = 1 << 16;
/// `[selection] key_ranges`' largest: a range per token of a 64-token block (its divisibility by
/// the block size is checked where the engine's block size is known).
const MAX_KEY_RANGES: i64 = 64;

struct Source<'a> {
    text: &'a str,
}

impl Source<'_> {
    fn line<T>(&self, v: &Spanned<T>) -> usize {
        let start = v.span().start.min(self.text.len());
        self.text[..start].bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn bad<T: Display>(&self, key: &str, v: &Spanned<T>, allowed: impl Display) -> Error {
        Error::new(
            Status::ConfigInvalid,
            format!(
                "config: {key} = {} (line {}) is not allowed; {allowed}",
                v.get_ref(),
                self.line(v)
            ),
        )
    }

    fn missing(&self, key: &str, section_line: usize, hint: &str) -> Error {
        Error::new(
            Status::ConfigInvalid,
            format!("config: {key} is missing (section at line {section_line}); {hint}"),
        )
    }

    /// An integer key in `[lo, hi]`, or `default` when absent.
    fn int(
        &self,
        key: &str,
        v: &Option<Spanned<i64>>,
        lo: i64,
        hi: i64,
        default: u32,
    ) -> Result<u32> {
        match v {
            None => Ok(default),
            Some(s) if (lo..=hi).contains(s.get_ref()) => Ok(*s.get_ref() as u32),
            Some(s) => Err(self.bad(key, s, format!("allowed: {lo} <= {key} <= {hi}"))),
        }
    }

    fn policy(&self, key: &str, v: &Spanned<String>, allowed: &[Policy]) -> Result<Policy> {
        let names: Vec<&str> = allowed.iter().map(|p| p.name()).collect();
        let list = names.join(", ");
        match v.get_ref().as_str() {
            "h2o" | "tova" => Err(self.bad(
                key,
                &quoted(v),
                format!(
                    "\"{}\" is not implemented in this version; allowed here: {list}",
                    v.get_ref()
                ),
            )),
            name => allowed
                .iter()
                .copied()
                .find(|p| p.name() == name)
                .ok_or_else(|| self.bad(key, &quoted(v), format!("allowed: {list}"))),
        }
    }

    /// A SnapKV pooling width: odd, in `[1, MAX_POOL_KERNEL]`, or `default` (odd) when absent.
    fn pool_kernel(&self, key: &str, v: &Option<Spanned<i64>>, default: u32) -> Result<u32> {
        let width = self.int(key, v, 1, MAX_POOL_KERNEL, default)?;
        match v {
            Some(given) if width % 2 == 0 => Err(self.bad(
                key,
                given,
                "it must be odd so the pooling window is centred on the token (e.g. 5 or 7)",
            )),
            _ => Ok(width),
        }
    }

    /// A section's required `policy` key, one of `allowed` (the message lists them).
    fn required_policy(
        &self,
        key: &str,
        v: &Option<Spanned<String>>,
        allowed: &[Policy],
        section_line: usize,
    ) -> Result<Policy> {
        match v {
            Some(p) => self.policy(key, p, allowed),
            None => {
                let names: Vec<&str> = allowed.iter().map(|p| p.name()).collect();
                Err(self.missing(
                    key,
                    section_line,
                    &format!("set it to one of: {}", names.join(", ")),
                ))
            }
        }
    }

    /// Exactly one of `<section>.budget_tokens` / `<section>.budget_ratio`.
    fn budget(
        &self,
        section: &str,
        tokens: &Option<Spanned<i64>>,
        ratio: &Option<Spanned<f64>>,
    ) -> Result<Option<Budget>> {
        match (tokens, ratio) {
            (Some(t), Some(_)) => Err(self.bad(
                &format!("{section}.budget_tokens"),
                t,
                format!("set either {section}.budget_tokens or {section}.budget_ratio, not both"),
            )),
            (Some(_), None) => Ok(Some(Budget::Tokens(self.int(
                &format!("{section}.budget_tokens"),
                tokens,
                1,
                MAX_TOKENS,
                0,
            )?))),
            (None, Some(r)) => {
                let x = *r.get_ref();
                if x.is_finite() && x > 0.0 && x <= 1.0 {
                    Ok(Some(Budget::Ratio(x)))
                } else {
                    Err(self.bad(
                        &format!("{section}.budget_ratio"),
                        r,
                        format!("allowed: 0 < {section}.budget_ratio <= 1 (a fraction of the sequence length)"),
                    ))
                }
            }
            (None, None) => Ok(None),
        }
    }
}

fn quoted(v: &Spanned<String>) -> Spanned<String> {
    Spanned::new(v.span(), format!("\"{}\"", v.get_ref()))
}

pub(super) fn validate(raw: RawConfig, text: &str) -> Result<Config> {
    let src = Source { text };
    let sparsity = match &raw.sparsity {
        Some(s) => Some(sparsity(&src, s)?),
        None => None,
    };
    let selection = match &raw.selection {
        Some(s) => Some(selection(&src, s)?),
        None => None,
    };
    if sparsity.is_none() && selection.is_none() {
        return Err(Error::new(
            Status::ConfigInvalid,
            "config: neither [sparsity] (eviction) nor [selection] (Quest block selection) is set; add one, e.g. \
             [sparsity] with policy = \"snapkv\" and budget_ratio = 0.25, or [selection] with policy = \"quest\" \
             and budget_tokens = 1024",
        ));
    }
    let decode = match (&raw.decode, &sparsity) {
        (Some(d), Some(sp)) => Some(decode(&src, d, sp)?),
        (Some(d), None) => return Err(needs_sparsity(&src, "decode", d)),
        (None, _) => None,
    };
    let prefill = match (&raw.prefill, &sparsity) {
        (Some(p), Some(sp)) => Some(prefill(&src, p, sp)?),
        (Some(p), None) => return Err(needs_sparsity(&src, "prefill", p)),
        (None, _) => None,
    };
    // A request's absolute budget must hold what every phase always keeps.
    let floor = sparsity.as_ref().map_or(1, |sp| {
        let tail = sp
            .protected_tail()
            .max(decode.as_ref().map_or(0, |d| d.protected_tail(sp)))
            .max(prefill.as_ref().map_or(0, |p| p.protected_tail(sp)));
        sp.sink_tokens as u64 + tail as u64
    });
    let requests = requests(&src, raw.requests.as_ref(), floor)?;
    Ok(Config {
        sparsity,
        decode,
        prefill,
        selection,
        requests,
    })
}

/// `[decode]` and `[prefill]` are eviction events: they keep `[sparsity]`'s sinks and tail.
fn needs_sparsity<T>(src: &Source, section: &str, at: &Spanned<T>) -> Error {
    Error::new(
        Status::ConfigInvalid,
        format!(
            "config: [{section}] (line {}) evicts, and eviction is configured by [sparsity] (its policy, budget, \
             sink and recent tokens); add a [sparsity] section or drop [{section}]",
            src.line(at)
        ),
    )
}

fn selection(src: &Source, section: &Spanned<RawSelection>) -> Result<Selection> {
    let s = section.get_ref();
    let line = src.line(section);
    let policy = src.required_policy("selection.policy", &s.policy, &[Policy::Quest], line)?;
    let budget = src
        .budget("selection", &s.budget_tokens, &s.budget_ratio)?
        .ok_or_else(|| {
            src.missing(
                "selection.budget_tokens",
                line,
                "set selection.budget_tokens (tokens one decode step reads per sequence, e.g. 1024) or \
                 selection.budget_ratio (a fraction of the sequence, 0 < r <= 1)",
            )
        })?;
    let min_length = src.int("selection.min_length", &s.min_length, 0, MAX_TOKENS, 0)?;
    let dense_layers = src.int(
        "selection.dense_layers",
        &s.dense_layers,
        0,
        MAX_DENSE_LAYERS,
        DEFAULT_DENSE_LAYERS,
    )?;
    let spread = match &s.spread {
        None => DEFAULT_SPREAD,
        Some(v) if (0.0..=1.0).contains(v.get_ref()) => *v.get_ref() as f32,
        Some(v) => return Err(src.bad(
            "selection.spread",
            v,
            "allowed: 0 <= selection.spread <= 1 (1: Quest's upper bound over each block's key \
                 range; 0: the range's centre)",
        )),
    };
    let key_ranges = src.int("selection.key_ranges", &s.key_ranges, 1, MAX_KEY_RANGES, 1)?;
    Ok(Selection {
        policy,
        budget,
        min_length,
        dense_layers,
        spread,
        key_ranges,
    })
}

fn sparsity(src: &Source, section: &Spanned<RawSparsity>) -> Result<Sparsity> {
    let s = section.get_ref();
    let line = src.line(section);
    if let Some(p) = s.policy.as_ref().filter(|p| p.get_ref() == "quest") {
        return Err(src.bad(
            "sparsity.policy",
            &quoted(p),
            "quest evicts nothing: it selects, per decode step, the blocks attention reads. Configure it as its own \
             section, [selection] with policy = \"quest\" and budget_tokens (e.g. 1024), and here either an \
             eviction policy (streaming, snapkv, knorm) or no [sparsity] section at all",
        ));
    }
    let policy = src.required_policy(
        "sparsity.policy",
        &s.policy,
        &[Policy::Streaming, Policy::SnapKv, Policy::KNorm],
        line,
    )?;
    let budget = src
        .budget("sparsity", &s.budget_tokens, &s.budget_ratio)?
        .ok_or_else(|| {
            src.missing(
                "sparsity.budget_tokens",
                line,
                "set sparsity.budget_tokens (tokens kept) or sparsity.budget_ratio (fraction kept, 0 < r <= 1)",
            )
        })?;
    let sink_tokens = src.int(
        "sparsity.sink_tokens",
        &s.sink_tokens,
        0,
        MAX_TOKENS,
        DEFAULT_SINK_TOKENS,
    )?;
    let recent_tokens = src.int(
        "sparsity.recent_tokens",
        &s.recent_tokens,
        0,
        MAX_TOKENS,
        DEFAULT_RECENT_TOKENS,
    )?;
    let window = src.int("sparsity.window", &s.window, 1, MAX_TOKENS, DEFAULT_WINDOW)?;
    let pool_kernel =
        src.pool_kernel("sparsity.pool_kernel", &s.pool_kernel, DEFAULT_POOL_KERNEL)?;
    let pool = match &s.pool {
        None => Pooling::Max,
        Some(p) => match p.get_ref().as_str() {
            "max" => Pooling::Max,
            "avg" => Pooling::Avg,
            _ => return Err(src.bad("sparsity.pool", &quoted(p), "allowed: \"max\", \"avg\"")),
        },
    };
    let min_length = src.int("sparsity.min_length", &s.min_length, 0, MAX_TOKENS, 0)?;
    let out = Sparsity {
        policy,
        budget,
        sink_tokens,
        recent_tokens,
        window,
        pool_kernel,
        pool,
        min_length,
    };
    // Impossible combinations: an absolute budget must hold what is always kept.
    if let (Budget::Tokens(b), Some(bt)) = (budget, &s.budget_tokens) {
        if policy == Policy::SnapKv && window > b {
            let w = s
                .window
                .clone()
                .unwrap_or_else(|| Spanned::new(bt.span(), window as i64));
            return Err(src.bad(
                "sparsity.window",
                &w,
                format!("the observation window must fit in the budget: window <= sparsity.budget_tokens = {b}"),
            ));
        }
        let floor = sink_tokens as u64 + out.protected_tail() as u64;
        if (b as u64) < floor {
            return Err(src.bad(
                "sparsity.budget_tokens",
                bt,
                format!(
                    "it must be at least sink_tokens + {} = {sink_tokens} + {} = {floor}; raise the budget or lower those",
                    if policy == Policy::SnapKv { "max(recent_tokens, window)" } else { "recent_tokens" },
                    out.protected_tail(),
                ),
            ));
        }
    }
    Ok(out)
}

fn decode(src: &Source, section: &Spanned<RawDecode>, sparsity: &Sparsity) -> Result<Decode> {
    let d = section.get_ref();
    let line = src.line(section);
    let policy = src.required_policy(
        "decode.policy",
        &d.policy,
        &[Policy::Streaming, Policy::SnapKv, Policy::KNorm],
        line,
    )?;
    let interval = match &d.interval {
        Some(_) => src.int("decode.interval", &d.interval, 1, MAX_TOKENS, 0)?,
        None => {
            return Err(src.missing(
                "decode.interval",
                line,
                "set how many tokens the cache may grow past the budget before it is compressed again (e.g. 256)",
            ))
        }
    };
    let budget = src
        .budget("decode", &d.budget_tokens, &d.budget_ratio)?
        .unwrap_or(sparsity.budget);
    // SnapKV-only settings are refused for the other policies, naming what each does.
    if policy != Policy::SnapKv {
        let refuse = |key: &str, v: &dyn Display, span: std::ops::Range<usize>, does: &str| {
            src.bad(
                key,
                &Spanned::new(span, v.to_string()),
                format!(
                    "it {does} and decode.policy is \"{}\"; remove {key} or set decode.policy = \"snapkv\"",
                    policy.name()
                ),
            )
        };
        if let Some(v) = &d.pool_kernel {
            return Err(refuse(
                "decode.pool_kernel",
                v.get_ref(),
                v.span(),
                "pools SnapKV scores",
            ));
        }
        if let Some(v) = &d.carry {
            return Err(refuse(
                "decode.carry",
                v.get_ref(),
                v.span(),
                "carries SnapKV scores across decode events",
            ));
        }
    }
    let pool_kernel = if policy == Policy::SnapKv {
        src.pool_kernel(
            "decode.pool_kernel",
            &d.pool_kernel,
            DEFAULT_DECODE_POOL_KERNEL,
        )?
    } else {
        sparsity.pool_kernel
    };
    let carry =
        match &d.carry {
            None if policy == Policy::SnapKv => DEFAULT_DECODE_CARRY,
            None => 0.0,
            Some(v) if (0.0..=1.0).contains(v.get_ref()) => *v.get_ref() as f32,
            Some(v) => return Err(src.bad(
                "decode.carry",
                v,
                "allowed: 0 <= decode.carry <= 1 (0: each event ranks by its own window's scores)",
            )),
        };
    let out = Decode {
        policy,
        interval,
        budget,
        carry,
        pool_kernel,
    };
    if let (Budget::Tokens(b), Some(bt)) = (budget, &d.budget_tokens) {
        let floor = sparsity.sink_tokens as u64 + out.protected_tail(sparsity) as u64;
        if (b as u64) < floor {
            return Err(src.bad(
                "decode.budget_tokens",
                bt,
                format!(
                    "it must be at least sparsity.sink_tokens + {} = {floor}",
                    if policy == Policy::SnapKv {
                        "max(sparsity.recent_tokens, sparsity.window)"
                    } else {
                        "sparsity.recent_tokens"
                    }
                ),
            ));
        }
    }
    Ok(out)
}

/// `floor`: the fewest tokens a request's absolute budget may be (what is always kept).
fn requests(src: &Source, section: Option<&Spanned<RawRequests>>, floor: u64) -> Result<Requests> {
    let floor = floor.clamp(1, MAX_TOKENS as u64);
    let Some(section) = section else {
        return Ok(Requests {
            allow_opt_out: true,
            min_budget_tokens: floor as u32,
            max_budget_tokens: MAX_TOKENS as u32,
            min_budget_ratio: DEFAULT_MIN_BUDGET_RATIO,
            max_budget_ratio: 1.0,
        });
    };
    let r = section.get_ref();
    let min_tokens = src.int(
        "requests.min_budget_tokens",
        &r.min_budget_tokens,
        floor as i64,
        MAX_TOKENS,
        floor as u32,
    )?;
    let max_tokens = src.int(
        "requests.max_budget_tokens",
        &r.max_budget_tokens,
        min_tokens as i64,
        MAX_TOKENS,
        MAX_TOKENS as u32,
    )?;
    let ratio = |key: &str, v: &Option<Spanned<f64>>, lo: f64, default: f64| -> Result<f64> {
        match v {
            None => Ok(default),
            Some(s)
                if s.get_ref().is_finite()
                    && *s.get_ref() >= lo
                    && *s.get_ref() > 0.0
                    && *s.get_ref() <= 1.0 =>
            {
                Ok(*s.get_ref())
            }
            Some(s) => Err(src.bad(
                key,
                s,
                format!("allowed: {lo} <= {key} <= 1 and above 0 (a fraction of the sequence)"),
            )),
        }
    };
    let min_ratio = ratio(
        "requests.min_budget_ratio",
        &r.min_budget_ratio,
        0.0,
        DEFAULT_MIN_BUDGET_RATIO.min(r.max_budget_ratio.as_ref().map_or(1.0, |m| *m.get_ref())),
    )?;
    let max_ratio = ratio(
        "requests.max_budget_ratio",
        &r.max_budget_ratio,
        min_ratio,
        1.0,
    )?;
    let allow_opt_out = r.allow_opt_out.as_ref().is_none_or(|b| *b.get_ref());
    // The default caps (the whole sequence) would let a request keep its whole cache, which is
    // opting out by another name: a server that forbids opting out says what it allows.
    if !allow_opt_out {
        for (key, set) in [
            ("requests.max_budget_ratio", r.max_budget_ratio.is_some()),
            ("requests.max_budget_tokens", r.max_budget_tokens.is_some()),
        ] {
            if !set {
                return Err(src.missing(
                    key,
                    src.line(section),
                    "with requests.allow_opt_out = false its default (the whole sequence) lets a request keep its \
                     whole cache, which is opting out in effect; set requests.max_budget_ratio and \
                     requests.max_budget_tokens to the most one request may keep (e.g. 0.5 and 8192), or to 1.0 and \
                     2147483647 to allow that knowingly",
                ));
            }
        }
    }
    Ok(Requests {
        allow_opt_out,
        min_budget_tokens: min_tokens,
        max_budget_tokens: max_tokens,
        min_budget_ratio: min_ratio,
        max_budget_ratio: max_ratio,
    })
}

fn prefill(src: &Source, section: &Spanned<RawPrefill>, sparsity: &Sparsity) -> Result<Prefill> {
    let p = section.get_ref();
    let line = src.line(section);
    let policy = src.required_policy(
        "prefill.policy",
        &p.policy,
        &[Policy::Streaming, Policy::SnapKv, Policy::KNorm],
        line,
    )?;
    // 1: compress as soon as a chunk takes the cache a block past the budget (eviction is whole
    // blocks, so nothing smaller can be released): peak KV is budget + one chunk + one block.
    let interval = src.int("prefill.interval", &p.interval, 1, MAX_TOKENS, 1)?;
    let budget = src
        .budget("prefill", &p.budget_tokens, &p.budget_ratio)?
        .unwrap_or(sparsity.budget);
    if let (Budget::Tokens(b), Some(bt)) = (budget, &p.budget_tokens) {
        let tail = Prefill {
            policy,
            interval,
            budget,
        }
        .protected_tail(sparsity);
        let floor = sparsity.sink_tokens as u64 + tail as u64;
        if (b as u64) < floor {
            return Err(src.bad(
                "prefill.budget_tokens",
                bt,
                format!(
                    "it must be at least sparsity.sink_tokens + the tail always kept = {floor}"
                ),
            ));
        }
    }
    Ok(Prefill {
        policy,
        interval,
        budget,
    })
}
