use super::*;

fn err(text: &str) -> Error {
    Config::from_toml_str(text).expect_err("config should be refused")
}

fn sp(c: &Config) -> &Sparsity {
    c.sparsity.as_ref().expect("the config has [sparsity]")
}

fn assert_mentions(e: &Error, status: Status, parts: &[&str]) {
    assert_eq!(e.status, status, "{}", e.message);
    for p in parts {
        assert!(
            e.message.contains(p),
            "message {:?} should mention {p:?}",
            e.message
        );
    }
}

#[test]
fn design_sketch_parses_with_every_field() {
    let c = Config::from_toml_str(
        r#"
[sparsity]
policy = "snapkv"
budget_tokens = 1024
sink_tokens = 4
recent_tokens = 64
window = 32
pool_kernel = 7
pool = "avg"
min_length = 1536

[decode]
policy = "streaming"
interval = 256
"#,
    )
    .unwrap();
    assert_eq!(sp(&c).policy, Policy::SnapKv);
    assert_eq!(sp(&c).budget, Budget::Tokens(1024));
    assert_eq!(sp(&c).pool, Pooling::Avg);
    assert_eq!(
        (sp(&c).sink_tokens, sp(&c).recent_tokens, sp(&c).window),
        (4, 64, 32)
    );
    assert_eq!(sp(&c).min_length, 1536);
    let d = c.decode.unwrap();
    assert_eq!(
        (d.policy, d.interval, d.budget),
        (Policy::Streaming, 256, Budget::Tokens(1024))
    );
}

#[test]
fn defaults_fill_optional_keys() {
    let c = Config::from_toml_str("[sparsity]\npolicy = \"knorm\"\nbudget_ratio = 0.25\n").unwrap();
    assert_eq!(sp(&c).budget, Budget::Ratio(0.25));
    assert_eq!((sp(&c).sink_tokens, sp(&c).recent_tokens), (4, 64));
    assert_eq!(sp(&c).pool_kernel, 31);
    assert!(c.decode.is_none());
}

#[test]
fn not_toml_is_a_parse_error_with_line() {
    let e = err("[sparsity]\npolicy = snapkv\n");
    assert_mentions(&e, Status::ConfigParse, &["line 2"]);
}

#[test]
fn unknown_key_is_named() {
    let e = err("[sparsity]\npolicy = \"snapkv\"\nbudget_tokens = 512\nbuget = 3\n");
    assert_mentions(
        &e,
        Status::ConfigParse,
        &["unknown field `buget`", "budget_tokens", "line 4"],
    );
    let e = err("[sparsity]\npolicy = \"knorm\"\nbudget_tokens = 512\n[layers]\nx = 1\n");
    assert_mentions(&e, Status::ConfigParse, &["unknown field `layers`"]);
}

#[test]
fn wrong_type_is_named() {
    let e = err("[sparsity]\npolicy = \"snapkv\"\nbudget_tokens = \"lots\"\n");
    assert_mentions(&e, Status::ConfigParse, &["invalid type", "line 3"]);
    let e = err("[sparsity]\npolicy = 3\nbudget_tokens = 100\n");
    assert_mentions(&e, Status::ConfigParse, &["invalid type", "line 2"]);
}

#[test]
fn missing_section_or_keys_are_named() {
    assert_mentions(
        &err("[decode]\npolicy='streaming'\ninterval=3\n"),
        Status::ConfigInvalid,
        &["neither [sparsity]", "[selection]"],
    );
    assert_mentions(&err(""), Status::ConfigInvalid, &["neither [sparsity]"]);
    assert_mentions(
        &err("[sparsity]\nbudget_tokens = 100\n"),
        Status::ConfigInvalid,
        &["sparsity.policy is missing", "streaming, snapkv, knorm"],
    );
    assert_mentions(
        &err("[sparsity]\npolicy = \"knorm\"\n"),
        Status::ConfigInvalid,
        &["sparsity.budget_tokens is missing", "budget_ratio"],
    );
    assert_mentions(
        &err("[sparsity]\npolicy='knorm'\nbudget_tokens=100\nsink_tokens=0\nrecent_tokens=0\n[decode]\npolicy='knorm'\n"),
        Status::ConfigInvalid,
        &["decode.interval is missing"],
    );
}

#[test]
fn unknown_and_unimplemented_policies_are_named() {
    let e = err("[sparsity]\npolicy = \"snap\"\nbudget_tokens = 100\n");
    assert_mentions(
        &e,
        Status::ConfigInvalid,
        &[
            "sparsity.policy = \"snap\"",
            "line 2",
            "allowed: streaming, snapkv, knorm",
        ],
    );
    let e = err("[sparsity]\npolicy = \"h2o\"\nbudget_tokens = 100\n");
    assert_mentions(&e, Status::ConfigInvalid, &["not implemented"]);
    let e = err(
        "[sparsity]\npolicy='knorm'\nbudget_tokens=100\n[decode]\npolicy='quest'\ninterval=8\n",
    );
    assert_mentions(
        &e,
        Status::ConfigInvalid,
        &[
            "decode.policy = \"quest\"",
            "line 5",
            "allowed: streaming, snapkv, knorm",
        ],
    );
}

#[test]
fn decode_snapkv_keeps_its_window_and_scores_with_it() {
    let c = Config::from_toml_str(
        "[sparsity]\npolicy='knorm'\nbudget_tokens=200\nrecent_tokens=16\nwindow=48\n[decode]\npolicy='snapkv'\ninterval=64\n",
    )
    .unwrap();
    let (sp, d) = (c.sparsity.as_ref().unwrap(), c.decode.as_ref().unwrap());
    assert_eq!(d.policy, Policy::SnapKv);
    assert_eq!(
        (d.protected_tail(sp), d.window(sp)),
        (48, 48),
        "the window's tokens stay"
    );
    assert_eq!(
        sp.protected_tail(),
        16,
        "the prefill policy (knorm) keeps its own tail"
    );
    // Its budget must hold the sinks and the window, and so must a request's own budget.
    let e = err("[sparsity]\npolicy='knorm'\nbudget_tokens=100\nrecent_tokens=16\nwindow=60\n[decode]\npolicy='snapkv'\ninterval=4\nbudget_tokens=50\n");
    assert_mentions(
        &e,
        Status::ConfigInvalid,
        &[
            "decode.budget_tokens = 50",
            "max(sparsity.recent_tokens, sparsity.window)",
            "64",
        ],
    );
    assert_eq!(c.requests.min_budget_tokens, 4 + 48);
}

#[test]
fn decode_carry_defaults_for_snapkv_only_and_is_a_fraction() {
    let base = "[sparsity]\npolicy='snapkv'\nbudget_tokens=200\n[decode]\ninterval=64\n";
    let carry = |extra: &str| {
        Config::from_toml_str(&format!("{base}{extra}"))
            .unwrap()
            .decode
            .unwrap()
            .carry
    };
    assert_eq!(carry("policy='snapkv'\n"), 0.5, "SnapKV's default");
    assert_eq!(carry("policy='snapkv'\ncarry=0\n"), 0.0, "0 turns it off");
    assert_eq!(carry("policy='snapkv'\ncarry=0.75\n"), 0.75);
    assert_eq!(carry("policy='streaming'\n"), 0.0, "nothing to carry");
    assert_mentions(
        &err(&format!("{base}policy='snapkv'\ncarry=1.5\n")),
        Status::ConfigInvalid,
        &["decode.carry = 1.5", "line 7", "0 <= decode.carry <= 1"],
    );
    assert_mentions(
        &err(&format!("{base}policy='knorm'\ncarry=0.5\n")),
        Status::ConfigInvalid,
        &[
            "decode.carry = 0.5",
            "\"knorm\"",
            "set decode.policy = \"snapkv\"",
        ],
    );
}

