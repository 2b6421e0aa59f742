#!/usr/bin/env bash
# The HTTP API's tests: the official `openai` client against a local cluster
# (tests/http/test_openai.py), and the chat page in headless Chromium
# (tests/http/test_browser.py). Installs the pinned PyPI packages of requirements.txt when one
# is missing or at another version. Arguments pick tests by name. Needs the release binaries
# (cargo build --release --workspace) and, for the page, chromium and chromium-driver
# (scripts/setup.sh --tests installs them).
set -euo pipefail
cd "$(dirname "$0")"
../../scripts/pip-pinned.sh requirements.txt
python3 test_openai.py "$@"
python3 test_browser.py "$@"
