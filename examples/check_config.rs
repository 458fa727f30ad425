//! Validate a kvsieve TOML config and print what it plans: `cargo run --example check_config -- FILE`.
use kvsieve::plan::{plan_keep_count, Phase, SequenceLengths};
use kvsieve::Config;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: check_config FILE.toml [LENGTH...]");
        std::process::exit(2);
    };
    let config = match Config::from_file(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    println!("{config:#?}");
    for len in std::env::args().skip(2) {
        let len: u64 = len.parse().expect("LENGTH is a token count");
        let lens = SequenceLengths {
            logical_len: len,
            cached_len: len,
            protected_len: 0,
            block_size: 16,
        };
        println!(
            "{len} tokens: {:?}",
            plan_keep_count(&config, Phase::Prefill, &lens).unwrap()
        );
    }
}
