#!/usr/bin/env bash
# Installs a requirements file's pinned PyPI packages (`name==version` lines) when one is
# missing or at another version; quick when all are there. Used by the Python test suites
# (tests/helm/run.sh, tests/http/run.sh, tests/metrics/run.sh: deploy/grafana/requirements.txt).
set -euo pipefail
req="$1"
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
