#!/usr/bin/env bash
# Fuzz the config parser, the planner's and the compaction's ABI argument checks for a bounded time (not part of CI's
# default run). Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 60).
# Needs the nightly toolchain (libFuzzer instrumentation); installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "error: cargo-fuzz needs the nightly toolchain; install it with 'rustup toolchain install nightly'" >&2
  exit 1
fi
for target in config_parse abi_args compact_args; do
  echo "== fuzzing $target for ${seconds}s"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096
done
