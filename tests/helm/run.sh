#!/usr/bin/env bash
# The Helm chart's tests (tests/helm/test_chart.py): installs the pinned Python packages of
# requirements.txt when one is missing or at another version, then runs them. Arguments pick
# tests by name. Needs the release binaries (cargo build --release --workspace) and etcd.
set -euo pipefail
cd "$(dirname "$0")/../.."
req=tests/helm/requirements.txt
if ! python3 - "$req" 2>/dev/null <<'PY'
import importlib.metadata as md, sys
for line in open(sys.argv[1]):
    spec = line.split("#")[0].strip()
    if spec:
        name, version = spec.split("==")
        if md.version(name) != version:
            sys.exit(1)
PY
then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r "$req"
fi
exec python3 tests/helm/test_chart.py "$@"
