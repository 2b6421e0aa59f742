#!/usr/bin/env bash
# Installs what building (and, with --tests, testing) eagle-serve needs and is missing, saying
# what it does: gcc and protoc (gRPC code generation, etcd-client's build script) for the
# build; python3 with pip, etcd (the membership tests start a real one), Chromium with its
# WebDriver (the chat page's test drives a real browser) and Prometheus with promtool (the
# metrics tests scrape a local cluster and check deploy/prometheus/; the package's own service,
# where systemd runs it, is not used: the tests start theirs on a free port) for the tests
# (tests/helm/run.sh, tests/http/run.sh and tests/metrics/run.sh install their own pinned PyPI
# packages). Debian/Ubuntu packages through apt-get, as root or with
# sudo; anything it cannot install is named with the command to run. Idempotent and quick when
# everything is there. Called by scripts/demo.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=false
[ "${1:-}" = "--tests" ] && tests=true

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if $tests; then
  command -v python3 >/dev/null || need+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  { command -v prometheus >/dev/null && command -v promtool >/dev/null; } || need+=(prometheus)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} (Debian packages)" >&2
  sudo=()
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo=(sudo)
  if ! command -v apt-get >/dev/null || { [ "$(id -u)" -ne 0 ] && [ ${#sudo[@]} -eq 0 ]; }; then
    echo "setup: cannot install packages here; install ${need[*]} (apt-get install ${need[*]}) and run again" >&2
    exit 1
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi
