use super::*;

fn err(text: &str) -> Error {
    Config::from_toml_str(text).expect_err("config should be refused")
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
    assert_eq!(c.sparsity.policy, Policy::SnapKv);
    assert_eq!(c.sparsity.budget, Budget::Tokens(1024));
    assert_eq!(c.sparsity.pool, Pooling::Avg);
    assert_eq!(
        (
            c.sparsity.sink_tokens,
            c.sparsity.recent_tokens,
            c.sparsity.window
        ),
        (4, 64, 32)
    );
    assert_eq!(c.sparsity.min_length, 1536);
    let d = c.decode.unwrap();
    assert_eq!(
        (d.policy, d.interval, d.budget),
        (Policy::Streaming, 256, Budget::Tokens(1024))
    );
}

#[test]
fn defaults_fill_optional_keys() {
    let c = Config::from_toml_str("[sparsity]\npolicy = \"knorm\"\nbudget_ratio = 0.25\n").unwrap();
    assert_eq!(c.sparsity.budget, Budget::Ratio(0.25));
    assert_eq!((c.sparsity.sink_tokens, c.sparsity.recent_tokens), (4, 64));
    assert_eq!(c.sparsity.pool_kernel, 15);
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
        Status::ConfigParse,
        &["sparsity"],
    );
    assert_mentions(
        &err("[sparsity]\nbudget_tokens = 100\n"),
        Status::ConfigInvalid,
        &[
            "sparsity.policy is missing",
            "streaming, snapkv, knorm, quest",
        ],
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
            "allowed: streaming, snapkv, knorm, quest",
        ],
    );
    let e = err("[sparsity]\npolicy = \"h2o\"\nbudget_tokens = 100\n");
    assert_mentions(&e, Status::ConfigInvalid, &["not implemented"]);
    let e = err(
        "[sparsity]\npolicy='knorm'\nbudget_tokens=100\n[decode]\npolicy='snapkv'\ninterval=8\n",
    );
    assert_mentions(
        &e,
        Status::ConfigInvalid,
        &[
            "decode.policy = \"snapkv\"",
            "line 5",
            "allowed: streaming, knorm",
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
