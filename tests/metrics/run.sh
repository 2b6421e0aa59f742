#!/usr/bin/env bash
# The metrics tests (tests/metrics/test_metrics.py): promtool on deploy/prometheus/ (configs,
# rules and their unit tests), the Grafana dashboard against the contract in docs/metrics.md,
# then a local cluster (`eagle cluster up --prometheus-sd-dir`) scraped by Prometheus with
# deploy/prometheus/prometheus.yml: every metric of the contract, counters equal to the
# requests sent, exemplars, every dashboard query, deploy/grafana/plot.py. The suite itself uses
# only Python's standard library; this installs plot.py's pinned matplotlib when missing.
# Arguments pick tests by name (`static`: only those that need no cluster). Needs the release
# binaries (cargo build --release --workspace), the smollm2-135m model and Debian's prometheus
# package (scripts/setup.sh --tests installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/pip-pinned.sh deploy/grafana/requirements.txt
exec python3 tests/metrics/test_metrics.py "$@"
