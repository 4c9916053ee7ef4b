"""What the reliability tests of every server share: soak length, resident memory of a server's process tree,
concurrent bursts of calls, and the tally printed at the end of the run."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

import psutil
from helpers import RELIABILITY, RELIABILITY_NOTES

from tl_models.core.process import tree_rss

T = TypeVar("T")
R = TypeVar("R")

# the issue asks for 60 s per server; TL_MODELS_SOAK_SECONDS shortens it for local runs (CI keeps 60)
SOAK_SECONDS = float(os.environ.get("TL_MODELS_SOAK_SECONDS", "60"))
SOAK_WARM_UP_SECONDS = 30.0  # allocators and thread pools settle at this concurrency first: sampled every 5 s,
# Triton HTTP still rose 6% between 10 and 15 s after the first request, then stayed flat (+1.6% over 120 s)
SOAK_CONCURRENCY = 32
MAX_MEMORY_GROWTH = 0.10


def tree_pids(pid: int) -> set[int]:
    """PIDs of a process's descendants: a changed set after a burst means a worker or stub died."""
    return {child.pid for child in psutil.Process(pid).children(recursive=True)}


def burst(call: Callable[[T], R], items: Iterable[T], threads: int = 8) -> list[R]:
    """``call(item)`` for every item from ``threads`` client threads; results in order."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(call, items))


@dataclass
class Soak:
    """Outcome of :func:`soak`: calls made, failures (with a few examples) and resident memory growth."""

    calls: int = 0
    failures: list[str] = field(default_factory=list)
    rss_start: int = 0
    rss_end: int = 0

    @property
    def growth(self) -> float:
        return (self.rss_end - self.rss_start) / self.rss_start


def soak(pid: int, make_worker: Callable[[], Callable[[int], str | None]], seconds: float = SOAK_SECONDS,
         concurrency: int = SOAK_CONCURRENCY) -> Soak:
    """``concurrency`` threads each call their own ``make_worker()`` (i -> None, or what was wrong) in a loop:
    a warm-up, then ``seconds`` measured; resident memory of the server's tree is taken after the warm-up and at
    the end."""
    result, lock = Soak(), threading.Lock()
    stop = threading.Event()

    def run() -> None:
        call, i = make_worker(), 0
        while not stop.is_set():
            problem = call(i)
            i += 1
            with lock:
                result.calls += 1
                if problem is not None:
                    result.failures.append(problem)

    pool = [threading.Thread(target=run) for _ in range(concurrency)]
    for thread in pool:
        thread.start()
    try:
        time.sleep(SOAK_WARM_UP_SECONDS)
        result.rss_start = tree_rss(pid)
        time.sleep(seconds)
        result.rss_end = tree_rss(pid)
    finally:
        stop.set()
        for thread in pool:
            thread.join(timeout=120)
    return result


def record_soak(server: str, outcome: Soak) -> None:
    """Add a soak's figures to the reliability summary."""
    RELIABILITY["requests tried"] += outcome.calls
    RELIABILITY[f"soak failures ({server})"] += len(outcome.failures)
    RELIABILITY_NOTES[f"soak {server}"] = (
        f"{outcome.calls} requests in {SOAK_SECONDS:.0f} s at concurrency {SOAK_CONCURRENCY}, "
        f"RSS {outcome.rss_start / 2**20:.0f} -> {outcome.rss_end / 2**20:.0f} MiB ({outcome.growth:+.1%})")
