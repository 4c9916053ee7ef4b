"""The serving batcher's scheduling: lanes side by side, the solo way for a lone request, requests that wait
sharing a pass, failures kept to their request. The ways are plain functions here (what a pass runs does not matter
to the scheduling); the batcher over real ONNX Runtime sessions is tested in test_bento.py. Every order of events
that matters is forced (a way held until the requests under test are queued), never left to the thread scheduler."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from functools import partial

import numpy as np
import pytest

from tl_models.bento.batching import MicroBatcher
from tl_models.core.runtime import CoreLock

WAIT = 10.0  # seconds a test waits for a thread before it fails


class Way:
    """A pass that doubles its input (negative input fails it) and records its batch sizes. ``meet``: the first
    pass waits there for another way's (a barrier of two), so a test passes only if two ways run at once. ``hold``:
    a pass waits until the test lets it go; ``started`` is set when one begins."""

    def __init__(self, meet: threading.Barrier | None = None):
        self.meet = meet
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.started.set()
        assert self.hold.wait(WAIT)
        if self.meet is not None and len(self.sizes) == 1:
            self.meet.wait(WAIT)  # raises BrokenBarrierError if no other way ran meanwhile
        if (batch < 0).any():
            raise ValueError("negative input")
        return batch * 2


@pytest.fixture
def batchers() -> Iterator[list[MicroBatcher]]:
    made: list[MicroBatcher] = []
    yield made
    for batcher in made:
        batcher.close()


def _queued_behind(batcher: MicroBatcher, way: Way, first: object, items: list, prepare=None) -> list:
    """Submit ``first``, hold ``way``'s pass on it until every one of ``items`` waits, then let it go: the items are
    queued together, whatever the thread scheduler does. Each request's answer or exception, ``first``'s first."""

    async def run() -> list:
        way.hold.clear()
        head = asyncio.ensure_future(batcher.submit(first, prepare))
        while not way.started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(i, prepare)) for i in items]
        await asyncio.sleep(0)  # each task runs up to its await: every item is queued
        way.hold.set()
        return await asyncio.wait_for(asyncio.gather(head, *rest, return_exceptions=True), WAIT)

    return asyncio.run(run())


def test_a_lone_request_runs_solo_and_waiting_requests_run_on_the_lanes_side_by_side(batchers):
    meet = threading.Barrier(2)
    lanes, solo = [Way(meet), Way(meet)], Way()
    batcher = MicroBatcher(lanes, max_batch=4, solo=solo)
    batchers.append(batcher)
    one = np.ones((1, 3))
    for _ in range(3):  # one after the other: nothing else runs, the solo way takes each
        np.testing.assert_array_equal(asyncio.run(batcher.submit(one)), 2 * one)
    assert solo.sizes == [1, 1, 1] and lanes[0].sizes == lanes[1].sizes == []

    solo.started.clear()
    results = _queued_behind(batcher, solo, one, [np.full((1, 3), i) for i in range(16)])
    np.testing.assert_array_equal(results[0], 2 * one)
    for i, result in enumerate(results[1:]):
        np.testing.assert_array_equal(result, np.full((1, 3), 2 * i))  # each its own rows
    assert solo.sizes == [1, 1, 1, 1]  # the queued requests went to the lanes, not to the solo way
    sizes = lanes[0].sizes + lanes[1].sizes
    assert sum(sizes) == 16 and max(sizes) <= 4  # passes of at most max_batch, both lanes at once (the barrier)


def test_a_lone_request_runs_solo_only_on_an_idle_machine_and_lanes_wait_for_a_solo_pass(batchers, tmp_path):
    """With the machine's core lock: another worker's lane pass runs, so a lone request here takes a lane; once
    the machine is idle, the solo way; another worker's solo pass holds this worker's lanes until it ends."""
    lane, solo = Way(), Way()
    cores = partial(CoreLock, tmp_path / "cores.lock")
    other_worker = cores()
    batcher = MicroBatcher([lane], solo=solo, core_lock=cores)
    batchers.append(batcher)
    one = np.ones((1, 3))
    with other_worker.lane():
        np.testing.assert_array_equal(asyncio.run(batcher.submit(one)), 2 * one)
    assert lane.sizes == [1] and solo.sizes == []
    for _ in range(2):
        np.testing.assert_array_equal(asyncio.run(batcher.submit(one)), 2 * one)
    assert lane.sizes == [1] and solo.sizes == [1, 1]  # each solo pass let go of the cores when it ended

    async def behind_a_solo_pass() -> None:
        assert other_worker.solo()
        try:
            task = asyncio.ensure_future(batcher.submit(one))  # the machine is busy: a lane's turn
            await asyncio.sleep(0.3)
            assert not task.done() and lane.sizes == [1]  # the lane waits, its pass not begun
        finally:
            other_worker.release()
        np.testing.assert_array_equal(await asyncio.wait_for(task, WAIT), 2 * one)

    asyncio.run(behind_a_solo_pass())
    assert lane.sizes == [1, 1] and solo.sizes == [1, 1]


def test_a_burst_on_an_idle_worker_starts_the_lanes_too(batchers):
    meet = threading.Barrier(2)
    lanes, solo = [Way(meet), Way(meet)], Way()
    batcher = MicroBatcher(lanes, max_batch=4, solo=solo)
    batchers.append(batcher)

    async def burst() -> list:
        solo.hold.clear()  # the solo way's pass waits until the whole burst has arrived
        tasks = [asyncio.ensure_future(batcher.submit(np.full((1, 2), i))) for i in range(16)]
        await asyncio.sleep(0)  # each task runs up to its await: every request is queued
        while not solo.started.is_set():
            await asyncio.sleep(0.001)
        solo.hold.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), WAIT)

    for i, result in enumerate(asyncio.run(burst())):
        np.testing.assert_array_equal(result, np.full((1, 2), 2 * i))
    # the solo way took one pass (the requests that found the worker idle); both lanes ran at once
    assert len(solo.sizes) == 1 and solo.sizes[0] <= 4 and lanes[0].sizes and lanes[1].sizes
    assert sum(solo.sizes + lanes[0].sizes + lanes[1].sizes) == 16


def test_without_a_solo_way_requests_that_wait_share_one_pass(batchers):
    lane = Way()
    batcher = MicroBatcher([lane], max_batch=16)
    batchers.append(batcher)
    results = _queued_behind(batcher, lane, np.ones((1, 3)), [np.ones((2, 3))] * 5)
    assert [r.shape for r in results] == [(1, 3)] + [(2, 3)] * 5
    assert lane.sizes == [1, 10]


def test_an_input_that_cannot_be_prepared_fails_alone(batchers):
    lane = Way()
    batcher = MicroBatcher([lane], max_batch=16)
    batchers.append(batcher)

    def prepare(item: int) -> np.ndarray:
        if item == 3:
            raise ValueError("not an image")
        return np.full((1, 2), item)

    results = _queued_behind(batcher, lane, 0, list(range(1, 6)), prepare)
    assert isinstance(results[3], ValueError) and str(results[3]) == "not an image"
    for i in (0, 1, 2, 4, 5):
        np.testing.assert_array_equal(results[i], np.full((1, 2), 2 * i))
    assert lane.sizes == [1, 4]  # the other four still shared a pass


def test_a_failing_pass_is_rerun_one_request_at_a_time_so_only_the_culprit_fails(batchers):
    lane = Way()
    batcher = MicroBatcher([lane], max_batch=16)
    batchers.append(batcher)
    items = [np.ones((1, 2)), np.ones((1, 2)), -np.ones((1, 2)), np.ones((1, 2))]
    results = _queued_behind(batcher, lane, np.ones((1, 2)), items)
    assert isinstance(results[3], ValueError)
    assert all(isinstance(r, np.ndarray) for i, r in enumerate(results) if i != 3)
    assert lane.sizes == [1, 4, 1, 1, 1, 1]  # the shared pass failed; then each request ran alone


def test_a_closed_batcher_refuses_requests_and_its_threads_end(batchers):
    batcher = MicroBatcher([Way(), Way()], solo=Way())
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(batcher.submit(np.ones((1, 2))))
    assert not any(thread.is_alive() for thread in batcher._threads)


def test_a_batcher_needs_a_lane():
    with pytest.raises(ValueError, match="at least one lane"):
        MicroBatcher([])


def test_a_pass_holds_two_images_per_lane_on_the_cpu_sixteen_on_a_gpu_unless_told(tmp_path):
    from tl_models.bento.engine import ServingConfig, pass_size

    assert pass_size(ServingConfig(tmp_path, providers="cpu")) == 2
    assert pass_size(ServingConfig(tmp_path, providers="cuda")) == 16
    assert pass_size(ServingConfig(tmp_path, providers="cpu", max_batch=8)) == 8
    assert ServingConfig.from_env(tmp_path).max_batch is None  # TL_MODELS_MAX_BATCH unset: the default above
