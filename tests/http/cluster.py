"""A local cluster for the HTTP API's tests: `eagle cluster up` from the release binaries, on
free ports, with the HTTP API on. Yields the gRPC address and the HTTP base URL read from the
lines the command prints (`ready ADDR`, `http URL`), and stops the cluster (SIGTERM, then
SIGKILL after 20 s) however the test ends. Its stderr goes to a log file, printed on failure.
(Process handling: tests/pylib/procs.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from typing import Iterator

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "pylib"))  # procs
import procs  # noqa: E402

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
    # Speculation at every step: these tests check the speculative path through the HTTP API,
    # which the choice by load would mostly skip on a CPU (see services/coordinator/src/load.rs).
    env = {**os.environ, "EAGLE_ALWAYS_SPECULATE": "true"}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True, env=env
        )
    # Stopped (SIGTERM, SIGKILL after 20 s) however the block ends; the log deleted if it ends
    # normally, else printed.
    with procs.stop_on_exit(proc, log, "eagle cluster up", grace_s=20):
        grpc = http = None
        stdout = procs.StdoutLines(proc, log, "eagle cluster up")
        for line in stdout.until(lambda: grpc is not None and http is not None, timeout_s):
            if line.startswith("ready "):
                grpc = line.split(" ", 1)[1]
            elif line.startswith("http "):
                http = line.split(" ", 1)[1].rstrip("/")
        yield Cluster(grpc=grpc, http=http, proc=proc, log=log)
