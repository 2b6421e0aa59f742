"""A local cluster for the HTTP API's tests: `eagle cluster up` from the release binaries, on
free ports, with the HTTP API on. Yields the gRPC address and the HTTP base URL read from the
lines the command prints (`ready ADDR`, `http URL`), and stops the cluster (SIGTERM, then
SIGKILL after 20 s) however the test ends. Its stderr goes to a log file, printed on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import queue
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "release"


@dataclass
class Cluster:
    grpc: str  # host:port of the gRPC API
    http: str  # base URL of the HTTP API and the page, e.g. http://127.0.0.1:8000
    proc: subprocess.Popen
    log: pathlib.Path

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(self.http + path, timeout=30) as r:
            return json.load(r)

    def grpc_generate(self, *args: str) -> dict:
        """The gRPC API's answer through `eagle client --json` (args: its flags)."""
        out = subprocess.run(
            [str(BIN / "eagle"), "client", "--addr", self.grpc, "--json", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def cluster_up(*extra: str, timeout_s: float = 600) -> Iterator[Cluster]:
    log = pathlib.Path(tempfile.mkstemp(prefix="eagle-http-", suffix=".log")[1])
    cmd = [str(BIN / "eagle"), "cluster", "up", "--port", "0", "--http-port", "0", *extra]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
    # A thread reads stdout line by line: both lines can arrive in one read, which a select on
    # the pipe would not see as two.
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    ok = False
    try:
        grpc = http = None
        deadline = time.monotonic() + timeout_s
        while grpc is None or http is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the cluster was not ready in {timeout_s} s:\n{log.read_text()[-4000:]}")
            try:
                line = lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                proc.wait()
                raise RuntimeError(f"eagle cluster up exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if line.startswith("ready "):
                grpc = line.split(" ", 1)[1]
            elif line.startswith("http "):
                http = line.split(" ", 1)[1].rstrip("/")
        yield Cluster(grpc=grpc, http=http, proc=proc, log=log)
        ok = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if ok:
            log.unlink(missing_ok=True)
        else:
            print(f"--- eagle cluster up's log ({log}):\n{log.read_text()[-6000:]}")
