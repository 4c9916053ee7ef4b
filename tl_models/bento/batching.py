"""Adaptive batching of backbone passes inside one serving worker, over lanes that run side by side."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Run = Callable[[np.ndarray], np.ndarray]
Prepare = Callable[[Any], np.ndarray]


@dataclass
class _Lane:
    """One way to run a pass (its own ONNX Runtime session) and the thread that always runs it."""

    run: Run
    thread: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="lane"))


@dataclass
class _Job:
    item: Any  # an N×... batch, or what ``prepare`` turns into one (encoded image bytes)
    prepare: Prepare | None
    future: asyncio.Future


class MicroBatcher:
    """Adaptive batching of backbone passes inside one worker.

    ``lanes`` run passes side by side, one pass each at a time (on a CPU: one single-threaded session per core,
    the most images per second); ``solo``, when given, runs a pass while no other pass runs (a session with every
    core's threads: the shortest pass for a lone request). A request that finds a way free starts a pass at once;
    requests that arrive while every lane is busy wait and go together into the next free lane's pass (up to
    ``max_batch`` images). Each pass runs in its lane's own thread, images decoded there (``prepare``) right
    before the pass: one thread hop per request. A request whose input cannot be prepared fails alone; if a pass
    fails anyway, its requests are re-run one by one so that only the culprit fails.
    """

    def __init__(
        self,
        lanes: Sequence[Run],
        max_batch: int = 16,
        on_batch: Callable[[int], None] | None = None,
        solo: Run | None = None,
    ):
        if not lanes:
            raise ValueError("a batcher needs at least one lane")
        self.max_batch = max_batch
        self._on_batch = on_batch
        self._free = [_Lane(run) for run in reversed(lanes)]
        self._solo = _Lane(solo) if solo is not None else None
        self._busy = 0  # passes started and not finished
        self._starting = 0  # of which not yet running (they take their requests when they do)
        self._pending: deque[_Job] = deque()
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, item: Any, prepare: Prepare | None = None) -> np.ndarray:
        """Run ``item`` (an N×... batch, or ``prepare(item)`` in the lane's thread) through a pass together with
        whatever else is queued; returns its N outputs, or raises what preparing or the pass raised for it."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(item, prepare, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        """Start a pass on a free way while more requests wait than the passes about to start will take: the solo
        way only when no other pass runs. A pass takes its requests when it starts, so requests that arrive
        together share it."""
        while len(self._pending) > self._starting * self.max_batch:
            if self._busy == 0 and self._solo is not None:
                lane, solo = self._solo, True
            elif self._free:
                lane, solo = self._free.pop(), False
            else:
                return
            self._busy += 1
            self._starting += 1
            task = asyncio.get_running_loop().create_task(self._pass(lane, solo))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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

    async def _pass(self, lane: _Lane, solo: bool) -> None:
        self._starting -= 1
        jobs = self._take()
        try:
            if jobs:
                work = [(job.item, job.prepare) for job in jobs]
                results = await asyncio.get_running_loop().run_in_executor(lane.thread, self._run_jobs, lane.run, work)
                for job, result in zip(jobs, results):
                    _settle(job.future, result)
        except BaseException:  # cancelled (the worker stops): its requests must not hang
            for job in jobs:
                job.future.cancel()
            raise
        finally:
            self._busy -= 1
            if not solo:
                self._free.append(lane)
            self._dispatch()

    def _run_jobs(self, run: Run, work: list[tuple[Any, Prepare | None]]) -> list[Any]:
        """In the lane's thread: prepare each job's input, run the pass, split its outputs by job; per job its
        outputs or the exception that failed it."""
        results: list[Any] = [None] * len(work)
        inputs: dict[int, np.ndarray] = {}
        for index, (item, prepare) in enumerate(work):
            try:
                inputs[index] = prepare(item) if prepare is not None else item
            except Exception as exc:
                results[index] = exc
        if not inputs:
            return results
        arrays = list(inputs.values())
        try:
            outputs = self._forward(run, arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        except Exception as exc:
            if len(inputs) == 1:
                results[next(iter(inputs))] = exc
                return results
            for index, array in inputs.items():  # isolate the failure: neighbours still get answers
                try:
                    results[index] = self._forward(run, array)
                except Exception as single:
                    results[index] = single
            return results
        start = 0
        for index, array in inputs.items():
            results[index] = outputs[start : start + len(array)]
            start += len(array)
        return results

    def _forward(self, run: Run, batch: np.ndarray) -> np.ndarray:
        if self._on_batch is not None:
            self._on_batch(len(batch))
        return run(batch)


def _settle(future: asyncio.Future, result: np.ndarray | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