#[test]
fn decode_snapkv_pools_by_its_own_width() {
    let base =
        "[sparsity]\npolicy='snapkv'\nbudget_tokens=200\npool_kernel=7\n[decode]\ninterval=64\n";
    let width = |extra: &str| {
        let c = Config::from_toml_str(&format!("{base}{extra}")).unwrap();
        (
            c.sparsity.unwrap().pool_kernel,
            c.decode.unwrap().pool_kernel,
        )
    };
    assert_eq!(
        width("policy='snapkv'\n"),
        (7, 1),
        "decode's default: no pooling"
    );
    assert_eq!(width("policy='snapkv'\npool_kernel=5\n"), (7, 5));
    assert_eq!(
        width("policy='streaming'\n"),
        (7, 7),
        "unused: [sparsity]'s"
    );
    assert_mentions(
        &err(&format!("{base}policy='snapkv'\npool_kernel=4\n")),
        Status::ConfigInvalid,
        &["decode.pool_kernel = 4", "line 8", "must be odd"],
    );
    assert_mentions(
        &err(&format!("{base}policy='snapkv'\npool_kernel=300\n")),
        Status::ConfigInvalid,
        &["decode.pool_kernel = 300", "1 <= decode.pool_kernel <= 255"],
    );
    assert_mentions(
        &err(&format!("{base}policy='streaming'\npool_kernel=5\n")),
        Status::ConfigInvalid,
        &[
            "decode.pool_kernel = 5",
            "\"streaming\"",
            "remove decode.pool_kernel",
        ],
    );
}

#[test]
fn out_of_range_values_name_the_range() {
    let cases: &[(&str, &[&str])] = &[
        (
            "budget_tokens = 0",
            &["sparsity.budget_tokens = 0", "1 <= sparsity.budget_tokens"],
        ),
        (
            "budget_tokens = 3000000000",
            &["sparsity.budget_tokens = 3000000000", "2147483647"],
        ),
        (
            "budget_tokens = 500\nsink_tokens = -1",
            &["sparsity.sink_tokens = -1", "0 <= sparsity.sink_tokens"],
        ),
        ("budget_tokens = 500\nwindow = 0", &["sparsity.window = 0"]),
        (
            "budget_tokens = 500\npool_kernel = 6",
            &["sparsity.pool_kernel = 6", "odd"],
        ),
        (
            "budget_tokens = 500\npool_kernel = 301",
            &["sparsity.pool_kernel = 301", "255"],
        ),
        (
            "budget_tokens = 500\npool = \"median\"",
            &["sparsity.pool = \"median\"", "\"max\", \"avg\""],
        ),
        (
            "budget_tokens = 500\nmin_length = -5",
            &["sparsity.min_length = -5"],
        ),
    ];
    for (body, parts) in cases {
        let text = format!("[sparsity]\npolicy = \"snapkv\"\n{body}\n");
        let e = err(&text);
        assert_mentions(&e, Status::ConfigInvalid, parts);
        assert!(e.message.contains("(line "), "{}", e.message);
    }
}

#[test]
fn ratio_must_be_in_zero_one() {
    for r in ["0.0", "-0.5", "1.5", "nan", "inf"] {
        let e = err(&format!(
            "[sparsity]\npolicy = \"knorm\"\nbudget_ratio = {r}\n"
        ));
        assert_mentions(
            &e,
            Status::ConfigInvalid,
            &[
                "sparsity.budget_ratio",
                "0 < sparsity.budget_ratio <= 1",
                "line 3",
            ],
        );
    }
    assert!(Config::from_toml_str("[sparsity]\npolicy = \"knorm\"\nbudget_ratio = 1.0\n").is_ok());
}

