#!/usr/bin/env bash
# The picture of the dashboard in docs/measurements.md: a local cluster (eagle cluster up, speculation
# on) scraped by Prometheus with deploy/prometheus/prometheus.yml, loaded by `eagle load`
# (closed loop: concurrency 1, then 4, then 2), then deploy/grafana/plot.py draws the main
# panels over the run into deploy/grafana/dashboard.png.
#
#   deploy/grafana/snapshot.sh [SECONDS_PER_PHASE]   (default 60)
#
# Needs the release binaries and Debian's prometheus. Run it alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
phase=${1:-60}
bin=target/release
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT
./scripts/pip-pinned.sh deploy/grafana/requirements.txt

mkdir -p "$tmp/prom/targets"
cp deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml "$tmp/prom/"
"$bin/eagle" cluster up --port 0 --no-http --prometheus-sd-dir "$tmp/prom/targets" \
  > "$tmp/up.out" 2> "$tmp/up.err" &
for _ in $(seq 1 600); do grep -q '^ready ' "$tmp/up.out" && break; sleep 0.5; done
addr=$(sed -n 's/^ready //p' "$tmp/up.out")
[ -n "$addr" ] || { cat "$tmp/up.err" >&2; exit 1; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
prometheus --config.file "$tmp/prom/prometheus.yml" --storage.tsdb.path "$tmp/tsdb" \
  --web.listen-address "127.0.0.1:$port" --enable-feature=exemplar-storage \
  > "$tmp/prom.log" 2>&1 &
url="http://127.0.0.1:$port"
for _ in $(seq 1 100); do curl -sf "$url/-/ready" >/dev/null && break; sleep 0.2; done
sleep 10
start=$(date +%s)
for c in 1 4 2; do
  echo "load: concurrency $c for ${phase}s" >&2
  "$bin/eagle" load --addr "$addr" --concurrency "$c" --duration "$phase" 2>/dev/null | tail -1
done
sleep 15
python3 deploy/grafana/plot.py --prometheus "$url" --start "$start" --end "$(date +%s)" \
  --title "eagle-serve: SmolLM2-135M, eagle load at concurrency 1, 4, 2 (${phase} s each)"
