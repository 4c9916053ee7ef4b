"""Shadow heads on a real tritonserver: the router scores them beside the answering head, counts agreement in
Triton's custom metrics, answers a request id per image, and survives a shadow head that fails."""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tl_models.bento import launcher as bento_server
from tl_models.cli import main as cli_main
from tl_models.core.routing import RoutingState

from helpers import ADMIN, TOKEN, bytes_input, live, url

pytestmark = pytest.mark.slow
CLIENTS = {"http": httpclient, "grpc": grpcclient}


def _counter(text: str, name: str, **labels: str) -> float:
    """The value of one Triton metric sample (0 when absent), whatever the order of its labels."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    return 0.0


def _metrics(served: dict) -> str:
    return httpx.get(served["server"].metrics_url, timeout=30).text


def _ask(served: dict, protocol: str, image: bytes, head: str) -> tuple[str, str]:
    """(answering head, request id) of one image forced to ``head``."""
    module = CLIENTS[protocol]
    client = module.InferenceServerClient(url(served, protocol))
    try:
        result = client.infer(
            served["name"],
            [bytes_input(module, [image]), bytes_input(module, [head.encode()], "route_head")],
            outputs=[module.InferRequestedOutput(n) for n in ("head", "request_id")],
        )
        return result.as_numpy("head")[0, 0].decode(), result.as_numpy("request_id")[0, 0].decode()
    finally:
        client.close()


def _shadow(served: dict, *args: str) -> int:
    return cli_main(
        [
            "triton",
            "shadow",
            "--url",
            f"http://{served['server'].http_url}",
            "--repo",
            str(served["repo"]),
            "--build",
            served["name"],
            "--head",
            "a",
            *args,
        ]
    )


def test_shadow_agreement_equals_offline_and_answers_carry_request_ids(served, reference, images):
    name = served["name"]
    state = RoutingState(served["repo"] / name / "route.json", poll=0)
    shadow = 2
    assert live(served, "a") == 1  # as the served fixture started it (conftest.shared_servers_as_started)
    assert _shadow(served, "--version", str(shadow), "--share", "1") == 0
    assert state.current().shadow == {f"a:{shadow}": 1.0}
    admin = httpclient.InferenceServerClient(served["server"].http_url)
    assert admin.is_model_ready(f"{name}_head_a", str(shadow)) and admin.is_model_ready(
        f"{name}_head_a", str(live(served, "a"))
    )
    time.sleep(0.5)  # the router re-reads the route every 0.2 s
    labels = {"head": "a", "version": str(shadow)}
    before = _metrics(served)
    ids = []
    for i, image in enumerate(images):
        head, request_id = _ask(served, "http" if i % 2 else "grpc", image, "b")
        assert head == f"b:{live(served, 'b')}"
        ids.append(request_id)
    after = _metrics(served)
    expected = (reference(images, "b", live(served, "b")).argmax(1) == reference(images, "a", shadow).argmax(1)).sum()
    assert _counter(after, "tl_models_shadow_scored", **labels) - _counter(
        before, "tl_models_shadow_scored", **labels
    ) == len(images)
    assert (
        _counter(after, "tl_models_shadow_agreed", **labels) - _counter(before, "tl_models_shadow_agreed", **labels)
        == expected
    )
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{27}", i) for i in ids)

    assert _shadow(served, "--share", "0", "--drain", "0.5") == 0
    assert state.current().shadow == {}
    assert not admin.is_model_ready(f"{name}_head_a", str(shadow))
    assert admin.is_model_ready(f"{name}_head_a", str(live(served, "a")))


def test_a_failing_shadow_head_never_fails_a_request(served, images):
    state = RoutingState(served["repo"] / served["name"] / "route.json", poll=0)
    state.update(shadow={"b:9": 1.0})  # no such version is loaded: every BLS call to it fails
    time.sleep(0.5)
    for i, image in enumerate(images[:6]):
        head, _ = _ask(served, "http" if i % 2 else "grpc", image, "a")
        assert head.startswith("a:")
    deadline = time.time() + 10
    while state.current().shadow and time.time() < deadline:
        time.sleep(0.2)
    assert state.current().shadow == {}  # dropped from the route by the router
    assert _counter(_metrics(served), "tl_models_shadow_errors", head="b", version="9") >= 1
    assert all(_ask(served, "http", image, "a")[0].startswith("a:") for image in images[:2])


def test_bentoml_and_triton_count_the_same_agreement_for_the_same_traffic(served, reference, tmp_path):
    """One rule for both servers (``tl_models.core.plan.agreed``): the same shadow head beside the same answering
    head on the same images gives the same agreement on BentoML (``/heads``) and on Triton (its metrics), equal to
    the count from the build's ONNX files run directly."""
    paths = sorted(served["data"].rglob("*.png"))
    images = [p.read_bytes() for p in paths[:: max(1, len(paths) // 40)][:40]]
    answering, shadow = ("b", live(served, "b")), ("a", 2)
    expected = int((reference(images, *answering).argmax(1) == reference(images, *shadow).argmax(1)).sum())

    assert _shadow(served, "--version", str(shadow[1]), "--share", "1") == 0
    time.sleep(0.5)  # the router re-reads the route every 0.2 s
    labels = {"head": shadow[0], "version": str(shadow[1])}
    before = _metrics(served)
    assert all(_ask(served, "http", image, answering[0])[0] == f"{answering[0]}:{answering[1]}" for image in images)
    after = _metrics(served)
    triton = {
        family: _counter(after, f"tl_models_shadow_{family}", **labels)
        - _counter(before, f"tl_models_shadow_{family}", **labels)
        for family in ("scored", "agreed")
    }

    env = {
        **os.environ,
        "TL_MODELS_BUILD": str(served["build"]),
        "TL_MODELS_STATE_DIR": str(tmp_path / "state"),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "TL_MODELS_WORKERS": "1",
        "TL_MODELS_ADMIN_TOKEN": TOKEN,
        "TL_MODELS_BUILD_ROOTS": str(served["build"]),
    }
    process = bento_server.start(env, log_path=tmp_path / "serve.log", timeout=600)
    try:
        with httpx.Client(base_url=process.url, timeout=60) as client:
            response = client.post(
                "/admin/shadow",
                json={"build_dir": str(served["build"]), "head": shadow[0], "version": shadow[1], "share": 1},
                headers=ADMIN,
            )
            assert response.status_code == 200, response.text
            for image in images:
                answer = client.post(
                    "/classify", files={"image": ("x.png", image, "image/png")}, headers={"X-TL-Head": answering[0]}
                ).json()
                assert (answer["head"], answer["version"]) == answering, answer
            entry = next(e for e in client.get("/heads").json()["shadow"] if (e["name"], e["version"]) == shadow)
    finally:
        process.stop()
    assert triton["scored"] == entry["scored"] == len(images)
    assert triton["agreed"] == round(entry["agreement"] * entry["scored"]) == expected