#[test]
fn impossible_combinations_are_refused() {
    let e =
        err("[sparsity]\npolicy='streaming'\nbudget_tokens=60\nsink_tokens=4\nrecent_tokens=64\n");
    assert_mentions(
        &e,
        Status::ConfigInvalid,
        &[
            "sparsity.budget_tokens = 60",
            "line 3",
            "sink_tokens + recent_tokens",
            "68",
        ],
    );
    let e = err("[sparsity]\npolicy='snapkv'\nbudget_tokens=100\nsink_tokens=0\nrecent_tokens=0\nwindow=128\n");
    assert_mentions(
        &e,
        Status::ConfigInvalid,
        &["sparsity.window = 128", "line 6", "budget_tokens = 100"],
    );
    let e = err("[sparsity]\npolicy='snapkv'\nbudget_tokens=100\nrecent_tokens=0\nwindow=98\n");
    assert_mentions(
        &e,
        Status::ConfigInvalid,
        &[
            "sparsity.budget_tokens = 100",
            "max(recent_tokens, window)",
            "102",
        ],
    );
    let e = err("[sparsity]\npolicy='knorm'\nbudget_tokens=100\nbudget_ratio=0.5\n");
    assert_mentions(&e, Status::ConfigInvalid, &["not both"]);
    let e = err("[sparsity]\npolicy='knorm'\nbudget_tokens=100\n[decode]\npolicy='streaming'\ninterval=4\nbudget_tokens=10\n");
    assert_mentions(
        &e,
        Status::ConfigInvalid,
        &["decode.budget_tokens = 10", "68"],
    );
}

const SNAP_RATIO: &str = "[sparsity]\npolicy = \"snapkv\"\nbudget_ratio = 0.25\n[decode]\npolicy = \"streaming\"\nbudget_tokens = 512\ninterval = 64\n";

#[test]
fn requests_section_defaults_and_bounds() {
    let c = Config::from_toml_str(SNAP_RATIO).unwrap();
    // Defaults: opt-out allowed, a ratio in [0.1, 1], tokens from what is always kept (4 + 64).
    assert!(c.requests.allow_opt_out);
    assert_eq!(
        (c.requests.min_budget_tokens, c.requests.max_budget_tokens),
        (68, i32::MAX as u32)
    );
    assert_eq!(
        (c.requests.min_budget_ratio, c.requests.max_budget_ratio),
        (0.1, 1.0)
    );
    let c = Config::from_toml_str(&format!(
        "{SNAP_RATIO}[requests]\nallow_opt_out = false\nmin_budget_tokens = 256\nmax_budget_tokens = 4096\n\
         min_budget_ratio = 0.2\nmax_budget_ratio = 0.5\n"
    ))
    .unwrap();
    assert!(!c.requests.allow_opt_out);
    assert_eq!(
        (c.requests.min_budget_tokens, c.requests.max_budget_tokens),
        (256, 4096)
    );
    assert_eq!(
        (c.requests.min_budget_ratio, c.requests.max_budget_ratio),
        (0.2, 0.5)
    );
}

#[test]
fn requests_section_refusals_name_key_and_line() {
    for (extra, parts) in [
        (
            "min_budget_tokens = 10",
            &["requests.min_budget_tokens = 10", "68 <=", "line 9"][..],
        ),
        (
            "min_budget_tokens = 500\nmax_budget_tokens = 400",
            &["requests.max_budget_tokens = 400", "500 <="],
        ),
        (
            "max_budget_ratio = 1.5",
            &["requests.max_budget_ratio = 1.5", "<= 1"],
        ),
        (
            "min_budget_ratio = 0.6\nmax_budget_ratio = 0.5",
            &["requests.max_budget_ratio = 0.5", "0.6 <="],
        ),
        (
            "min_budget_ratio = 0.0",
            &["requests.min_budget_ratio = 0", "above 0"],
        ),
    ] {
        let e = err(&format!("{SNAP_RATIO}[requests]\n{extra}\n"));
        assert_mentions(&e, Status::ConfigInvalid, parts);
    }
    let e = err(&format!("{SNAP_RATIO}[requests]\nallow_opt_outs = true\n"));
    assert_mentions(&e, Status::ConfigParse, &["allow_opt_outs"]);
}

