"""A local cluster for the metrics tests: `eagle cluster up` from the release binaries, on free
ports, with the HTTP API on and Prometheus file-SD files written to a directory. Yields the
gRPC address, the HTTP base URL and every process's metrics URL, read from the lines the
command prints (`ready ADDR`, `http URL`, then one `metrics NAME URL` per process), and stops the
cluster (SIGTERM, then SIGKILL after 20 s) however the test ends. Its stderr goes to a log file,
printed on failure. (The same pattern as tests/http/cluster.py; process handling:
tests/pylib/procs.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

from contract import REPO

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "pylib"))  # procs
import procs  # noqa: E402

BIN = REPO / "target" / "release"
SD_FILES = ("eagle-coordinator.json", "eagle-draft.json", "eagle-worker.json")


@dataclass
class Cluster:
    grpc: str  # host:port of the gRPC API
    http: str  # base URL of the HTTP API, e.g. http://127.0.0.1:8000
    metrics: dict[str, str]  # process name (coordinator, draft, worker-0) -> its /metrics URL
    sd_dir: pathlib.Path
    proc: subprocess.Popen
    log: pathlib.Path
    lines: list[str] = field(default_factory=list)  # everything it printed on stdout

    def sd_targets(self) -> dict[str, list[dict]]:
        """The file-SD files it wrote: file name -> target groups."""
        return {f: json.loads((self.sd_dir / f).read_text()) for f in SD_FILES}

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"eagle cluster up exited with {self.proc.returncode}:\n{procs.log_tail(self.log)}")


def binaries_ready() -> bool:
    return all((BIN / b).exists() for b in ("eagle", "eagle-coordinator", "eagle-draft", "eagle-worker"))


@contextlib.contextmanager
def cluster_up(sd_dir: pathlib.Path, *extra: str, timeout_s: float = 600) -> Iterator[Cluster]:
    if not binaries_ready():
        raise AssertionError(f"no release binaries in {BIN} (cargo build --release --workspace)")
    log = pathlib.Path(tempfile.mkstemp(prefix="eagle-metrics-", suffix=".log")[1])
    cmd = [str(BIN / "eagle"), "cluster", "up", "--port", "0", "--http-port", "0",
           "--prometheus-sd-dir", str(sd_dir), *extra]
    # The services read many flags from EAGLE_* and OTEL_* variables (an inherited
    # EAGLE_METRICS_ADDR or OTLP endpoint would change what is measured): only EAGLE_HOME (the
    # models) and EAGLE_LOG pass.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EAGLE_", "OTEL_")) or k in ("EAGLE_HOME", "EAGLE_LOG")}
    # Speculation at every step, so the speculation counters move with the requests sent (the
    # choice by load would decode most steps plainly on a CPU; services/coordinator/src/load.rs).
    env["EAGLE_ALWAYS_SPECULATE"] = "true"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True, env=env)
    # Stopped (SIGTERM, SIGKILL after 20 s) however the block ends; the log deleted if it ends
    # normally, else printed.
    with procs.stop_on_exit(proc, log, "eagle cluster up", grace_s=20):
        grpc = http = None
        metrics: dict[str, str] = {}
        stdout = procs.StdoutLines(proc, log, "eagle cluster up")

        def sd_count() -> int | None:
            """Targets in the SD files, once all three are there. They are written after the
            last `metrics` line (each renamed into place), so all lines are in the pipe then."""
            if not all((sd_dir / f).exists() for f in SD_FILES):
                return None
            return sum(len(g["targets"]) for f in SD_FILES for g in json.loads((sd_dir / f).read_text()))

        def done() -> bool:
            n = sd_count()
            return grpc is not None and http is not None and n is not None and len(metrics) >= n

        # Polled every 0.5 s: the SD files appear without a line.
        for line in stdout.until(done, timeout_s, poll_s=0.5, waiting_for="its metrics lines and SD files"):
            if line.startswith("ready "):
                grpc = line.split(" ", 1)[1]
            elif line.startswith("http "):
                http = line.split(" ", 1)[1].rstrip("/")
            elif line.startswith("metrics "):
                parts = line.split()
                if len(parts) != 3 or not parts[2].startswith("http://"):
                    raise AssertionError(f"a metrics line is not `metrics NAME URL`: {line!r}")
                if parts[1] in metrics:
                    raise AssertionError(f"two metrics lines for {parts[1]}: {stdout.lines}")
                metrics[parts[1]] = parts[2]
        yield Cluster(grpc=grpc, http=http, metrics=metrics, sd_dir=sd_dir, proc=proc, log=log, lines=stdout.lines)
