#!/usr/bin/env bash
# The main job. For now: build the library and run the C integration example, which loads a
# config (the argument, or a built-in SnapKV one) and plans compression for several prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release
mkdir -p build
cc -std=c11 -Wall -Wextra -Werror -O2 -I include integrations/c/example.c \
  -L target/release -lkvsieve -o build/kvsieve-example
LD_LIBRARY_PATH=target/release ./build/kvsieve-example "$@"