#[test]
fn a_request_budget_replaces_every_phase_within_bounds() {
    let c = Config::from_toml_str(SNAP_RATIO).unwrap();
    let r = c
        .for_request(&RequestOptions {
            opt_out: false,
            budget: Some(Budget::Ratio(0.5)),
        })
        .unwrap();
    assert_eq!(sp(&r).budget, Budget::Ratio(0.5));
    assert_eq!(r.decode.as_ref().unwrap().budget, Budget::Ratio(0.5));
    // Everything else is the config's.
    assert_eq!(
        (sp(&r).window, sp(&r).pool_kernel),
        (sp(&c).window, sp(&c).pool_kernel)
    );
    let r = c
        .for_request(&RequestOptions {
            opt_out: false,
            budget: Some(Budget::Tokens(1000)),
        })
        .unwrap();
    assert_eq!(sp(&r).budget, Budget::Tokens(1000));
    assert_eq!(c.for_request(&RequestOptions::default()).unwrap(), c);
    for (budget, parts) in [
        (
            Budget::Ratio(0.05),
            &["budget_ratio = 0.05", "requests.min_budget_ratio = 0.1"][..],
        ),
        (Budget::Ratio(f64::NAN), &["budget_ratio = NaN"]),
        (
            Budget::Tokens(20),
            &["budget_tokens = 20", "requests.min_budget_tokens = 68"],
        ),
    ] {
        let e = c
            .for_request(&RequestOptions {
                opt_out: false,
                budget: Some(budget),
            })
            .unwrap_err();
        assert_mentions(&e, Status::InvalidArgument, parts);
    }
}

#[test]
fn an_opted_out_request_is_never_compressed_unless_forbidden() {
    use crate::plan::{plan_keep_count, Phase, SequenceLengths};
    let c = Config::from_toml_str(SNAP_RATIO).unwrap();
    let off = c
        .for_request(&RequestOptions {
            opt_out: true,
            budget: None,
        })
        .unwrap();
    let lens = SequenceLengths {
        logical_len: 100_000,
        cached_len: 100_000,
        protected_len: 0,
        block_size: 16,
    };
    for phase in [Phase::Prefill, Phase::Decode] {
        assert!(plan_keep_count(&c, phase, &lens).unwrap().released_blocks > 0);
        assert_eq!(
            plan_keep_count(&off, phase, &lens).unwrap().released_blocks,
            0
        );
    }
    let e = c
        .for_request(&RequestOptions {
            opt_out: true,
            budget: Some(Budget::Ratio(0.5)),
        })
        .unwrap_err();
    assert_mentions(&e, Status::InvalidArgument, &["opt_out and a budget"]);
    let strict = Config::from_toml_str(&format!(
        "{SNAP_RATIO}[requests]\nallow_opt_out = false\nmax_budget_ratio = 0.5\nmax_budget_tokens = 4096\n"
    ))
    .unwrap();
    let e = strict
        .for_request(&RequestOptions {
            opt_out: true,
            budget: None,
        })
        .unwrap_err();
    assert_mentions(
        &e,
        Status::InvalidArgument,
        &["requests.allow_opt_out = false"],
    );
}

#[test]
fn prefill_section_defaults_and_refusals() {
    let c = Config::from_toml_str(
        "[sparsity]\npolicy = \"snapkv\"\nbudget_ratio = 0.25\n[prefill]\npolicy = \"knorm\"\n",
    )
    .unwrap();
    let p = c.prefill.unwrap();
    assert_eq!(
        (p.policy, p.interval, p.budget),
        (Policy::KNorm, 1, Budget::Ratio(0.25))
    );
    for (extra, parts) in [
        (
            "policy = \"quest\"",
            &[
                "prefill.policy = \"quest\"",
                "streaming, snapkv, knorm",
                "line 5",
            ][..],
        ),
        (
            "policy = \"snapkv\"\ninterval = 0",
            &["prefill.interval = 0", "1 <="],
        ),
        (
            "policy = \"snapkv\"\nbudget_tokens = 40",
            &["prefill.budget_tokens = 40", "at least", "68"],
        ),
        ("interval = 4", &["prefill.policy is missing"]),
    ] {
        let e = err(&format!(
            "[sparsity]\npolicy = \"snapkv\"\nbudget_ratio = 0.25\n[prefill]\n{extra}\n"
        ));
        assert_mentions(&e, Status::ConfigInvalid, parts);
    }
}

