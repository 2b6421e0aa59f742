"""A Prometheus server for the metrics tests (Debian's `prometheus`, started on a free loopback
port with deploy/prometheus/prometheus.yml and alerts.yml copied into a temporary directory),
its HTTP API through urllib, and promtool. (Process handling: tests/pylib/procs.py.)
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator

from contract import REPO

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "pylib"))  # procs
import procs  # noqa: E402

PROM_DIR = REPO / "deploy" / "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise AssertionError(f"{tool} is not on PATH (Debian package prometheus; scripts/setup.sh --tests installs it)")
    return path


def promtool(*args: str, cwd: pathlib.Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([need("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


class PromError(AssertionError):
    pass


@dataclass
class Prometheus:
    url: str  # http://127.0.0.1:PORT
    dir: pathlib.Path  # the config directory: prometheus.yml, alerts.yml, targets/
    proc: subprocess.Popen
    log: pathlib.Path

    # ---- the HTTP API ---------------------------------------------------------------------

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/PATH?params; the `data` of a success, else PromError with the error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            try:
                body = json.load(e)
            except ValueError:
                raise PromError(f"GET {url}: HTTP {e.code}") from None
        if body.get("status") != "success":
            raise PromError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (a scalar comes back as one unlabelled sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "vector":
            return data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PromError(f"{expr}: unexpected result type {data['resultType']}")

    def value(self, expr: str) -> float:
        """The value of a query that must return exactly one sample."""
        r = self.query(expr)
        if len(r) != 1:
            raise AssertionError(f"{expr}: expected one sample, got {len(r)}: {r}")
        return float(r[0]["value"][1])

    def values(self, expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)}

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]

    def wait_targets_up(self, expected: int, timeout_s: float = 90) -> list[dict[str, Any]]:
        """Waits until `expected` targets are active and all are up; returns them."""
        deadline = time.monotonic() + timeout_s
        while True:
            ts = self.targets()
            if len(ts) == expected and all(t["health"] == "up" for t in ts):
                return ts
            if time.monotonic() > deadline:
                state = [(t["labels"].get("job"), t["scrapeUrl"], t["health"], t.get("lastError")) for t in ts]
                raise AssertionError(f"not all of {expected} targets up in {timeout_s:.0f} s: {state}")
            time.sleep(0.5)

    def wait_scrapes(self, n: int = 2, timeout_s: float = 60) -> None:
        """Waits until every active target has been scraped `n` times from now on."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, list[str]] = {}
        while True:
            for t in self.targets():
                stamps = seen.setdefault(t["scrapeUrl"], [t["lastScrape"]])
                if t["lastScrape"] != stamps[-1]:
                    stamps.append(t["lastScrape"])
            if seen and all(len(s) > n for s in seen.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"targets not scraped {n} times in {timeout_s:.0f} s: {seen}")
            time.sleep(0.5)


@contextlib.contextmanager
def prometheus_up(sd_dir: pathlib.Path) -> Iterator[Prometheus]:
    """deploy/prometheus/{prometheus.yml,alerts.yml} copied into a temporary directory whose
    targets/ is `sd_dir`, served by a Prometheus with exemplar storage on a free port; stopped
    (SIGTERM, then SIGKILL) however the block ends. Its log is printed if the block fails."""
    need("prometheus")
    work = pathlib.Path(tempfile.mkdtemp(prefix="eagle-prom-"))
    for f in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROM_DIR / f, work / f)
    (work / "targets").symlink_to(sd_dir.resolve(), target_is_directory=True)
    port = free_port()
    log = work / "prometheus.log"
    cmd = [
        "prometheus",
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--enable-feature=exemplar-storage",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    p = Prometheus(url=f"http://127.0.0.1:{port}", dir=work, proc=proc, log=log)
    try:
        # Stopped (SIGTERM, SIGKILL after 20 s) however the block ends; its log printed if the
        # block fails; then the directory (log included) deleted.
        with procs.stop_on_exit(proc, log, "prometheus", grace_s=20):
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"prometheus exited with {proc.returncode}:\n{procs.log_tail(log)}")
                try:
                    with urllib.request.urlopen(p.url + "/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"prometheus not ready in 60 s:\n{procs.log_tail(log)}")
                time.sleep(0.3)
            yield p
    finally:
        shutil.rmtree(work, ignore_errors=True)
