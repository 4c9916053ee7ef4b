"""What every server launcher here shares: a free loopback port, waiting for readiness, the running server
(:class:`ServerProcess`) and stopping it by PID.

A server runs in its own session (``start_new_session=True``), so its process group is its own and can be
killed whole (workers, python-backend stubs) when SIGTERM is not honoured in time.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

from .errors import BadRequest

if TYPE_CHECKING:
    import psutil

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# loopback never goes through a proxy: urlopen's global opener keeps whatever *_proxy variables held at its
# first use (a test that blocks downloads with http_proxy=127.0.0.1:9 would make every later check fail)
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET ``url`` (a loopback health endpoint) answers 200; False on any connection failure."""
    try:
        with _LOOPBACK.open(url, timeout=timeout) as response:
            ok: bool = response.status == 200
            return ok
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def log_tail(path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of a server log ("" when there is none yet)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def wait_ready(
    process: subprocess.Popen, ready_url: str, timeout: float, what: str, log_path: Path, error: type[Exception]
) -> None:
    """Poll ``ready_url`` until it answers 200; raise ``error`` (with the log tail) if the process dies or time
    runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{what} exited with code {process.returncode} before it was ready:\n{log_tail(log_path)}")
        if http_ok(ready_url):
            return
        time.sleep(0.25)
    raise error(f"{what} was not ready after {timeout:.0f} s:\n{log_tail(log_path)}")


def terminate(process: subprocess.Popen, timeout: float, what: str, group: bool = False) -> int | None:
    """SIGTERM the server (its whole process group if ``group``); past ``timeout`` s SIGKILL the group.

    Returns the exit code.
    """
    if process.poll() is None:
        try:
            (os.killpg if group else os.kill)(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s %d ignored SIGTERM for %.0f s: killing its process group", what, process.pid, timeout)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        except ProcessLookupError:
            process.wait(10)
    return process.returncode


@dataclass
class ServerProcess:
    """A server a launcher here started: its process and log. Leaving it as a context manager stops it."""

    process: subprocess.Popen
    log_path: Path
    what: ClassVar[str] = "server"
    group: ClassVar[bool] = False  # SIGTERM the whole process group (e.g. workers), not the server alone

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return log_tail(self.log_path, chars)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the server; SIGKILL its process group past ``timeout`` s. Returns the exit code."""
        return terminate(self.process, timeout, self.what, self.group)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tree_sum(pid: int, measure: Callable[[psutil.Process], float]) -> float:
    """``measure`` summed over a process and its living descendants (one that exits meanwhile counts 0)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += measure(process)
        except psutil.NoSuchProcess:
            continue
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process and its living descendants."""
    return _tree_sum(pid, lambda process: (times := process.cpu_times()).user + times.system)


def tree_rss(pid: int) -> int:
    """Resident bytes summed over a process and all its descendants (workers, backend stubs); shared pages
    count once per process."""
    return int(_tree_sum(pid, lambda process: process.memory_info().rss))


def url_address(url: str, schemes: tuple[str, ...] = ("http",)) -> str:
    """``host:port`` of ``scheme://host:port`` (the scheme one of ``schemes``); BadRequest for anything else."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in schemes or not parts.hostname or port is None or parts.path.strip("/"):
        raise BadRequest(f"bad URL {url!r}: write {schemes[0]}://HOST:PORT")
    return parts.netloc
