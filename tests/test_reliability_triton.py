"""Reliability of a real tritonserver (python flavour) over HTTP and gRPC: fuzzed bad input to the router, the
tensor ensemble and a head, a soak at concurrency 32, and swaps that fail (bad head files, a step failing half
way). Figures go to the reliability summary printed by the run."""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tl_models.cli import main as cli_main
from tl_models.core.names import CONFIG, VERSION_SHA256
from tl_models.core.routing import read_route
from tl_models.triton import swap as triton_swap
from tl_models.triton.config import read_config
from tl_models.triton.launcher import TritonServerError
from tl_models.triton.launcher import start as start_triton

from bad_inputs import bad_images, bad_tensors, odd_images
from helpers import RELIABILITY, RouterCaller, bytes_input, damage_bytes, live, load_triton_until, url
from reliability import MAX_MEMORY_GROWTH, burst, record_soak, settled_pids, soak, tree_pids

pytestmark = pytest.mark.slow
CLIENTS = {"http": httpclient, "grpc": grpcclient}
CLIENT_ERRORS = {"400", "404", "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"}


def _tensor(module, name: str, array: np.ndarray):
    """An input of any dtype the clients can carry (text as BYTES, complex as its real part in FP64)."""
    if array.dtype.kind in "UO":
        array = array.astype(np.object_)
    elif array.dtype.kind == "c":
        array = array.real.astype(np.float64)
    tensor = module.InferInput(
        name, list(array.shape), "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
    )
    tensor.set_data_from_numpy(array)
    return tensor


