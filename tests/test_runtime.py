"""ONNX Runtime session factory: provider choice, overrides, and logging of what was really obtained."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tl_models.core import runtime
from tl_models.core.errors import BadRequest
from tl_models.core.runtime import (
    CoreLock,
    active_provider,
    create_session,
    gpu_count,
    lane_sessions,
    resolve_providers,
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path_factory.mktemp("onnx") / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), path)
    return path


def test_explicit_and_env_overrides(monkeypatch):
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(["trt", "cuda"]) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    monkeypatch.setenv("TL_MODELS_PROVIDERS", "cuda,cpu")
    assert resolve_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(BadRequest, match="unknown execution provider 'tpu'"):
        resolve_providers("tpu")


def test_default_order_follows_the_machine(monkeypatch):
    monkeypatch.delenv("TL_MODELS_PROVIDERS", raising=False)
    providers = resolve_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in providers) == (gpu_count() > 0)


def test_session_logs_the_provider_it_got(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="tl_models.core.runtime"):
        session = create_session(tiny_model, providers="cpu", threads=1)
    assert active_provider(session) == "CPUExecutionProvider"
    assert "providers ['CPUExecutionProvider']" in caplog.text
    out = session.run(None, {"x": np.array([[-1, 2, -3, 4]], dtype=np.float32)})[0]
    assert out.tolist() == [[0, 2, 0, 4]]


@pytest.mark.skipif(gpu_count() > 0, reason="checks the fallback on a machine without a GPU")
def test_fallback_from_gpu_to_cpu_is_a_warning(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="tl_models.core.runtime"):
        session = create_session(tiny_model, providers="cuda")
    assert active_provider(session) == "CPUExecutionProvider"
    assert "fell back to ['CPUExecutionProvider']" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA device")
def test_cuda_provider_on_gpu(tiny_model):
    session = create_session(tiny_model, providers="cuda")
    assert active_provider(session) == "CUDAExecutionProvider"


def test_serving_sessions_can_stop_spinning_and_spinning_ones_stop_when_a_run_ends(tiny_model):
    """Servers share the CPU between sessions and request handling: their sessions must not busy-wait, and a
    spinning session (a lone request's) must not go on spinning between requests."""
    spin, stop = "session.intra_op.allow_spinning", "session.force_spinning_stop"
    quiet = create_session(tiny_model, providers="cpu", threads=1, spin=False).get_session_options()
    assert quiet.get_session_config_entry(spin) == "0" and quiet.intra_op_num_threads == 1
    with pytest.raises(RuntimeError, match="does not have configuration"):
        quiet.get_session_config_entry(stop)
    spinning = create_session(tiny_model, providers="cpu").get_session_options()
    assert spinning.get_session_config_entry(spin) == "1" and spinning.get_session_config_entry(stop) == "1"


def test_the_core_lock_lets_lanes_run_side_by_side_and_a_solo_pass_only_alone_across_processes(tmp_path):
    """Every serving process's passes on one machine: lanes hold the cores together, a solo pass only on an idle
    machine; a lane waits for another process's solo pass, which the kernel ends when that process dies."""
    path = tmp_path / "cores.lock"
    lane, other_lane, solo = CoreLock(path), CoreLock(path), CoreLock(path)
    with other_lane.lane():
        with lane.lane():  # side by side: the second did not wait
            assert not solo.solo()
        assert not solo.solo()  # one lane still runs
    assert solo.solo()
    solo.release()

    hold = (
        "import sys; from tl_models.core.runtime import CoreLock; assert CoreLock(sys.argv[1]).solo(); "
        "print('held', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", hold, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    started, finish = threading.Event(), threading.Event()

    def lane_pass() -> None:
        with lane.lane():
            started.set()
            finish.wait(10)

    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        assert not solo.solo()
        waiting = threading.Thread(target=lane_pass, daemon=True)
        waiting.start()
        assert not started.wait(0.3)  # the lane waits for the other process's solo pass
    finally:
        child.communicate(timeout=30)  # it ends without letting go
    assert child.returncode == 0 and started.wait(10)
    assert not solo.solo()  # the lane's pass runs now
    finish.set()
    waiting.join(10)
    assert solo.solo()
    solo.release()


def _layout(sessions) -> tuple[list[tuple[int, str]], tuple[int, str] | None]:
    """(intra-op threads, spinning) of each lane and of the solo session (0 threads: ONNX Runtime's default)."""

    def facts(session):
        options = session.get_session_options()
        return options.intra_op_num_threads, options.get_session_config_entry("session.intra_op.allow_spinning")

    lanes, solo = sessions
    return [facts(lane) for lane in lanes], None if solo is None else facts(solo)


def test_lane_sessions_of_a_lone_worker_and_of_one_worker_among_several(tiny_model, monkeypatch):
    """A lone worker: single-threaded lanes, one per core, and a solo session with every core. One worker of
    several (``shared``): lanes over its share of the cores, and still a solo session with every core of the machine
    (a lone request gets the whole machine); none where one core is all there is."""
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    assert _layout(lane_sessions(tiny_model, 4, None, "cpu")) == ([(1, "0")] * 4, (0, "1"))
    assert _layout(lane_sessions(tiny_model, 1, 2, "cpu", spin=False)) == ([(2, "0")], None)
    assert _layout(lane_sessions(tiny_model, 2, 2, "cpu", spin=False, shared=True)) == ([(1, "0")] * 2, (0, "0"))
    assert _layout(lane_sessions(tiny_model, 1, 1, "cpu", spin=False, shared=True)) == ([(1, "0")], (0, "0"))
    monkeypatch.setattr(runtime, "available_cores", lambda: 1)
    assert _layout(lane_sessions(tiny_model, 1, 1, "cpu", shared=True)) == ([(1, "0")], None)
