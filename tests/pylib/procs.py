"""Child processes for the Python test suites (tests/http, tests/metrics, tests/soak): stopping a
process group with a grace period, reading a child's stdout lines against a deadline, and the
tail of its log for failure messages. Only Python's standard library.

The suites run as `python3 test_x.py` (their own folder is on sys.path, not this one); a module
that uses this one puts tests/pylib on sys.path first:

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "pylib"))  # procs
    import procs  # noqa: E402

Every process handled here is started with `start_new_session=True`, so that its pid is also the
id of a process group holding everything it starts.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import signal
import subprocess
import threading
import time
from typing import Callable, Iterator


def stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the process group of `proc` (if it is still running), then SIGKILL to the
    group if `proc` has not exited after `grace_s` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def log_tail(log: pathlib.Path, chars: int = 4000) -> str:
    """The last `chars` characters of a log file (undecodable bytes replaced)."""
    return log.read_text(errors="replace")[-chars:]


def print_log(what: str, log: pathlib.Path, chars: int = 6000) -> None:
    print(f"--- {what}'s log ({log}):\n{log_tail(log, chars)}")


@contextlib.contextmanager
def stop_on_exit(proc: subprocess.Popen, log: pathlib.Path, what: str, grace_s: float = 20) -> Iterator[None]:
    """Stops `proc`'s process group (`stop_group`) however the block ends; then deletes `log` if
    the block ended normally, else prints its tail (`what`: the process, for the heading)."""
    ok = False
    try:
        yield
        ok = True
    finally:
        stop_group(proc, grace_s)
        if ok:
            log.unlink(missing_ok=True)
        else:
            print_log(what, log)


class StdoutLines:
    """The lines (stripped) of a child's stdout (a text-mode pipe), read by a daemon thread into a
    queue: several lines can arrive in one read, which a select on the pipe would not see as
    several. `what` names the child and `log` is its stderr, for the errors of `until`."""

    def __init__(self, proc: subprocess.Popen, log: pathlib.Path, what: str) -> None:
        self.proc, self.log, self.what = proc, log, what
        self.lines: list[str] = []  # every line `until` has yielded
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.strip())
        self._queue.put(None)

    def until(self, done: Callable[[], bool], timeout_s: float, poll_s: float = 1.0,
              waiting_for: str = "") -> Iterator[str]:
        """Yields lines until `done()` is true, checking it at least every `poll_s` seconds.
        RuntimeError, with the log's tail, if `timeout_s` pass first (`waiting_for`: what was
        awaited, for the message) or the child closes its stdout (it exited)."""
        deadline = time.monotonic() + timeout_s
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                awaited = f" ({waiting_for})" if waiting_for else ""
                raise RuntimeError(f"{self.what}: not ready in {timeout_s} s{awaited} (stdout so far: {self.lines}):\n"
                                   f"{log_tail(self.log)}")
            try:
                line = self._queue.get(timeout=min(left, poll_s))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait()
                raise RuntimeError(f"{self.what} exited with {self.proc.returncode} (stdout: {self.lines}):\n"
                                   f"{log_tail(self.log)}")
            self.lines.append(line)
            yield line
