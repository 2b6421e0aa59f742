#!/usr/bin/env python3
"""Soak and chaos runs of a local cluster (not CI tests: they take minutes).

  python3 tests/soak/run.py soak  [--minutes 10] [--concurrency 64]
  python3 tests/soak/run.py chaos [--minutes 10] [--concurrency 64] [--kill-every 30]

Both start `eagle cluster up --etcd local --groups 2` (two worker groups, a draft service, a
coordinator, a local etcd; speculation at every step: EAGLE_ALWAYS_SPECULATE=true unless set
otherwise) from target/release and drive it with `eagle load` (streamed
requests, closed loop, T = 0, 96 new tokens, bench/prompts/eagle-mt-24.jsonl).

soak:  every request must succeed; the resident memory of every process, sampled every 10 s,
       must end within 10% of its value after warm-up (the first quarter of the run, at least a
       minute); no session may be left on any member at the end (their load in etcd, via
       `eagle cluster status`). The report holds each process's memory minute by minute.
chaos: every --kill-every seconds a random service is killed with SIGKILL (a worker of either
       group, the draft service); `eagle cluster up` restarts it. Every request must end OK or
       UNAVAILABLE (never a timeout: nothing hangs), and at T = 0 every answer to a prompt must be
       the same tokens (`mismatched_outputs` 0: no wrong token).

Prints one JSON report on stdout (and the load summary in it); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "pylib"))  # procs
import procs  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "release"


def children(pid: int) -> list[int]:
    out = []
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return (pathlib.Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def rss_kib(pid: int) -> int | None:
    try:
        for line in (pathlib.Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def service_name(cmd: str) -> str:
    for name in ("eagle-coordinator", "eagle-draft", "etcd"):
        if name in cmd.split(" ", 1)[0]:
            return name.removeprefix("eagle-")
    if "eagle-worker" in cmd:
        group = cmd.split("--group ", 1)[1].split(" ", 1)[0] if "--group " in cmd else "?"
        return f"worker {group}"
    return cmd.split(" ", 1)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["soak", "chaos"])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--kill-every", type=float, default=30)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    log = tempfile.NamedTemporaryFile("w", prefix=f"eagle-{a.mode}-", suffix=".log", delete=False)
    up = subprocess.Popen(
        [str(BIN / "eagle"), "cluster", "up", "--etcd", "local", "--groups", "2", "--cluster", a.mode,
         "--port", "0", "--no-http", "--max-restarts", "1000"],
        stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
        # Speculation at every step, not only where the cost model says it pays: the run must
        # exercise the draft service and the verify path under load.
        env={**os.environ, "EAGLE_ALWAYS_SPECULATE": os.environ.get("EAGLE_ALWAYS_SPECULATE", "true")},
    )
    try:
        ready = up.stdout.readline().strip()
        if not ready.startswith("ready "):
            print(f"the cluster did not start; see {log.name}", file=sys.stderr)
            return 1
        addr = ready.split(" ", 1)[1]
        threading.Thread(target=lambda: [None for _ in up.stdout], daemon=True).start()
        etcd_url = None
        for _ in range(50):
            for line in pathlib.Path(log.name).read_text().splitlines():
                if line.startswith("started a local etcd at "):
                    etcd_url = line.split(" at ", 1)[1].strip()
            if etcd_url:
                break
            time.sleep(0.1)

        seconds = a.minutes * 60
        load = subprocess.Popen(
            [str(BIN / "eagle"), "load", "--addr", addr, "--concurrency", str(a.concurrency),
             "--duration", str(seconds), "--max-new-tokens", "96", "--timeout-s", "300",
             "--prompts", str(REPO / "bench" / "prompts" / "eagle-mt-24.jsonl")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        rng = random.Random(a.seed)
        samples: list[tuple[float, dict[str, int]]] = []
        kills: list[tuple[float, str]] = []
        t0 = time.monotonic()
        next_kill = t0 + a.kill_every
        while load.poll() is None:
            now = time.monotonic()
            members = {p: cmdline(p) for p in children(up.pid)}
            samples.append((now - t0, {service_name(c): rss_kib(p) or 0 for p, c in members.items()}))
            if a.mode == "chaos" and now >= next_kill and now - t0 < seconds - 10:
                victims = [(p, c) for p, c in members.items() if "eagle-worker" in c or "eagle-draft" in c]
                if victims:
                    p, c = rng.choice(victims)
                    os.kill(p, signal.SIGKILL)
                    kills.append((round(now - t0, 1), service_name(c)))
                next_kill = now + a.kill_every
            time.sleep(10 if a.mode == "soak" else 1)
        summary = json.loads(load.stdout.read().strip().splitlines()[-1])

        checks: dict[str, bool] = {}
        report: dict = {"mode": a.mode, "minutes": a.minutes, "concurrency": a.concurrency, "load": summary}
        if a.mode == "soak":
            checks["no failed request"] = summary["ok"] == summary["requests"] and not summary["failed"]
            # Warm-up: until the first quarter of the run is over (at 64 streams the first
            # answers take minutes to come back while the queue fills).
            warm_t = max(60.0, seconds / 4)
            warm = next((s for t, s in samples if t >= warm_t), samples[0][1])
            last = samples[-1][1]
            growth = {k: round((last.get(k, 0) - v) / v * 100, 1) for k, v in warm.items() if v}
            report["rss_warmup_ends_s"] = warm_t
            report["rss_kib_after_warmup"] = warm
            report["rss_kib_at_end"] = last
            report["rss_growth_percent"] = growth
            report["rss_mib_every_minute"] = {
                k: [round(s.get(k, 0) / 1024) for t, s in samples if int(t) % 60 < 10] for k in warm
            }
            checks["memory flat within 10% after warm-up"] = all(g <= 10 for g in growth.values())
        else:
            report["kills"] = kills
            checks["only OK or UNAVAILABLE"] = set(summary["failed"]) <= {"Unavailable"}
            checks["something was killed"] = len(kills) > 0
        checks["no wrong token (T = 0: one answer per prompt)"] = summary["mismatched_outputs"] == 0

        # No session left anywhere once the load is over (members refresh their load in etcd).
        left = None
        for _ in range(30):
            st = subprocess.run(
                [str(BIN / "eagle"), "cluster", "status", "--etcd", etcd_url, "--cluster", a.mode, "--json"],
                capture_output=True, text=True, timeout=30,
            )
            members = json.loads(st.stdout)["members"] if st.returncode == 0 else []
            left = {f"{m['kind']} {m['group']}": m["active_sessions"] for m in members}
            if members and not any(left.values()):
                break
            time.sleep(1)
        report["sessions_left"] = left
        checks["no session left"] = bool(left) and not any(left.values())
        report["checks"] = checks
        print(json.dumps(report, indent=1))
        return 0 if all(checks.values()) else 1
    finally:
        procs.stop_group(up, grace_s=30)  # SIGTERM, SIGKILL after 30 s
        print(f"cluster log: {log.name}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
