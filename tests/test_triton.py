"""A real tritonserver (bundled in nvidia-pytriton) serving a real build, over HTTP and gRPC.

One module-scoped server on free ports with the python flavour; the build has heads ``a`` (versions 1 and 2)
and ``b``. Answers are compared with ONNX Runtime run directly on the build's backbone.onnx + head.onnx.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tl_models.bench.loadgen import TritonCaller, drive
from tl_models.cli import main as cli_main
from tl_models.core.preprocess import preprocess_bytes
from tl_models.core.routing import read_route
from tl_models.triton.config import RepositoryOptions
from tl_models.triton.launcher import start as start_triton
from tl_models.triton.repository import write_repository

from helpers import RELIABILITY, bytes_input, live, load_triton_until, sticky_head, url

pytestmark = pytest.mark.slow
CLIENTS = {"http": httpclient, "grpc": grpcclient}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bytes_ensemble_matches_onnxruntime_and_gives_topk_labels(served, reference, images, protocol):
    module = CLIENTS[protocol]
    client = module.InferenceServerClient(url(served, protocol))
    model, version = f"{served['name']}_a", live(served, "a")
    expected = reference(images, "a", version)
    for index, data in enumerate(images):
        logits = client.infer(
            model, [bytes_input(module, [data])], outputs=[module.InferRequestedOutput("logits")]
        ).as_numpy("logits")
        np.testing.assert_allclose(logits[0], expected[index], atol=1e-4, rtol=0)
        top = client.infer(
            model, [bytes_input(module, [data])], outputs=[module.InferRequestedOutput("logits", class_count=3)]
        ).as_numpy("logits")
        entries = [item.decode().split(":") for item in top.reshape(-1)]
        order = np.argsort(-expected[index])[:3]
        assert [int(i) for _, i, _ in entries] == order.tolist()
        assert [label for *_, label in entries] == [reference.labels[i] for i in order]
        np.testing.assert_allclose([float(s) for s, _, _ in entries], expected[index][order], atol=1e-4)
    assert (expected.argmax(1) == np.arange(len(images))).mean() >= 0.5, "the head should know its digits"


def test_tensor_ensemble_gives_the_same_answers(served, reference, images):
    client = grpcclient.InferenceServerClient(served["server"].grpc_url)
    batch = np.stack([preprocess_bytes(data, reference.spec) for data in images])
    tensor = grpcclient.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    logits = client.infer(f"{served['name']}_a_tensor", [tensor]).as_numpy("logits")
    np.testing.assert_allclose(logits, reference(images, "a", live(served, "a")), atol=1e-4, rtol=0)
    from_bytes = client.infer(f"{served['name']}_a", [bytes_input(grpcclient, images)]).as_numpy("logits")
    np.testing.assert_allclose(logits, from_bytes, atol=1e-5, rtol=0)


def test_dynamic_batching_under_16_concurrent_clients(served, images):
    backbone = f"{served['name']}_backbone"
    admin = httpclient.InferenceServerClient(served["server"].http_url)

    def counts() -> tuple[int, int]:
        stats = admin.get_inference_statistics(backbone)["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    before = counts()
    records = drive(
        lambda: TritonCaller("http", served["server"].http_url, f"{served['name']}_b"), images, 16, max_requests=16 * 6
    )[0]
    errors = [r.error for r in records if r.error]
    after = counts()
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert not errors
    assert inferences == 16 * 6
    assert executions < inferences, f"no dynamic batching: {executions} executions for {inferences} inferences"


def test_router_split_sticky_key_and_explicit_head(served, reference, images) -> None:
    name, module = served["name"], grpcclient
    client = module.InferenceServerClient(served["server"].grpc_url)
    outputs = [module.InferRequestedOutput("logits"), module.InferRequestedOutput("head")]
    results: list = []
    done = threading.Semaphore(0)

    def callback(result, error):
        results.append(error or result)
        done.release()

    for i in range(2000):
        client.async_infer(name, [bytes_input(module, [images[i % len(images)]])], callback, outputs=outputs)
        if i >= 64:  # at most 64 requests in flight
            done.acquire()
    for _ in range(min(2000, 64)):
        done.acquire()
    failures = [r for r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    heads = Counter(r.as_numpy("head")[0, 0].decode() for r in results)
    share = heads[f"a:{live(served, 'a')}"] / 2000
    assert abs(share - 0.90) <= 0.03, heads
    assert heads[f"a:{live(served, 'a')}"] + heads[f"b:{live(served, 'b')}"] == 2000

    def ask(data: bytes, key: str | None = None, head: str | None = None):
        inputs = [bytes_input(module, [data])]
        if key is not None:
            inputs.append(bytes_input(module, [key.encode()], "route_key"))
        if head is not None:
            inputs.append(bytes_input(module, [head.encode()], "route_head"))
        result = client.infer(name, inputs, outputs=outputs)
        return result.as_numpy("logits")[0], result.as_numpy("head")[0, 0].decode()

    route = read_route(served["repo"] / name / "route.json")
    for key in (f"user-{n}" for n in range(20)):  # sticky: the head the README's rule gives the key, every time
        expected_head = sticky_head(route.weights, route.versions, key)
        assert {ask(images[0], key=key)[1] for _ in range(3)} == {expected_head}, f"key {key} is not sticky"
    logits, head = ask(images[3], head="b")
    assert head == f"b:{live(served, 'b')}"
    np.testing.assert_allclose(logits, reference([images[3]], "b", live(served, "b"))[0], atol=1e-4, rtol=0)
    with pytest.raises(InferenceServerException, match="unknown head 'zzz'") as unknown:
        ask(images[0], head="zzz")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"  # the error table: unknown head -> NOT_FOUND


def test_the_router_runs_the_graphs_in_its_own_process_on_the_cpu(served, reference, images):
    """Python flavour on the CPU: the router's backbone pass and head runs are sessions of its own (no BLS call), so
    the backbone and head models count none of the router's images, and the answers are still the reference's."""
    name = served["name"]
    admin = httpclient.InferenceServerClient(served["server"].http_url)

    def counted() -> list[int]:
        return [
            sum(int(s["inference_count"]) for s in admin.get_inference_statistics(model)["model_stats"])
            for model in (f"{name}_backbone", f"{name}_head_b")
        ]

    before = counted()
    client = grpcclient.InferenceServerClient(served["server"].grpc_url)
    inputs = [bytes_input(grpcclient, images[:5]), bytes_input(grpcclient, [b"b"] * 5, "route_head")]
    logits = client.infer(name, inputs).as_numpy("logits")
    np.testing.assert_allclose(logits, reference(images[:5], "b", live(served, "b")), atol=1e-4, rtol=0)
    assert counted() == before
    client.infer(f"{name}_b", [bytes_input(grpcclient, images[:5])])  # the ensembles still call both models
    expected = [before[0] + 5, before[1] + 5]
    deadline = time.monotonic() + 10  # a step's statistics may be recorded just after the ensemble has answered
    while counted() != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # and nothing more arrives late: the router's 5 images are in neither count
    assert counted() == expected


def test_router_instances_of_several_share_the_cores_and_give_the_same_answers(served, reference, images, tmp_path):
    """`--instances 2`: each router instance runs a batch on a session with its share of the cores and a lone image
    on a session with every core (spinning during its run, on an idle machine); both give the reference's answers."""
    repo = write_repository(served["build"], tmp_path / "repo", RepositoryOptions(flavour="python", instances=2))
    server = start_triton(repo.path, workdir=tmp_path / "tritonserver", timeout=600)
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        route_b = [b"b"]
        for image in images[:3]:  # one lone image at a time: the solo session
            inputs = [bytes_input(httpclient, [image]), bytes_input(httpclient, route_b, "route_head")]
            logits = client.infer(served["name"], inputs).as_numpy("logits")
            np.testing.assert_allclose(logits, reference([image], "b", 1), atol=1e-4, rtol=0)
        inputs = [bytes_input(httpclient, images[:5]), bytes_input(httpclient, route_b * 5, "route_head")]
        logits = client.infer(served["name"], inputs).as_numpy("logits")  # a batch: the instance's own session
        np.testing.assert_allclose(logits, reference(images[:5], "b", 1), atol=1e-4, rtol=0)
        log = server.log_path.read_text(errors="replace")
        assert log.count("in the router (solo): ONNX Runtime providers") == 2, log[-2000:]  # one per instance
    finally:
        server.stop()


