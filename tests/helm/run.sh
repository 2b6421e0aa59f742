#!/usr/bin/env bash
# The Helm chart's tests (tests/helm/test_chart.py): installs the pinned Python packages of
# requirements.txt when one is missing or at another version, then runs them. Arguments pick
# tests by name. Needs the release binaries (cargo build --release --workspace), etcd and
# promtool (Debian etcd-server and prometheus: scripts/setup.sh --tests).
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/pip-pinned.sh tests/helm/requirements.txt
exec python3 tests/helm/test_chart.py "$@"
