"""Adaptive batching of backbone passes inside one serving worker, over lanes that run side by side."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from ..core.runtime import CoreLock

Run = Callable[..., Any]  # batch -> outputs; with ``parts``: (batch, [(rows, need) per request]) -> per request
Prepare = Callable[[Any], np.ndarray]


@dataclass
class _Job:
    item: Any  # an N×... batch, or what ``prepare`` turns into one (encoded image bytes)
    prepare: Prepare | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    need: Any = None  # with ``parts``: what the request needs of the pass (handed to the way with its rows)


class MicroBatcher:
    """Adaptive batching of backbone passes inside one worker.

    ``lanes`` run passes side by side, one pass each at a time (on a CPU: one single-threaded session per core,
    the most images per second); ``solo``, when given, runs the pass of a request that finds the worker idle (a
    session with every core's threads: the shortest pass for a lone request). With ``core_lock`` (on a CPU:
    :class:`~tl_models.core.runtime.CoreLock`, one per way) the passes of every worker on the machine keep out of
    each other's way: the solo way only where no pass runs anywhere, a lane once no solo pass does. Each way has its
    own thread, which
    takes the waiting requests itself (up to ``max_batch`` images) as soon as it is free: a lane that finishes a
    pass starts the next one at once, without a round trip through the event loop. Requests that arrive while a
    pass runs go to the lanes; requests that wait share the next pass.
    Images are decoded in the way's thread (``prepare``) right before the pass. A request whose input cannot be
    prepared fails alone; if a pass fails anyway, its requests are re-run one by one so that only the culprit
    fails. With ``parts``, each request also says what it needs of the pass (``submit(..., need=...)``) and a way is
    called with the batch and every request's (rows, need), returning each request's answer: a pass whose requests
    need different things of it (a trunk, then the tails each needs, :mod:`tl_models.bento.paths`).
    """

    def __init__(
        self,
        lanes: Sequence[Run],
        max_batch: int = 16,
        on_batch: Callable[[int], None] | None = None,
        solo: Run | None = None,
        core_lock: Callable[[], CoreLock] | None = None,
        parts: bool = False,
    ):
        if not lanes:
            raise ValueError("a batcher needs at least one lane")
        self.max_batch = max_batch
        self._parts = parts
        self._on_batch = on_batch
        self._lock = threading.Lock()
        self._lane_free = threading.Condition(self._lock)
        self._solo_free = threading.Condition(self._lock)
        self._pending: deque[_Job] = deque()
        self._busy = 0  # passes running
        self._solo_turn = False  # a request found the worker idle: the solo way takes the next pass
        self._has_solo = solo is not None
        self._solo_lock = core_lock() if core_lock is not None and solo is not None else None
        self._closed = False
        if core_lock is not None:
            lanes = [partial(_on_shared_cores, run, core_lock()) for run in lanes]
        ways = [(run, False) for run in lanes] + ([(solo, True)] if solo is not None else [])
        self._threads = [
            threading.Thread(target=self._serve, args=way, name=f"{'solo' if way[1] else 'lane'}-{i}", daemon=True)
            for i, way in enumerate(ways)
        ]
        for thread in self._threads:
            thread.start()

    async def submit(self, item: Any, prepare: Prepare | None = None, need: Any = None) -> Any:
        """Run ``item`` (an N×... batch, or ``prepare(item)`` in the way's thread) through a pass together with
        whatever else waits; returns its N outputs (with ``parts``: what the way gives it for ``need``), or raises
        what preparing or the pass raised for it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(_Job(item, prepare, future, loop, need))
            if self._has_solo and self._busy == 0 and self._machine_idle():  # the solo way's turn
                self._solo_turn = True
                self._solo_free.notify()
            else:
                self._lane_free.notify()
        return await future

    def close(self) -> None:
        """Stop the ways' threads once their passes end; requests still waiting are cancelled."""
        with self._lock:
            self._closed = True
            if self._solo_turn and self._solo_lock is not None:  # taken for a pass that will not run
                self._solo_lock.release()
            waiting = list(self._pending)
            self._pending.clear()
            self._lane_free.notify_all()
            self._solo_free.notify_all()
        for job in waiting:
            with suppress(RuntimeError):  # its loop is closed: nobody waits
                job.loop.call_soon_threadsafe(job.future.cancel)
        for thread in self._threads:
            thread.join()

    def _serve(self, run: Run, solo: bool) -> None:
        """One way's thread: take the waiting requests when this way may, run the pass, answer, again. The solo
        way takes the requests that found the worker idle (and those that arrived with them); a lane, every other.
        Ending a pass and taking the next waiting requests is one step, before the answers go out: the worker never
        looks idle in between, and a client answered finds it idle."""
        ready = self._solo_free if solo else self._lane_free
        done: tuple[list[_Job], list[Any]] | None = None  # the pass just run and its results
        while True:
            with self._lock:
                if done is not None:
                    self._busy -= 1
                    if solo and self._solo_lock is not None:
                        self._solo_lock.release()
                jobs = self._start() if self._may_start(solo) else None
            if done is not None:
                _settle(*done)
            if jobs is None:
                with self._lock:
                    while not self._closed and not self._may_start(solo):
                        ready.wait()
                    if self._closed:
                        return
                    jobs = self._start()
            try:
                done = jobs, self._run_jobs(run, [(job.item, job.prepare, job.need) for job in jobs])
            except BaseException as exc:  # a bug here: the requests fail, the way goes on
                done = jobs, [exc] * len(jobs)

    def _machine_idle(self) -> bool:
        """Under the lock, this worker idle: the solo way's turn is taken already, or no pass runs on the machine
        (its cores are the solo way's until that pass ends)."""
        return self._solo_turn or self._solo_lock is None or self._solo_lock.solo()

    def _may_start(self, solo: bool) -> bool:
        return bool(self._pending) and self._solo_turn == solo

    def _start(self) -> list[_Job]:
        """Under the lock: take the next pass's requests; wake a lane if more wait."""
        self._solo_turn = False
        jobs = self._take()
        self._busy += 1
        if self._pending:
            self._lane_free.notify()
        return jobs

    def _take(self) -> list[_Job]:
        jobs: list[_Job] = []
        size = 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # the client went away
                self._pending.popleft()
                continue
            images = len(job.item) if job.prepare is None else 1
            if jobs and size + images > self.max_batch:
                break
            jobs.append(self._pending.popleft())
            size += images
        return jobs

    def _run_jobs(self, run: Run, work: list[tuple[Any, Prepare | None, Any]]) -> list[Any]:
        """Prepare each job's input, run the pass, split its outputs by job (with ``parts``: the way does, from each
        job's rows and need); per job its outputs or the exception that failed it."""
        results: list[Any] = [None] * len(work)
        inputs: dict[int, np.ndarray] = {}
        for index, (item, prepare, _) in enumerate(work):
            try:
                inputs[index] = prepare(item) if prepare is not None else item
            except Exception as exc:
                results[index] = exc
        if not inputs:
            return results
        arrays = list(inputs.values())
        needs = [(len(array), work[index][2]) for index, array in inputs.items()] if self._parts else None
        try:
            outputs = self._forward(run, arrays[0] if len(arrays) == 1 else np.concatenate(arrays), needs)
        except Exception as exc:
            if len(inputs) == 1:
                results[next(iter(inputs))] = exc
                return results
            for index, array in inputs.items():  # isolate the failure: neighbours still get answers
                try:
                    alone = [(len(array), work[index][2])] if self._parts else None
                    output = self._forward(run, array, alone)
                    results[index] = output[0] if self._parts else output
                except Exception as single:
                    results[index] = single
            return results
        if self._parts:
            for index, output in zip(inputs, outputs):
                results[index] = output
            return results
        start = 0
        for index, array in inputs.items():
            results[index] = outputs[start : start + len(array)]
            start += len(array)
        return results

    def _forward(self, run: Run, batch: np.ndarray, needs: list[tuple[int, Any]] | None) -> Any:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        return run(batch) if needs is None else run(batch, needs)


def _on_shared_cores(run: Run, cores: CoreLock, *args: Any) -> Any:
    """A lane's pass, once no solo pass runs on the machine."""
    with cores.lane():
        return run(*args)


def _settle(jobs: list[_Job], results: list[Any]) -> None:
    """Answer ``jobs`` (each its outputs or its exception) on their event loops, from a way's thread: one wake-up
    per loop. Nothing to do for a loop that has closed: nobody waits for its answers."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any]]] = {}
    for job, result in zip(jobs, results):
        by_loop.setdefault(job.loop, []).append((job, result))
    for loop, answers in by_loop.items():
        with suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(_answer, answers)


def _answer(answers: list[tuple[_Job, Any]]) -> None:
    for job, result in answers:
        if job.future.done():  # the client went away
            continue
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)
