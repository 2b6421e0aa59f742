#!/usr/bin/env bash
# KV-aware serving benchmarks (docs/prefix-caching.md), one after the other: run it with
# nothing else on the machine. Needs a release build (cargo build --release --workspace).
set -e
cd "$(dirname "$0")/.."
export EAGLE_HOME=$HOME/.cache/eagle
start() { # $1 log, rest: args
  local log=$1; shift
  ./target/release/eagle cluster up --port 0 --http-port 0 --no-metrics "$@" > $log 2>/dev/null &
  UP=$!
  for i in $(seq 1 180); do grep -q "^http " $log && break; sleep 1; done
}
stop() { kill -INT $UP; wait $UP || true; }
echo "== TTFT, 1500-token shared system prompt, cache on"
EAGLE_PREFIX_CACHE_MB=1024 start /tmp/b1.log
python3 bench/prefix_cache.py $(grep "^http " /tmp/b1.log | head -1 | awk '{print $2}') 1500 3
stop
echo "== 8 conversations x 4 turns, 2 workers, cache on"
start /tmp/b2.log --workers 2
python3 bench/conversations.py $(grep "^http " /tmp/b2.log | head -1 | awk '{print $2}') 8 4 48
stop
echo "== eagle load, 1000-token shared prefix, concurrency 16, 32 requests: on, then off"
for mb in 1024 0; do
  EAGLE_PREFIX_CACHE_MB=$mb start /tmp/b3.log
  ./target/release/eagle load --addr $(grep "^ready " /tmp/b3.log | head -1 | awk '{print $2}') \
    --prefix-tokens 1000 --share 1 --concurrency 16 --requests 32 --max-new-tokens 32 2>/dev/null \
    | python3 -c "import json,sys; v=json.load(sys.stdin); print(json.dumps({k:v[k] for k in ['ok','throughput_tok_s','prompt_tokens','cached_prompt_tokens','mismatched_outputs','duration_s']} | {'ttft_p50_ms': v['ttft_ms']['p50'], 'prefix_cache_mb': $mb}))"
  stop
done