#[test]
fn forbidding_opt_out_needs_explicit_caps() {
    // With the default caps a request could ask to keep its whole cache (ratio 1.0, or 2^31 - 1
    // tokens): opting out in effect. Each cap must be set, and the error names both and the fix.
    for caps in ["", "max_budget_ratio = 0.5\n", "max_budget_tokens = 4096\n"] {
        let e = err(&format!(
            "{SNAP_RATIO}[requests]\nallow_opt_out = false\n{caps}"
        ));
        assert_mentions(
            &e,
            Status::ConfigInvalid,
            &[
                "is missing",
                "opting out in effect",
                "requests.max_budget_ratio and requests.max_budget_tokens",
            ],
        );
    }
    // Set knowingly to the whole sequence, it is accepted.
    let c = Config::from_toml_str(&format!(
        "{SNAP_RATIO}[requests]\nallow_opt_out = false\nmax_budget_ratio = 1.0\nmax_budget_tokens = 2147483647\n"
    ))
    .unwrap();
    assert!(!c.requests.allow_opt_out && c.requests.max_budget_ratio == 1.0);
    // Allowing opt-out keeps the defaults.
    assert!(
        Config::from_toml_str(&format!("{SNAP_RATIO}[requests]\nallow_opt_out = true\n")).is_ok()
    );
}

#[test]
fn a_selection_section_alone_is_valid_with_its_defaults() {
    let c =
        Config::from_toml_str("[selection]\npolicy = \"quest\"\nbudget_tokens = 1024\n").unwrap();
    assert!(c.sparsity.is_none() && c.decode.is_none() && c.prefill.is_none());
    let s = c.selection.unwrap();
    assert_eq!(
        (
            s.policy,
            s.budget,
            s.min_length,
            s.dense_layers,
            s.spread,
            s.key_ranges
        ),
        (Policy::Quest, Budget::Tokens(1024), 0, 2, 0.5, 1)
    );
    let c = Config::from_toml_str(
        "[sparsity]\npolicy='snapkv'\nbudget_ratio=0.5\n[selection]\npolicy='quest'\nbudget_ratio=0.25\n\
         min_length=2048\ndense_layers=0\nspread=1.0\nkey_ranges=4\n",
    )
    .unwrap();
    let s = c.selection.as_ref().unwrap();
    assert_eq!(
        (
            s.budget,
            s.min_length,
            s.dense_layers,
            s.spread,
            s.key_ranges
        ),
        (Budget::Ratio(0.25), 2048, 0, 1.0, 4)
    );
    assert_eq!(sp(&c).policy, Policy::SnapKv);
}

