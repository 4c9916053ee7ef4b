"""The soak helper of the reliability tests judges steady state: memory that grows during warm-up and then stays
flat passes, a steady leak fails (both on a real process whose memory we control)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from reliability import MAX_MEMORY_GROWTH, soak

# a process that first allocates RAMP MiB over ~3 s (what a server's allocators do under first load), then either
# stays flat or keeps allocating LEAK MiB per second
PROGRAM = """
import sys, time
leak, held = float(sys.argv[1]), []
for _ in range(30):
    held.append(b"\\x01" * (4 << 20))  # 120 MiB, touched
    time.sleep(0.1)
while True:
    if leak:
        held.append(b"\\x01" * int(leak * (1 << 20) / 4))
    time.sleep(0.25)
"""


def _worker():
    def call(i: int) -> None:
        time.sleep(0.005)

    return call


@pytest.fixture
def process() -> Iterator[Callable[[float], int]]:
    started: list[subprocess.Popen] = []

    def start(leak_mib_per_s: float) -> int:
        started.append(subprocess.Popen([sys.executable, "-c", PROGRAM, str(leak_mib_per_s)]))
        return started[-1].pid

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_memory_that_settles_after_its_warm_up_passes(process) -> None:
    outcome = soak(process(0), _worker, seconds=8, concurrency=2, warm_up_requests=100, min_warm_up=2, max_warm_up=30)
    assert outcome.warm_up_seconds >= 10  # waited for the ramp to end and the memory to hold still
    assert outcome.rss_start > 120 * 2**20 and abs(outcome.growth) < 0.02, outcome.samples
    assert outcome.growth < MAX_MEMORY_GROWTH and not outcome.failures and outcome.calls > 100


@pytest.mark.slow
def test_a_steady_leak_fails_the_bound(process) -> None:
    outcome = soak(
        process(5), _worker, seconds=8, concurrency=2, warm_up_requests=100, min_warm_up=2, max_warm_up=12
    )  # it never settles: the warm-up ends at its bound
    assert outcome.warm_up_seconds >= 12
    # 5 MiB/s over 8 s on ~180 MiB: about +22%
    assert outcome.growth > MAX_MEMORY_GROWTH, outcome.samples
