"""A pass with parts (``tl_models.bento.paths``): the trunk once on a batch, then each tail once on the rows of the
requests that need it, each request answered with its own rows of the paths it asked for; the batcher groups such
requests into one pass and keeps a failure to its request. Real ONNX Runtime sessions over tiny graphs."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

import numpy as np
import onnx
from onnx import TensorProto, helper

from tl_models.bento.batching import MicroBatcher
from tl_models.bento.paths import trunk_and_tails
from tl_models.core.runtime import create_session


def _graph(nodes: list, inputs: list, outputs: list, initializers: tuple = ()) -> object:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return create_session(model.SerializeToString(), threads=1)


def _trunk() -> object:
    """image uint8 N×2 -> activation: its float value + 1 (a trunk that the tails' answers must show)."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    return _graph(
        [
            helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "one"], ["activation"]),
        ],
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 2])],
        [helper.make_tensor_value_info("activation", TensorProto.FLOAT, ["n", 2])],
        (one,),
    )


def _tail(factor: float) -> object:
    """activation -> embedding: times ``factor`` (each path's own)."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [factor])
    return _graph(
        [helper.make_node("Mul", ["activation", "scale"], ["embedding"])],
        [helper.make_tensor_value_info("activation", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 2])],
        (scale,),
    )


def test_each_request_gets_its_rows_of_each_path_it_needs():
    trunk, frozen, tuned = _trunk(), _tail(10.0), _tail(100.0)
    batch = np.arange(10, dtype=np.uint8).reshape(5, 2)  # three requests: rows 0-1, 2, 3-4
    needs = [(2, (("", frozen),)), (1, (("", frozen), ("a:2", tuned))), (2, (("a:2", tuned),))]
    answers = trunk_and_tails(trunk, batch, needs)
    activation = batch.astype(np.float32) + 1
    assert set(answers[0]) == {""} and np.array_equal(answers[0][""], activation[0:2] * 10)
    assert set(answers[1]) == {"", "a:2"}
    assert np.array_equal(answers[1][""], activation[2:3] * 10) and np.array_equal(
        answers[1]["a:2"], activation[2:3] * 100
    )
    assert set(answers[2]) == {"a:2"} and np.array_equal(answers[2]["a:2"], activation[3:5] * 100)


def test_the_batcher_groups_requests_with_different_needs_into_one_pass_and_isolates_a_failure():
    trunk, frozen, tuned = _trunk(), _tail(10.0), _tail(100.0)
    passes: list[int] = []
    queued = threading.Event()  # the first pass waits until every request is queued: the rest share the next

    def way(batch: np.ndarray, needs: list) -> list:
        passes.append(len(batch))
        assert queued.wait(10)
        if (batch == 255).any():
            raise ValueError("a poisoned image")
        return trunk_and_tails(trunk, batch, needs)

    batcher = MicroBatcher([way], max_batch=8, parts=True)

    async def run() -> list:
        inputs = [np.full((1, 2), value, np.uint8) for value in (1, 2, 255, 3)]
        wanted = [(("", frozen),), (("a:2", tuned),), (("", frozen),), (("", frozen), ("a:2", tuned))]
        tasks = [asyncio.ensure_future(batcher.submit(item, None, need)) for item, need in zip(inputs, wanted)]
        await asyncio.sleep(0.05)  # every submit has queued its request
        queued.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        first, second, poisoned, fourth = asyncio.run(run())
    finally:
        batcher.close()
    assert np.array_equal(first[""], [[20.0, 20.0]]) and np.array_equal(second["a:2"], [[300.0, 300.0]])
    assert isinstance(poisoned, ValueError)
    assert np.array_equal(fourth[""], [[40.0, 40.0]]) and np.array_equal(fourth["a:2"], [[400.0, 400.0]])
    assert max(passes) > 1  # requests with different needs shared a pass (then were re-run alone after the failure)


def test_a_plain_batcher_still_hands_its_way_the_batch_alone():
    batcher = MicroBatcher([partial(np.multiply, 2)], max_batch=4)
    try:
        doubled = asyncio.run(batcher.submit(np.ones((1, 2))))
    finally:
        batcher.close()
    assert np.array_equal(doubled, [[2.0, 2.0]])
