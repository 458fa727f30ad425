#!/usr/bin/env bash
# Set up and run every test: formatting, lints (with and without the cuda feature), unit,
# property, ABI, header-drift and C-integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy (default features)"
cargo clippy --all-targets -- -D warnings
echo "== cargo clippy (--features cuda)"
cargo clippy --all-targets --features cuda -- -D warnings
echo "== cargo test"
cargo test --all-targets 2>&1
echo "== cargo test --features cuda"
cargo test --features cuda 2>&1
