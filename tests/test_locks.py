"""Locks across processes: a held lock names its holder, a writer that waits says whom for, a killed holder frees
it, and one fleet change at a time (a second `fleet swap` or `split` is refused while another holds the route)."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tl_models.core.files import LockHeld, file_lock
from tl_models.core.manifest import BuildDir
from tl_models.core.routing import RoutingState
from tl_models.fleet.bento import FleetError, split, swap

UNREACHABLE = ["http://127.0.0.1:9"]  # the discard port: nothing answers there


@pytest.fixture
def holder() -> Iterator:
    """Start a real second process that takes a lock (``holder(code)``: ``code`` takes it) and keeps it until it is
    killed; its Popen."""
    started: list[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", f"{code}\nprint('held', flush=True)\nimport time; time.sleep(120)"],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(10)


def _hold(path: Path, lock: str = "tl_models.core.files.file_lock") -> str:
    """Code that takes ``lock(path)`` and keeps it (a context manager that is collected unlocks)."""
    module, _, name = lock.rpartition(".")
    return f"from {module} import {name}\nheld = {name}({str(path)!r})\nheld.__enter__()"


def test_a_held_lock_names_its_holder_and_a_killed_holder_frees_it(tmp_path: Path, holder) -> None:
    lock = tmp_path / "x.lock"
    process = holder(_hold(lock))
    held = rf"{lock} is held by pid {process.pid} \(python -c .*\) since \d\d:\d\d"
    with pytest.raises(LockHeld, match=held), file_lock(lock, wait=False):
        pass
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    with file_lock(lock, wait=False):  # the system released it with the process
        assert f"pid {os.getpid()}" in lock.read_text()


def test_a_build_writer_that_has_to_wait_says_for_whom(tmp_path: Path, holder, caplog) -> None:
    build = BuildDir(tmp_path / "build")
    process = holder(_hold(build.path / ".lock"))
    taken = threading.Event()

    def take() -> None:
        with build.lock(create=True):  # (a first build: the folder is not a build yet)
            taken.set()

    with caplog.at_level(logging.WARNING, logger="tl_models.core.manifest"):
        thread = threading.Thread(target=take)
        thread.start()
        assert not taken.wait(1.0)  # waits while the other process holds it
        process.kill()
        thread.join(30)
    assert taken.is_set()
    assert f"waiting for {build.path}: its lock is held by pid {process.pid}" in caplog.text


def test_a_second_fleet_change_is_refused_while_another_holds_the_route(tmp_path: Path, holder) -> None:
    route_file = tmp_path / "route.json"
    RoutingState(route_file).update(weights={"a": 1, "b": 1}, versions={"a": 1, "b": 1})
    before = route_file.read_bytes()
    process = holder(_hold(route_file, "tl_models.fleet.bento.changing"))
    refused = rf"another fleet change is in progress on {route_file} \(.* held by pid {process.pid} .*nothing was"
    with pytest.raises(FleetError, match=refused):
        swap(UNREACHABLE, route_file, "a", 2, "token")
    with pytest.raises(FleetError, match=refused):
        split(UNREACHABLE, route_file, {"a": 3, "b": 1}, "token")
    assert route_file.read_bytes() == before
    process.kill()
    process.wait(10)
    report = split(UNREACHABLE, route_file, {"a": 3, "b": 1}, "token")  # the killed holder left nothing behind
    assert [r["converged"] for r in report["phase2"]] == [False]
    assert RoutingState(route_file, poll=0).current().weights == {"a": 3.0, "b": 1.0}


def test_a_holder_read_before_it_wrote_its_line_is_still_named(tmp_path):
    """A holder writes its line just after it takes the lock: one who asks in between (the file still holds the
    previous holder's line, a process long gone) waits for the new line instead of naming the wrong process."""
    path = tmp_path / ".lock"
    path.write_text("pid 999999999 (an earlier holder) since 00:00:00\n")
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # taken here; its line follows 0.1 s later, from another thread

        def announce() -> None:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} (this test) since 00:00:01\n")
            handle.flush()

        late = threading.Timer(0.1, announce)
        late.start()
        try:
            with pytest.raises(LockHeld, match=f"held by pid {os.getpid()} "), file_lock(path, wait=False):
                pass
        finally:
            late.join()