def _protocol_cases(module, name: str, good: bytes, dim: int) -> list[tuple[str, str, list, str]]:
    """Bad requests at the KServe level: (kind, model, inputs, regex the error must match)."""

    def embedding(array: np.ndarray):
        return [_tensor(module, "embedding", array)]

    nan = np.full((1, dim), 0.5, np.float32)
    nan[0, 3] = np.nan
    return [
        ("image_bytes as INT32", name, [_tensor(module, "image_bytes", np.zeros((1, 1), np.int32))], r"data-?type"),
        (
            "image_bytes of shape 1x2",
            name,
            [_tensor(module, "image_bytes", np.array([[good, good]], np.object_))],
            r"shape",
        ),
        ("batch over the maximum", name, [bytes_input(module, [good] * 33)], r"batch-size"),
        (
            "unknown head",
            name,
            [bytes_input(module, [good]), bytes_input(module, [b"zzz"], "route_head")],
            r"unknown head 'zzz'",
        ),
        (
            "route_head not UTF-8",
            name,
            [bytes_input(module, [good]), bytes_input(module, [b"\xff\xfe"], "route_head")],
            r"UTF-8",
        ),
        (
            "route_key not UTF-8",
            name,
            [bytes_input(module, [good]), bytes_input(module, [b"\xc3("], "route_key")],
            r"UTF-8",
        ),
        ("NaN embedding", f"{name}_head_a", embedding(nan), r"NaN"),
        ("embedding of the wrong size", f"{name}_head_a", embedding(np.zeros((1, 7), np.float32)), r"shape"),
        ("unknown model", "no_such_model", [bytes_input(module, [good])], r"unknown model|not found"),
        ("model name walking out", "../../etc/passwd", [bytes_input(module, [good])], r"unknown model|not found"),
    ]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fuzzed_bad_requests_get_a_client_error_that_says_what_was_wrong(served, reference, images, protocol):
    module, name, server = CLIENTS[protocol], served["name"], served["server"]
    rng = np.random.default_rng(11)
    good = images[0]
    dim = int(read_config(served["repo"] / f"{name}_head_a").input[0].dims[0])
    input_size = (3, reference.spec.crop_size, reference.spec.crop_size)
    cases = [(b.kind, name, [bytes_input(module, [b.payload])], b.expect) for b in bad_images(rng, 800)]
    cases += [
        (b.kind, f"{name}_a_tensor", [_tensor(module, "image", b.payload)], b.expect)
        for b in bad_tensors(rng, 100, input_size, max_batch=32)
    ]
    protocol_cases = _protocol_cases(module, name, good, dim)
    cases += [protocol_cases[i % len(protocol_cases)] for i in range(120)]
    cases = [item for i, case in enumerate(cases) for item in ([case, None] if i % 10 == 0 else [case])]
    stubs = settled_pids(server.pid)
    local = threading.local()
    expected = reference([good], "a", live(served, "a"))[0]

    def send(case) -> tuple[str, str, str]:
        if not hasattr(local, "client"):
            local.client = module.InferenceServerClient(url(served, protocol))
        if case is None:  # a valid request among the bad ones: answered, and right
            result = local.client.infer(name, [bytes_input(module, [good]), bytes_input(module, [b"a"], "route_head")])
            ok = np.allclose(result.as_numpy("logits")[0], expected, atol=1e-4, rtol=0)
            return "valid", "ok" if ok else "wrong answer", ""
        kind, model, inputs, expect = case
        try:
            local.client.infer(model, inputs)
        except InferenceServerException as exc:
            status = str(exc.status())
            matches = re.search(expect, exc.message() or "", re.IGNORECASE)
            return kind, status, "" if matches else f"message does not match {expect!r}: {exc.message()}"
        return kind, "accepted", "a bad request was answered"

    results = burst(send, cases)
    bad = [r for r in results if r[0] != "valid"]
    server_errors = [r for r in bad if r[1] not in CLIENT_ERRORS and r[1] != "accepted"]
    RELIABILITY["requests tried"] += len(results)
    RELIABILITY[f"bad inputs tried (Triton {protocol})"] += len(bad)
    RELIABILITY["5xx answers"] += len(server_errors)
    assert len(bad) >= 1000
    assert not server_errors, server_errors[:5]
    wrong = [r for r in bad if r[1] not in CLIENT_ERRORS or r[2]]
    assert not wrong, wrong[:5]
    assert [r for r in results if r[0] == "valid"] == [("valid", "ok", "")] * (len(results) - len(bad))
    assert server.alive() and tree_pids(server.pid) == stubs, "a python-backend stub died"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_odd_but_valid_images_are_converted_and_answered(served, reference, protocol):
    module, name = CLIENTS[protocol], served["name"]
    client = module.InferenceServerClient(url(served, protocol))
    version = live(served, "a")
    for kind, image in odd_images(np.random.default_rng(5)).items():
        result = client.infer(name, [bytes_input(module, [image]), bytes_input(module, [b"a"], "route_head")])
        np.testing.assert_allclose(
            result.as_numpy("logits")[0], reference([image], "a", version)[0], atol=1e-4, rtol=0, err_msg=kind
        )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_soak_at_concurrency_32(served, reference, images, protocol):
    module, name = CLIENTS[protocol], served["name"]
    route = read_route(served["repo"] / name / "route.json")
    expected = {f"{head}:{version}": reference(images, head, version) for head, version in route.versions.items()}
    outputs = [module.InferRequestedOutput("logits"), module.InferRequestedOutput("head")]

    def make_worker():
        client = module.InferenceServerClient(url(served, protocol))

        def call(i: int) -> str | None:
            try:
                result = client.infer(name, [bytes_input(module, [images[i % len(images)]])], outputs=outputs)
            except InferenceServerException as exc:
                return f"{exc.status()}: {exc.message()}"
            head = result.as_numpy("head")[0, 0].decode()
            if not np.allclose(result.as_numpy("logits")[0], expected[head][i % len(images)], atol=1e-4, rtol=0):
                return f"answer of {head} differs from ONNX Runtime"
            return None

        return call

    outcome = soak(served["server"].pid, make_worker)
    record_soak(f"Triton {protocol}", outcome)
    assert not outcome.failures, outcome.failures[:5]
    assert outcome.calls > 100
    assert outcome.growth < MAX_MEMORY_GROWTH, f"resident memory grew {outcome.growth:.1%}"


