"""The serving batcher's scheduling: lanes side by side, the solo way for a lone request, failures kept to their
request. The ways are plain functions here (what a pass runs does not matter to the scheduling); the batcher over
real ONNX Runtime sessions is tested in test_bento.py."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tl_models.bento.batching import MicroBatcher


class Way:
    """A pass that takes ``seconds`` and doubles its input; records its batch sizes and how many ways ran at once."""

    running = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, name: str, seconds: float = 0.02):
        self.name, self.seconds = name, seconds
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with Way.lock:
            Way.running += 1
            Way.most = max(Way.most, Way.running)
        self.sizes.append(len(batch))
        try:
            if (batch < 0).any():
                raise ValueError("negative input")
            time.sleep(self.seconds)
            return batch * 2
        finally:
            with Way.lock:
                Way.running -= 1


@pytest.fixture(autouse=True)
def _reset() -> None:
    Way.running = Way.most = 0


def _burst(batcher: MicroBatcher, items: list, prepare=None) -> list:
    async def run() -> list:
        return await asyncio.gather(*(batcher.submit(i, prepare) for i in items), return_exceptions=True)

    return asyncio.run(run())


def test_a_lone_request_runs_solo_and_a_burst_runs_on_the_lanes_side_by_side():
    lanes, solo = [Way("lane0"), Way("lane1")], Way("solo")
    batcher = MicroBatcher(lanes, max_batch=4, solo=solo)
    one = np.ones((1, 3))
    for _ in range(3):  # one after the other: nothing else runs, the solo way takes each
        np.testing.assert_array_equal(_burst(batcher, [one])[0], 2 * one)
    assert solo.sizes == [1, 1, 1] and lanes[0].sizes == lanes[1].sizes == []

    results = _burst(batcher, [np.full((1, 3), i) for i in range(20)])
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, np.full((1, 3), 2 * i))  # each its own rows, in order
    assert solo.sizes == [1, 1, 1, 4]  # the burst's first pass (4 requests arrived together); then the lanes
    assert lanes[0].sizes[0] == lanes[1].sizes[0] == 4  # started at once: more than one pass's worth waited
    assert sum(lanes[0].sizes + lanes[1].sizes) == 16 and max(lanes[0].sizes + lanes[1].sizes) == 4
    assert 2 <= Way.most <= 3  # both lanes at once (and the solo pass, while the burst starts), never more


def test_without_a_solo_way_every_pass_runs_on_a_lane():
    lane = Way("lane")
    batcher = MicroBatcher([lane], max_batch=16)
    results = _burst(batcher, [np.ones((2, 3))] * 5)
    assert all(r.shape == (2, 3) for r in results)
    assert lane.sizes == [10]  # requests that arrive together share one pass
    assert Way.most == 1


def test_an_input_that_cannot_be_prepared_fails_alone():
    lane = Way("lane")
    batcher = MicroBatcher([lane], max_batch=16)

    def prepare(item: int) -> np.ndarray:
        if item == 3:
            raise ValueError("not an image")
        return np.full((1, 2), item)

    results = _burst(batcher, list(range(6)), prepare)
    assert isinstance(results[3], ValueError) and str(results[3]) == "not an image"
    for i in (0, 1, 2, 4, 5):
        np.testing.assert_array_equal(results[i], np.full((1, 2), 2 * i))


def test_a_failing_pass_is_rerun_one_request_at_a_time_so_only_the_culprit_fails():
    lane = Way("lane")
    batcher = MicroBatcher([lane], max_batch=16)
    items = [np.ones((1, 2)), np.ones((1, 2)), -np.ones((1, 2)), np.ones((1, 2))]
    results = _burst(batcher, items)
    assert isinstance(results[2], ValueError)
    assert all(isinstance(r, np.ndarray) for i, r in enumerate(results) if i != 2)
    assert lane.sizes == [4, 1, 1, 1, 1]  # the shared pass failed; then each request ran alone


def test_a_batcher_needs_a_lane():
    with pytest.raises(ValueError, match="at least one lane"):
        MicroBatcher([])
