"""Files written whole or not at all, sha256 of files, and an advisory lock across processes."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Conflict


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: object) -> None:
    """Atomically write pretty JSON."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


class LockHeld(Conflict):
    """A lock that another process holds, taken without waiting: the message names the holder."""


@contextmanager
def file_lock(path: str | Path, wait: bool = True, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing), across processes; the system releases it when its
    holder exits, however it ends. The holder writes its pid and command into the file: when another process holds
    the lock, ``wait=False`` raises :class:`LockHeld` naming it, and ``waiting`` (if given) is called with it before
    waiting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:  # not "w": that would wipe the holder's line before the lock is ours
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(path)
            if not wait:
                raise LockHeld(f"{path} is held by {holder}") from None
            if waiting is not None:
                waiting(holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} ({_command()}) since {time.strftime('%H:%M:%S')}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def _command() -> str:
    """This process's command line on one line, the program by its base name (``python -m tl_models.cli ...``);
    read once (a lock is taken on every embedding-log flush)."""
    try:
        words = Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        words = [sys.executable, *sys.argv]
    return " ".join([os.path.basename(words[0]), *words[1:]]).replace("\n", " ")[:200]


def lock_holder(path: str | Path, patience: float = 0.5) -> str:
    """Who holds the lock ``path``, as its holder wrote it (pid, command, since when). A holder writes its line just
    after it takes the lock: a line still empty, or one naming a process that has ended (the previous holder's), is
    read again for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            line = Path(path).read_text().strip()
        except OSError:
            line = ""
        if (line and _alive(line)) or time.monotonic() >= deadline:
            return line or "another process"
        time.sleep(0.01)


def _alive(line: str) -> bool:
    """Whether the process a holder's line names (``pid N ...``) still runs; True when the line names none."""
    pid = line.split()[1] if line.startswith("pid ") and len(line.split()) > 1 else ""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