@pytest.mark.parametrize("model_suffix", ["_a", ""])
def test_bad_request_gets_an_error_and_its_neighbours_are_answered(served, reference, images, model_suffix):
    model = served["name"] + model_suffix
    client = httpclient.InferenceServerClient(served["server"].http_url, concurrency=16)
    with pytest.raises(InferenceServerException, match="not an image"):
        client.infer(model, [bytes_input(httpclient, [b"this is not an image"])])
    answer = client.infer(model, [bytes_input(httpclient, [images[1]])]).as_numpy("logits")
    assert answer.shape == (1, len(reference.labels))
    batch = [images[i % len(images)] for i in range(15)] + [b"\x89PNG truncated"]
    pending = [client.async_infer(model, [bytes_input(httpclient, [data])]) for data in batch]
    outcomes = []
    for request in pending:
        try:
            outcomes.append(request.get_result().as_numpy("logits"))
        except InferenceServerException as exc:
            outcomes.append(exc)
    assert all(isinstance(o, np.ndarray) for o in outcomes[:15])
    assert isinstance(outcomes[15], InferenceServerException)


def test_swap_under_load_loses_no_request(served, reference, images):
    name, repo = served["name"], served["repo"]
    assert live(served, "a") == 1
    stop = threading.Event()
    records, threads = load_triton_until(served, images, stop, force_head="a")
    time.sleep(2)
    code = cli_main(
        [
            "triton",
            "swap",
            "--url",
            f"http://{served['server'].http_url}",
            "--repo",
            str(repo),
            "--build",
            name,
            "--head",
            "a",
            "--version",
            "2",
            "--split",
            "a=50,b=50",
            "--drain",
            "1.5",
        ]
    )
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()
    failures = [r.error for r in records if r.error]
    RELIABILITY["requests during swaps"] += len(records)
    RELIABILITY["failed requests during swaps"] += len(failures)
    assert code == 0
    assert not failures, failures[:3]
    seen = Counter(r.answer for r in records if r.answer != f"{name}_a")
    assert seen["a:1"] > 0 and seen["a:2"] > 0, seen
    assert sum(1 for r in records if r.answer == f"{name}_a") > 10
    admin = httpclient.InferenceServerClient(served["server"].http_url)
    assert admin.is_model_ready(f"{name}_head_a", "2") and not admin.is_model_ready(f"{name}_head_a", "1")
    route = read_route(repo / name / "route.json")
    assert route.versions["a"] == 2 and route.weights == {"a": 50.0, "b": 50.0}
    logits = admin.infer(f"{name}_a", [bytes_input(httpclient, images[:4])]).as_numpy("logits")
    np.testing.assert_allclose(logits, reference(images[:4], "a", 2), atol=1e-4, rtol=0)
    assert np.abs(reference(images[:4], "a", 2) - reference(images[:4], "a", 1)).max() > 1e-2, (
        "versions 1 and 2 of head a must differ, or this test proves nothing"
    )