#[test]
fn selection_refusals_name_key_fix_and_line() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[sparsity]\npolicy = \"quest\"\nbudget_tokens = 256\n",
            &["sparsity.policy = \"quest\"", "line 2", "[selection]", "evicts nothing"],
        ),
        (
            "[selection]\nbudget_tokens = 256\n",
            &["selection.policy is missing", "quest"],
        ),
        (
            "[selection]\npolicy = \"snapkv\"\nbudget_tokens = 256\n",
            &["selection.policy = \"snapkv\"", "allowed: quest"],
        ),
        (
            "[selection]\npolicy = \"quest\"\n",
            &["selection.budget_tokens is missing", "selection.budget_ratio"],
        ),
        (
            "[selection]\npolicy = \"quest\"\nbudget_tokens = 0\n",
            &["selection.budget_tokens = 0", "line 3"],
        ),
        (
            "[selection]\npolicy = \"quest\"\nbudget_ratio = 1.5\n",
            &["selection.budget_ratio = 1.5", "<= 1"],
        ),
        (
            "[selection]\npolicy = \"quest\"\nbudget_tokens = 64\nbudget_ratio = 0.5\n",
            &["not both"],
        ),
        (
            "[selection]\npolicy = \"quest\"\nbudget_tokens = 64\ndense_layers = -1\n",
            &["selection.dense_layers = -1", "0 <="],
        ),
        (
            "[selection]\npolicy = \"quest\"\nbudget_tokens = 64\nspread = 1.5\n",
            &["selection.spread = 1.5", "line 4", "0 <= selection.spread <= 1", "upper bound"],
        ),
        (
            "[selection]\npolicy = \"quest\"\nbudget_tokens = 64\nkey_ranges = 0\n",
            &["selection.key_ranges = 0", "line 4", "1 <= selection.key_ranges <= 64"],
        ),
        (
            "[selection]\npolicy = \"quest\"\nbudget_tokens = 64\n[decode]\npolicy = \"knorm\"\ninterval = 8\n",
            &["[decode] (line ", "add a [sparsity] section"],
        ),
        (
            "[selection]\npolicy = \"quest\"\nbudget_tokens = 64\n[prefill]\npolicy = \"knorm\"\n",
            &["[prefill] (line ", "[sparsity]"],
        ),
    ];
    for (text, parts) in cases {
        assert_mentions(&err(text), Status::ConfigInvalid, parts);
    }
    let e = err("[selection]\npolicy = \"quest\"\nbudget_tokens = 64\nwindow = 3\n");
    assert_mentions(&e, Status::ConfigParse, &["unknown field `window`"]);
}

#[test]
fn selection_keeps_the_budget_in_whole_blocks_first_and_last_always() {
    let c =
        Config::from_toml_str("[selection]\npolicy='quest'\nbudget_tokens=1000\nmin_length=3000\n")
            .unwrap();
    let s = c.selection.unwrap();
    // Below min_length, or within the budget: every block.
    assert_eq!(s.keep_blocks(2999, 32), 94);
    assert_eq!(s.keep_blocks(0, 32), 0);
    // 1000 tokens in blocks of 32: 32 blocks (1024 tokens) of the 125 a 4000-token row has.
    assert_eq!(s.keep_blocks(4000, 32), 32);
    let tiny = Config::from_toml_str("[selection]\npolicy='quest'\nbudget_tokens=1\n").unwrap();
    assert_eq!(tiny.selection.as_ref().unwrap().keep_blocks(4000, 32), 2);
    assert_eq!(tiny.selection.as_ref().unwrap().keep_blocks(20, 32), 1);
    let ratio = Config::from_toml_str("[selection]\npolicy='quest'\nbudget_ratio=0.25\n").unwrap();
    // ceil(0.25 * 4000) = 1000 tokens -> 32 blocks.
    assert_eq!(ratio.selection.as_ref().unwrap().keep_blocks(4000, 32), 32);
}

#[test]
fn a_selection_only_request_may_opt_out_but_not_ask_for_an_eviction_budget() {
    let c = Config::from_toml_str("[selection]\npolicy='quest'\nbudget_tokens=512\n").unwrap();
    assert_eq!(c.requests.min_budget_tokens, 1);
    let off = c
        .for_request(&RequestOptions {
            opt_out: true,
            budget: None,
        })
        .unwrap();
    assert!(off.selection.is_none() && off.sparsity.is_none());
    let e = c
        .for_request(&RequestOptions {
            opt_out: false,
            budget: Some(Budget::Tokens(600)),
        })
        .unwrap_err();
    assert_mentions(
        &e,
        Status::InvalidArgument,
        &["evicts nothing", "budget_tokens"],
    );
}
