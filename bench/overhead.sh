#!/usr/bin/env bash
# What a feature costs on an EAGLE step: `eagle load` against `eagle cluster up` with it off and
# on, in alternating rounds in one run (a fresh cluster each). Prints each round's figures and
# the on/off ratios of throughput and of the mean time per output token.
#
#   bench/overhead.sh telemetry|tls [ROUNDS] [REQUESTS]
#
# telemetry: off = --no-metrics and no OTLP; on = every process serving /metrics and exporting
#            its spans by OTLP/gRPC to a local receiver that keeps a count (the otlp_sink
#            example).
# tls:       off = --no-metrics; on = --no-metrics --tls (mutual TLS between the processes, the
#            client over TLS trusting the cluster's CA).
#
# Needs the release binaries and the example (cargo build --release --workspace --examples).
# Run it alone on the machine: it measures time.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?telemetry or tls}
rounds=${2:-2}
requests=${3:-24}
bin=target/release
sink=target/release/examples/otlp_sink
[ -x "$sink" ] || { echo "build first: cargo build --release -p eagle-tests --examples" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT

"$sink" 127.0.0.1:0 > "$tmp/sink.out" &
for _ in $(seq 1 50); do grep -q receiving "$tmp/sink.out" && break; sleep 0.1; done
endpoint=$(sed -n 's/^receiving OTLP spans at //p' "$tmp/sink.out")

# One round: start a cluster with the given flags, load it, stop it; prints load's JSON.
round() {
  local out="$tmp/up.out"
  "$bin/eagle" cluster up --port 0 --no-http "$@" > "$out" 2> "$tmp/up.err" &
  local up=$!
  for _ in $(seq 1 600); do grep -q '^ready ' "$out" && break; sleep 0.5; done
  local addr ca=()
  addr=$(sed -n 's/^ready //p' "$out")
  if [[ " $* " == *" --tls "* ]]; then
    for _ in $(seq 1 100); do grep -q '^ca ' "$out" && break; sleep 0.1; done
    ca=(--tls-ca "$(sed -n 's/^ca //p' "$out")")
  fi
  "$bin/eagle" load --addr "$addr" "${ca[@]}" --concurrency 1 --requests "$requests" \
    --max-new-tokens 96 2>/dev/null | tail -1
  kill -TERM "$up"; wait "$up" || true
}

for r in $(seq 1 "$rounds"); do
  echo "round $r: off" >&2
  round --no-metrics > "$tmp/off.$r.json"
  echo "round $r: on" >&2
  case "$mode" in
    telemetry) OTEL_BSP_SCHEDULE_DELAY=1000 round --otlp-endpoint "$endpoint" > "$tmp/on.$r.json" ;;
    tls) round --no-metrics --tls > "$tmp/on.$r.json" ;;
    *) echo "mode: telemetry or tls" >&2; exit 2 ;;
  esac
done

python3 - "$tmp" "$rounds" <<'PY'
import json, sys, pathlib
tmp, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def load(kind):
    return [json.loads((tmp / f"{kind}.{r}.json").read_text()) for r in range(1, rounds + 1)]
off, on = load("off"), load("on")
def tps(s): return s["throughput_tok_s"]
def tpot(s): return s["tpot_ms"]["mean"]
for r, (a, b) in enumerate(zip(off, on), 1):
    print(f"round {r}: off {tps(a):.1f} tok/s, {tpot(a):.2f} ms/token, {a['mean_accepted']:.2f} tokens/pass; "
          f"on {tps(b):.1f} tok/s, {tpot(b):.2f} ms/token, {b['mean_accepted']:.2f} tokens/pass")
mean = lambda xs: sum(xs) / len(xs)
print(f"on/off throughput {mean([tps(b) for b in on]) / mean([tps(a) for a in off]):.3f}, "
      f"time per output token {mean([tpot(b) for b in on]) / mean([tpot(a) for a in off]):.3f}")
PY