# ---------------------------------------------------------------- swaps that fail


def _swap_state(served) -> tuple:
    """Everything a swap changes: the route and the configs of the head and its ensembles."""
    repo, name = served["repo"], served["name"]
    configs = tuple(
        (repo / model / CONFIG).read_text() for model in (f"{name}_head_a", f"{name}_a", f"{name}_a_tensor")
    )
    return read_route(repo / name / "route.json"), configs


def _still_serving_version(served, reference, images, version: int) -> None:
    client = httpclient.InferenceServerClient(served["server"].http_url)
    assert client.is_server_ready()
    assert client.is_model_ready(f"{served['name']}_head_a", str(version))
    result = client.infer(
        served["name"], [bytes_input(httpclient, images[:2]), bytes_input(httpclient, [b"a"] * 2, "route_head")]
    )
    assert [h.decode() for h in result.as_numpy("head")[:, 0]] == [f"a:{version}"] * 2
    np.testing.assert_allclose(result.as_numpy("logits"), reference(images[:2], "a", version), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("wrong sha256", "fails its sha256 check"),
        ("corrupt", "not a loadable ONNX model"),
        ("truncated", "not a loadable ONNX model"),
    ],
)
def test_a_bad_head_file_is_refused_by_the_swap_and_the_live_version_keeps_serving(
    served, reference, images, fault, message
):
    head_dir = served["repo"] / f"{served['name']}_head_a"
    version_dir = head_dir / "9"
    shutil.copytree(head_dir / "1", version_dir, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        onnx = (version_dir / "model.onnx").read_bytes()
        if fault == "wrong sha256":
            (version_dir / VERSION_SHA256).write_text("0" * 64)
        else:
            data = b"\x08\x07garbage" * 64 if fault == "corrupt" else onnx[: len(onnx) // 2]
            (version_dir / "model.onnx").write_bytes(data)
            (version_dir / VERSION_SHA256).write_text(hashlib.sha256(data).hexdigest())
        before = _swap_state(served)
        old = live(served, "a")
        with pytest.raises(triton_swap.TritonSwapError, match=message):
            triton_swap.swap(served["server"].http_url, served["repo"], served["name"], "a", 9)
        assert _swap_state(served) == before
        _still_serving_version(served, reference, images, old)
    finally:
        shutil.rmtree(version_dir)


def test_a_swap_failing_half_way_is_rolled_back_without_losing_a_request(served, reference, images, monkeypatch):
    """Loading the new version and repointing the first ensemble succeed, the second ensemble fails: the
    configs, loaded versions and route return to what they were, under load over HTTP and gRPC."""
    name, repo = served["name"], served["repo"]
    old = live(served, "a")
    new = 2 if old == 1 else 1
    before = _swap_state(served)
    real_load = triton_swap._load

    def failing_load(client, model: str) -> None:
        if model == f"{name}_a_tensor":
            raise triton_swap.TritonSwapError(f"Triton failed to load {model}: injected fault")
        real_load(client, model)

    monkeypatch.setattr(triton_swap, "_load", failing_load)
    stop = threading.Event()
    records, threads = load_triton_until(served, images, stop)
    time.sleep(1.5)
    try:
        with pytest.raises(triton_swap.TritonSwapError, match="injected fault"):
            triton_swap.swap(served["server"].http_url, repo, name, "a", new, drain=0.5)
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    failures = [r.error for r in records if r.error]
    RELIABILITY["requests during swaps"] += len(records)
    RELIABILITY["failed requests during swaps"] += len(failures)
    assert not failures, failures[:3]
    assert len(records) > 10
    assert _swap_state(served) == before
    client = httpclient.InferenceServerClient(served["server"].http_url)
    assert not client.is_model_ready(f"{name}_head_a", str(new)), "the rolled-back version is still loaded"
    _still_serving_version(served, reference, images, old)
    assert Path(repo / f"{name}_head_a" / str(new)).is_dir()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_damaged_route_file_keeps_the_router_serving_and_refuses_a_swap(served, images, protocol, capsys):
    """A half-written route.json in the repository: the router keeps answering on its last good route, and `triton
    swap` and `triton status` stop with one line naming the file, leaving it as it is; repaired, it is followed."""
    path = served["repo"] / served["name"] / "route.json"
    good, damaged = path.read_bytes(), b'{"weights": {"a": 90.0, "b": 10.0}, "versions": {"a": 1, "b"'
    caller = RouterCaller(served, served["name"], protocol, force_head="b")
    try:
        path.write_bytes(damaged)
        time.sleep(0.5)  # the router re-reads the route every 0.2 s
        assert {caller(image).partition(":")[0] for image in images * 2} <= {"a", "b"}
        server = ["--url", f"http://{served['server'].http_url}", "--repo", str(served["repo"]), "--build"]
        for command in (
            ["swap", *server, served["name"], "--head", "a", "--version", "2"],
            ["status", *server, served["name"]],
        ):
            capsys.readouterr()
            assert cli_main(["triton", *command]) == 1
            err = capsys.readouterr().err
            assert f"route file {path} is damaged" in err and err.count("\n") == 1, err
        assert path.read_bytes() == damaged
    finally:
        path.write_bytes(good)
        caller.close()
    time.sleep(0.5)
    after = RouterCaller(served, served["name"], protocol)
    try:
        assert after(images[0]).partition(":")[0] in {"a", "b"}
    finally:
        after.close()


def _router_repository(served: dict, root: Path) -> Path:
    """A copy of the served repository's router, backbone and head models (their files only, no cache)."""
    name, repo = served["name"], root / "repo"
    for model in (name, f"{name}_backbone", f"{name}_head_a", f"{name}_head_b"):
        shutil.copytree(served["repo"] / model, repo / model, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def test_a_router_whose_backbone_graph_was_damaged_on_disk_refuses_to_load(served, tmp_path):
    """The router runs the backbone's graph itself on the CPU: a graph on disk that is not the one its config names
    stops it loading with a message naming the file, rather than serving wrong embeddings."""
    repo = _router_repository(served, tmp_path)
    damage_bytes(repo / f"{served['name']}_backbone" / "1" / "model.onnx")
    with pytest.raises(TritonServerError, match=r"backbone/1/model\.onnx fails its sha256 check"):
        start_triton(repo, workdir=tmp_path / "server", load=(served["name"],), timeout=300).stop()  # if it started


def test_a_head_graph_damaged_on_disk_fails_its_requests_and_the_others_are_answered(
    served, reference, images, tmp_path
):
    """The router alone (its head models not even loaded in Triton) runs each head's graph itself: a damaged file of
    head b's live version gets its requests an error naming the file; head a goes on answering."""
    name = served["name"]
    repo = _router_repository(served, tmp_path)
    damage_bytes(repo / f"{name}_head_b" / str(live(served, "b")) / "model.onnx")
    server = start_triton(repo, workdir=tmp_path / "server", load=(name,), timeout=300)
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def ask(head: str):
            inputs = [bytes_input(grpcclient, images[:2]), bytes_input(grpcclient, [head.encode()] * 2, "route_head")]
            return client.infer(name, inputs).as_numpy("logits")

        with pytest.raises(InferenceServerException, match=r"head_b/\d+/model\.onnx fails its sha256 check"):
            ask("b")
        np.testing.assert_allclose(ask("a"), reference(images[:2], "a", live(served, "a")), atol=1e-4, rtol=0)
        with pytest.raises(InferenceServerException, match="fails its sha256 check"):
            ask("b")  # still refused: a head that failed to load is not kept
    finally:
        server.stop()
