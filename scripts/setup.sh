#!/usr/bin/env bash
# Check and install what building and testing kvsieve needs on a fresh machine:
# the Rust toolchain with rustfmt and clippy, and a C compiler. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

if ! need cargo; then
  echo "error: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    echo "installing rust component $comp"
    rustup component add "$comp" || { echo "error: cannot install $comp; run 'rustup component add $comp'" >&2; exit 1; }
  fi
done
if ! need cc; then
  echo "installing a C compiler (gcc) for the C integration tests"
  if need apt-get; then
    apt-get update -qq && apt-get install -y -qq gcc >/dev/null
  else
    echo "error: no C compiler (cc); install gcc or clang" >&2
    exit 1
  fi
fi
