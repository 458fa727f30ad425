#!/usr/bin/env bash
# Regenerate include/kvsieve.h from the Rust sources with cbindgen (the same generator the
# drift test uses), then show what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
KVSIEVE_BLESS=1 cargo test --quiet --test header header_matches_sources
git --no-pager diff --stat -- include/kvsieve.h || true
