"""Adaptive batching of backbone passes inside one serving worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np


class MicroBatcher:
    """Adaptive batching of backbone passes inside one worker.

    Requests that arrive while a pass runs wait and go together into the next pass (up to ``max_batch``
    images), so a lone request never waits and a busy worker runs full batches. Inputs are validated before
    they are queued; if a pass fails anyway, its requests are re-run one by one so that only the culprit fails.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ):
        self._run = run
        self.max_batch = max_batch
        self._on_batch = on_batch
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (N×...) through ``run`` together with whatever else is queued; returns its N outputs."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((batch, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        jobs: list[tuple[np.ndarray, asyncio.Future]] = []
        size = 0
        while self._pending:
            batch, future = self._pending[0]
            if future.done():  # the client went away
                self._pending.pop(0)
                continue
            if jobs and size + len(batch) > self.max_batch:
                break
            jobs.append(self._pending.pop(0))
            size += len(batch)
        return jobs

    async def _drain(self) -> None:
        while self._pending:
            jobs = self._take()
            if not jobs:
                continue
            try:
                outputs = await asyncio.to_thread(self._run_jobs, [batch for batch, _ in jobs])
            except Exception as exc:
                if len(jobs) == 1:
                    _settle(jobs[0][1], error=exc)
                    continue
                for batch, future in jobs:  # isolate the failure: neighbours still get answers
                    try:
                        _settle(future, await asyncio.to_thread(self._run_jobs, [batch]))
                    except Exception as single:
                        _settle(future, error=single)
                continue
            start = 0
            for batch, future in jobs:
                _settle(future, outputs[start : start + len(batch)])
                start += len(batch)

    def _run_jobs(self, batches: list[np.ndarray]) -> np.ndarray:
        batch = batches[0] if len(batches) == 1 else np.concatenate(batches)
        if self._on_batch is not None:
            self._on_batch(len(batch))
        return self._run(batch)


def _settle(future: asyncio.Future, result: object = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
