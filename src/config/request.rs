//! Per-request settings: what one request may ask for itself within the `[requests]` bounds
//! the operator configured (vLLM passes them as `SamplingParams.extra_args`). The engine plans
//! and compresses such a request with the derived config, through the same code as any other.

use super::{Budget, Config};
use crate::error::{Error, Result};

/// What a request asks for. `budget` replaces the eviction budget of every configured phase
/// (prefill chunks, prefill end, decode), so a request that asks for more KV is not cut back by
/// the next decode re-compression; `[selection]`'s budget stays the server's. Opting out turns
/// eviction and selection off.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RequestOptions {
    /// No compression for this request.
    pub opt_out: bool,
    /// Its own budget; None keeps the config's.
    pub budget: Option<Budget>,
}

impl Config {
    /// The config a request with `req` is served with, or an error naming the request field,
    /// the value and the bounds `[requests]` sets.
    pub fn for_request(&self, req: &RequestOptions) -> Result<Config> {
        let r = &self.requests;
        let mut out = self.clone();
        if req.opt_out {
            if req.budget.is_some() {
                return Err(Error::invalid_arg(
                    "opt_out and a budget are both set; a request either opts out or asks for a budget",
                ));
            }
            if !r.allow_opt_out {
                return Err(Error::invalid_arg(
                    "opt_out: this server does not let requests turn kvsieve off (requests.allow_opt_out = false in \
                     its config); send the request without it",
                ));
            }
            // Served as stock: nothing evicted, every block read.
            out.sparsity = None;
            out.decode = None;
            out.prefill = None;
            out.selection = None;
            return Ok(out);
        }
        let Some(sparsity) = out.sparsity.as_mut() else {
            if req.budget.is_some() {
                return Err(Error::invalid_arg(
                    "budget: this server evicts nothing (its config has [selection] and no [sparsity]), so a request's \
                     own eviction budget has no effect; send the request without budget_tokens / budget_ratio",
                ));
            }
            return Ok(out);
        };
        let budget = match req.budget {
            None => return Ok(out),
            Some(Budget::Tokens(n)) => {
                if !(r.min_budget_tokens..=r.max_budget_tokens).contains(&n) {
                    return Err(Error::invalid_arg(format!(
                        "budget_tokens = {n} is outside the bounds this server allows (requests.min_budget_tokens = \
                         {} to requests.max_budget_tokens = {}); ask for a value in that range",
                        r.min_budget_tokens, r.max_budget_tokens
                    )));
                }
                Budget::Tokens(n)
            }
            Some(Budget::Ratio(x)) => {
                if !(x.is_finite() && r.min_budget_ratio <= x && x <= r.max_budget_ratio) {
                    return Err(Error::invalid_arg(format!(
                        "budget_ratio = {x} is outside the bounds this server allows (requests.min_budget_ratio = \
                         {} to requests.max_budget_ratio = {}); ask for a fraction of the sequence in that range",
                        r.min_budget_ratio, r.max_budget_ratio
                    )));
                }
                Budget::Ratio(x)
            }
        };
        sparsity.budget = budget;
        if let Some(d) = out.decode.as_mut() {
            d.budget = budget;
        }
        if let Some(p) = out.prefill.as_mut() {
            p.budget = budget;
        }
        Ok(out)
    }
}
