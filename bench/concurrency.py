#!/usr/bin/env python3
"""Serving under load (continuous batching): `eagle load` against one `eagle cluster up` at
several concurrencies, speculation on and off back to back at each, and a Markdown table of
aggregate throughput, the EAGLE / plain ratio, what speculation chose (mean tree size of the
speculative steps, the share of steps decoded plainly because of the load, tokens per pass),
and time-to-first-token and inter-token latency percentiles.

    python3 bench/concurrency.py [--concurrency 1,4,16,64] [--max-new-tokens 96]
                                 [--requests-per-stream 2] [--cluster-arg=FLAG ...]

The cluster runs the default model and head (`--dtype auto`) with `--max-running` at the
largest concurrency, so every stream runs at once. Requests per round: max(24, concurrency x
--requests-per-stream), prompts from bench/prompts/eagle-mt-24.jsonl, T = 0. Needs the release
binaries (cargo build --release --workspace). Run it alone on the machine: it measures time.
--cluster-arg passes a flag to `eagle cluster up`; the services' own switches go by environment,
which every process of the cluster inherits: `EAGLE_ALWAYS_SPECULATE=true python3
bench/concurrency.py` speculates at every step whatever the load.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
EAGLE = ROOT / "target/release/eagle"
PROMPTS = ROOT / "bench/prompts/eagle-mt-24.jsonl"


def scrape(url: str) -> dict[str, float]:
    """The coordinator's unlabelled samples and the speculation counters we read."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-z_]+)(\{[^}]*\})?\s+([-0-9.eE+]+|NaN)", line)
        if m and not m.group(2):
            out[m.group(1)] = float(m.group(3))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--cluster-arg", action="append", default=[])
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    if not EAGLE.exists():
        sys.exit("build first: cargo build --release --workspace")
    tmp = pathlib.Path(tempfile.mkdtemp())
    up_out = open(tmp / "up.out", "w+")
    up = subprocess.Popen(
        [str(EAGLE), "cluster", "up", "--port", "0", "--no-http",
         "--max-running", str(max(levels)), "--max-waiting", str(4 * max(levels)),
         *a.cluster_arg],
        stdout=up_out, stderr=open(tmp / "up.err", "w"))
    try:
        addr = coord = None
        for _ in range(1200):
            lines = (tmp / "up.out").read_text().splitlines()
            addr = next((l.split()[1] for l in lines if l.startswith("ready ")), None)
            coord = next((l.split()[2] for l in lines if l.startswith("metrics coordinator ")), None)
            if addr and coord:
                break
            if up.poll() is not None:
                sys.exit(f"eagle cluster up exited: {(tmp / 'up.err').read_text()[-2000:]}")
            time.sleep(0.25)
        rows = []
        for c in levels:
            requests = max(24, c * a.requests_per_stream)
            for spec in (True, False):
                before = scrape(coord)
                cmd = [str(EAGLE), "load", "--addr", addr, "--prompts", str(PROMPTS),
                       "--concurrency", str(c), "--requests", str(requests),
                       "--max-new-tokens", str(a.max_new_tokens)]
                if not spec:
                    cmd.append("--no-speculation")
                r = subprocess.run(cmd, capture_output=True, text=True, check=True)
                after = scrape(coord)
                d = json.loads(r.stdout)
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                trees = delta.get("eagle_spec_decode_tree_size_count", 0)
                d["mean_tree_nodes"] = (delta["eagle_spec_decode_tree_size_sum"] / trees) if trees else 0.0
                d["verify_steps"] = trees
                rows.append((c, spec, d))
                print(f"c={c:3} {'EAGLE' if spec else 'plain'}: {d['throughput_tok_s']} tok/s, "
                      f"{d['ok']}/{d['requests']} ok, mismatched {d['mismatched_outputs']}",
                      file=sys.stderr)
        print("| concurrency | EAGLE tok/s | plain tok/s | EAGLE / plain | tokens per pass "
              "(EAGLE) | tree nodes (speculative steps) | steps plain by load | TTFT p50 / p99 "
              "EAGLE (plain) | inter-token p50 / p99 EAGLE (plain) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for i in range(0, len(rows), 2):
            c, _, e = rows[i]
            _, _, p = rows[i + 1]
            steps = max(e.get("steps", 0), 1)
            print(f"| {c} | {e['throughput_tok_s']:.1f} | {p['throughput_tok_s']:.1f} | "
                  f"{e['throughput_tok_s'] / p['throughput_tok_s']:.2f}x | "
                  f"{e['mean_accepted']:.2f} | {e['mean_tree_nodes']:.1f} | "
                  f"{100 * e.get('load_plain_steps', 0) / steps:.0f}% | "
                  f"{e['ttft_ms']['p50']:.0f} / {e['ttft_ms']['p99']:.0f} "
                  f"({p['ttft_ms']['p50']:.0f} / {p['ttft_ms']['p99']:.0f}) ms | "
                  f"{e['tpot_ms']['p50']:.1f} / {e['tpot_ms']['p99']:.1f} "
                  f"({p['tpot_ms']['p50']:.1f} / {p['tpot_ms']['p99']:.1f}) ms |")
        bad = [r for r in rows if r[2]["failed"] or r[2]["mismatched_outputs"]]
        if bad:
            print(f"failures or mismatched outputs in {len(bad)} rounds", file=sys.stderr)
            return 1
        return 0
    finally:
        up.send_signal(2)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()


if __name__ == "__main__":
    sys.exit(main())
