"""BentoML service end to end: a real build packaged into a temporary BentoML store, served by a real
`bentoml serve` (2 workers), checked against ONNX Runtime run directly, under concurrent load."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from onnx import TensorProto, helper
from PIL import Image
from skimage import data as skdata

from tl_models.bench.loadgen import Record
from tl_models.bento.batching import MicroBatcher
from tl_models.bento.engine import ServingConfig, ServingEngine
from tl_models.core.errors import Refused, http_status
from tl_models.core.heads import head_source_from_build, softmax, sources_from_build
from tl_models.core.preprocess import preprocess_bytes
from tl_models.core.routing import Route

from helpers import RELIABILITY, REPO, DirectOnnx, Server, load_until, sticky_head
from reliability import burst

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- helpers


def photo_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? ([0-9.eE+-]+|NaN)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def hammer(server: Server, images: list[bytes], n: int, threads: int) -> list[httpx.Response]:
    """``n`` concurrent /classify calls from ``threads`` client threads (``reliability.burst``)."""
    return burst(lambda i: server.classify(images[i % len(images)]), range(n), threads)


def swap_under_load(server: Server, images: list[bytes], body: dict) -> tuple[list[Record], float, float, dict]:
    """Start 8 client threads, swap with admin ``body`` after a second, keep the load 2 s more."""
    stop = threading.Event()
    calls, pool = load_until(server, images, stop)
    time.sleep(1.0)
    swap_start = time.perf_counter()  # the clock of loadgen's records
    response = server.admin("/admin/load", body)
    swap_end = time.perf_counter()
    time.sleep(2.0)
    stop.set()
    for thread in pool:
        thread.join(timeout=60)
    assert response.status_code == 200, response.text
    return calls, swap_start, swap_end, response.json()


# ---------------------------------------------------------------- the core, in process


def test_core_is_ready_only_after_warm_up_and_rejects_bad_heads(deployment, tmp_path):
    backbone, heads = sources_from_build(deployment.build_dir)
    engine = ServingEngine(backbone, [h for h in heads if h.version == 1], ServingConfig(state_dir=tmp_path / "state"))
    assert engine.ready is False
    engine.warm_up()
    assert engine.ready is True
    live = {(h["name"], h["version"]) for h in engine.status()["heads"]}
    assert live == {("a", 1), ("b", 1)}
    bad = head_source_from_build(deployment.build_dir, "a", 2)
    bad = type(bad).from_dict(bad.to_dict(), sha256="0" * 64)
    with pytest.raises(Refused, match="sha256") as info:
        asyncio.run(engine.load(bad))
    assert http_status(info.value) == 422
    assert {(h["name"], h["version"]) for h in engine.status()["heads"]} == live
    assert sorted((h.name, h.version) for h in engine.heads.loaded()) == [("a", 1), ("b", 1)]


def test_batcher_shares_passes_and_isolates_a_failing_request(deployment, tmp_path):
    backbone, heads = sources_from_build(deployment.build_dir)
    engine = ServingEngine(backbone, heads, ServingConfig(state_dir=tmp_path / "state"))
    direct = DirectOnnx(deployment.build_dir)
    good = [engine.preprocess(image)[None] for image in deployment.images(3)]
    wrong = good[0].astype(np.float32)  # concatenates with the others, but the graph takes uint8 only
    sizes = []
    batcher = MicroBatcher([lambda x: direct.backbone.run(["embedding"], {"image": x})[0]], 16, sizes.append)

    async def burst(jobs: list[np.ndarray]) -> list:
        return await asyncio.gather(*(batcher.submit(x) for x in jobs), return_exceptions=True)

    results = asyncio.run(burst([good[0], wrong, good[1], good[2]]))
    assert isinstance(results[1], Exception)
    reference = direct.embed(np.concatenate(good))
    for i, result in zip((0, 2, 3), (0, 1, 2), strict=True):
        np.testing.assert_allclose(results[i], reference[result : result + 1], atol=1e-4)
    assert sizes[0] == 4  # all four went into one pass, which ONNX Runtime refused; then each ran alone
    assert sorted(sizes[1:]) == [1, 1, 1, 1]

    sizes.clear()
    results = asyncio.run(burst(good * 4))
    assert not any(isinstance(r, Exception) for r in results)
    assert sum(sizes) == 12 and len(sizes) < 12  # concurrent requests shared passes


# ---------------------------------------------------------------- the served service


def test_ready_with_the_packaged_models(server):
    assert server.client.get("/readyz").status_code == 200
    status = server.heads()
    assert status["ready"] is True
    assert status["backbone"]["origin"].startswith("bentoml:build-backbone:")
    assert {h["name"]: (h["version"], h["origin"]) for h in status["heads"]} == {
        "a": (1, "bentoml:build-head-a:v1"),
        "b": (1, "bentoml:build-head-b:v1"),
    }


def test_answers_equal_onnxruntime_run_directly(server, deployment):
    direct = DirectOnnx(deployment.build_dir)
    images = deployment.images(3) + [photo_jpeg()]
    for image in images:
        tensor = preprocess_bytes(image, direct.spec)[None]
        for head in ("a", "b"):
            response = server.classify(image, {"X-TL-Head": head}, top_k=10)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["head"] == head
            expected = softmax(direct.logits(tensor, head, answer["version"]))[0]
            got = {p["label"]: p["score"] for p in answer["predictions"]}
            assert len(got) == 10
            assert answer["predictions"][0]["label"] == direct.labels[int(expected.argmax())]
            for label, score in got.items():
                assert abs(score - expected[direct.labels.index(label)]) < 1e-4

    batch = np.stack([preprocess_bytes(image, direct.spec) for image in images])
    for payload in (batch, batch.astype(np.float32)):  # uint8 and float pixel values
        response = server.client.post(
            "/predict", json={"tensor": payload.tolist(), "top_k": 3}, headers={"X-TL-Head": "b"}
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = direct.logits(batch, "b", answer["version"])
        np.testing.assert_allclose(np.array(answer["logits"]), expected, atol=1e-4, rtol=0)
        assert [p[0]["label"] for p in answer["predictions"]] == [direct.labels[i] for i in expected.argmax(1)]

    response = server.client.post("/embed", files={"image": ("cat.jpg", images[-1], "image/jpeg")})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(np.array(response.json()["embedding"]), direct.embed(batch[-1:])[0], atol=1e-4)


def test_the_raw_body_path_answers_as_classify_does(server, deployment):
    """``POST /classify/body`` (the image as the whole body, no multipart) gives what ``/classify`` gives, with the
    same routing headers, and refuses what it refuses."""
    for image in deployment.images(2) + [photo_jpeg()]:
        for head in ("a", "b"):
            multipart = server.classify(image, {"X-TL-Head": head}, top_k=3).json()
            response = server.client.post(
                "/classify/body", params={"top_k": 3}, content=image, headers={"X-TL-Head": head}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert {k: v for k, v in body.items() if k != "request_id"} == {
                k: v for k, v in multipart.items() if k != "request_id"
            }
            assert body["request_id"] != multipart["request_id"]
    key = {"X-TL-Key": "user-7"}
    image = deployment.images(1)[0]
    assert server.client.post("/classify/body", content=image, headers=key).json()["head"] == \
        server.classify(image, key).json()["head"]  # fmt: skip
    for content, params, headers, status, message in (
        (b"hello, not an image", {}, {}, 400, "not an image"),
        (b"", {}, {}, 400, "image"),
        (image, {"top_k": "many"}, {}, 400, "top_k must be a valid integer, got 'many'"),
        (image, {"top_k": 0}, {}, 400, "top_k must be at least 1"),
        (image, {}, {"X-TL-Head": "nope"}, 404, "unknown head 'nope'"),
    ):
        response = server.client.post("/classify/body", content=content, params=params, headers=headers)
        assert response.status_code == status and message in response.json()["error"], response.text
    assert server.client.post("/classify/body", content=image).status_code == 200


def test_weighted_split_and_shared_backbone_passes(server, deployment):
    response = server.admin("/admin/weights", {"weights": {"a": 90, "b": 10}})
    assert response.status_code == 200, response.text
    before_heads = {h["name"]: h["requests"] for h in server.heads()["heads"]}
    before = server.client.get("/metrics").text

    responses = hammer(server, deployment.images(40), 2000, threads=8)

    assert all(r.status_code == 200 for r in responses), {r.status_code for r in responses}
    heads = [r.json()["head"] for r in responses]
    share_a = heads.count("a") / len(heads)
    assert abs(share_a - 0.9) <= 0.03, share_a
    after_heads = {h["name"]: h["requests"] for h in server.heads()["heads"]}
    assert {n: after_heads[n] - before_heads[n] for n in after_heads} == {"a": heads.count("a"), "b": heads.count("b")}
    after = server.client.get("/metrics").text
    name = "tl_models_backbone_batch_size"
    passes, images = (metric(after, f"{name}_{s}") - metric(before, f"{name}_{s}") for s in ("count", "sum"))
    assert images == 2000
    assert passes < images, "concurrent requests never shared a backbone pass"


def test_same_key_always_gets_the_same_head(server, deployment):
    assert server.admin("/admin/weights", {"weights": {"a": 50, "b": 50}}).status_code == 200
    route = Route(weights={"a": 50.0, "b": 50.0}, versions=server.live())
    image = deployment.images(1)[0]
    keys = [f"user-{i}" for i in range(24)]
    seen = {}
    for key in keys:
        answers = {server.classify(image, {"X-TL-Key": key}).json()["head"] for _ in range(3)}
        assert len(answers) == 1, (key, answers)
        seen[key] = answers.pop()
        assert seen[key] == sticky_head(route.weights, route.versions, key).split(":")[0]
    assert set(seen.values()) == {"a", "b"}


def test_client_mistakes_are_4xx_and_the_service_keeps_serving(server, deployment):
    image = deployment.images(1)[0]
    response = server.classify(image, {"X-TL-Head": "nope"})
    assert response.status_code == 404 and "unknown head 'nope'" in response.json()["error"]

    response = server.client.post("/classify", files={"image": ("notes.txt", b"hello, not an image", "text/plain")})
    assert response.status_code == 400
    assert "not an image" in response.json()["error"]
    truncated = server.classify(image[: len(image) // 2])
    assert truncated.status_code == 400 and "image" in truncated.json()["error"]

    response = server.client.post("/predict", json={"tensor": [[[1, 2], [3, 4]]]})
    assert response.status_code == 400 and "shape" in response.json()["error"]
    response = server.client.post("/predict", json={"tensor": np.full((1, 3, 224, 224), 300).tolist()})
    assert response.status_code == 400 and "0..255" in response.json()["error"]
    assert server.classify(image, top_k=0).status_code == 400

    response = server.classify(image)
    assert response.status_code == 200 and response.json()["predictions"]


def test_one_bad_image_does_not_fail_its_concurrent_neighbours(server, deployment):
    good = deployment.images(8)
    payloads = [b"garbage" if i % 4 == 0 else good[i % len(good)] for i in range(64)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(server.classify, payloads))
    for payload, response in zip(payloads, responses, strict=True):
        assert response.status_code == (400 if payload == b"garbage" else 200), response.text


def test_admin_needs_the_token_and_changes_nothing_without_it(server):
    before = server.heads()
    calls = [
        ("/admin/weights", {"weights": {"a": 1, "b": 99}}),
        ("/admin/retire", {"head": "b"}),
        ("/admin/load", {"head": "a", "version": 1}),
    ]
    for path, body in calls:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"X-TL-Admin-Token": "wrong"}):
            response = server.admin(path, body, headers=headers)
            assert response.status_code == 401, (path, headers, response.text)
            assert "token" in response.json()["error"]
    after = server.heads()
    assert after["revision"] == before["revision"]
    assert [(h["name"], h["version"], h["weight"]) for h in after["heads"]] == [
        (h["name"], h["version"], h["weight"]) for h in before["heads"]
    ]


def _head_onnx(dim: int, classes: int = 10, output: str = "logits") -> bytes:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["embedding", "w"], [output])],
        "head",
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", classes])],
        [helper.make_tensor("w", TensorProto.FLOAT, [dim, classes], np.ones(dim * classes, np.float32))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10).SerializeToString()


def test_a_bad_head_is_refused_with_a_clear_error_and_live_heads_keep_serving(server, deployment, tmp_path):
    before = server.heads()
    cases = [
        (deployment.fake_build(tmp_path / "garbage", "bad", 1, b"not onnx at all"), 422, "not a loadable ONNX model"),
        (deployment.fake_build(tmp_path / "dim", "bad", 1, _head_onnx(7)), 422, "dimension 1280"),
        (deployment.fake_build(tmp_path / "sha", "bad", 1, _head_onnx(1280), sha="f" * 64), 422, "sha256"),
        (
            deployment.fake_build(tmp_path / "other", "bad", 1, _head_onnx(1280), backbone_sha="e" * 64),
            409,
            "another backbone",
        ),
        (
            deployment.fake_build(tmp_path / "names", "bad", 1, _head_onnx(1280, output="scores")),
            422,
            "expected one input 'embedding' and one output 'logits'",
        ),
    ]
    for build_dir, status, message in cases:
        response = server.admin("/admin/load", {"build_dir": str(build_dir), "head": "bad"})
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    response = server.admin("/admin/load", {"tag": "build-head-zzz:v1"})
    assert response.status_code == 404 and "no model" in response.json()["error"]
    after = server.heads()
    assert after["revision"] == before["revision"]
    assert [(h["name"], h["version"], h["weight"], h["origin"]) for h in after["heads"]] == [
        (h["name"], h["version"], h["weight"], h["origin"]) for h in before["heads"]
    ]
    for head in ("a", "b"):
        assert server.classify(deployment.images(1)[0], {"X-TL-Head": head}).status_code == 200


def test_swap_under_load_loses_nothing_and_then_only_the_new_head_answers(server, deployment):
    images = deployment.images(16)

    # new version of head a, straight from the build directory
    calls, swap_start, swap_end, status = swap_under_load(
        server, images, {"build_dir": str(deployment.build_dir), "head": "a", "version": 2}
    )
    assert {h["name"]: h["version"] for h in status["heads"]} == {"a": 2, "b": 1}
    _check_swap(calls, swap_start, swap_end, old=1, new=2)

    # heads are added to the store later without touching the backbone
    out = deployment.cli("bento", "package", str(deployment.build_dir))
    assert re.search(r"(created|kept)\s+build-head-a:v2", out) and re.search(r"kept\s+build-backbone:", out), out
    assert not re.search(r"created\s+build-(backbone|head-b)", out), out

    # and back to version 1, from the BentoML store
    calls, swap_start, swap_end, status = swap_under_load(server, images, {"head": "a", "version": 1})
    _check_swap(calls, swap_start, swap_end, old=2, new=1)
    assert server.heads()["heads"][0]["origin"] == "bentoml:build-head-a:v1"


def _check_swap(calls: list[Record], swap_start: float, swap_end: float, old: int, new: int) -> None:
    failed = [c for c in calls if c.error]
    RELIABILITY["requests during swaps"] += len(calls)
    RELIABILITY["failed requests during swaps"] += len(failed)
    assert not failed, failed[:5]
    before = [c.answer["version"] for c in calls if c.end < swap_start and c.answer["head"] == "a"]
    after = [c.answer["version"] for c in calls if c.start > swap_end and c.answer["head"] == "a"]
    assert before and set(before) == {old}
    assert len(after) >= 10 and set(after) == {new}, (len(after), set(after))
    assert any(c.answer["head"] == "b" for c in calls if c.start > swap_end)


def test_retire_a_head_and_bring_a_head_in(server, deployment):
    image = deployment.images(1)[0]
    assert server.admin("/admin/weights", {"weights": {"a": 50, "b": 50}}).status_code == 200
    response = server.admin("/admin/retire", {"head": "b"})
    assert response.status_code == 200, response.text
    assert [h["name"] for h in response.json()["heads"]] == ["a"]
    assert server.classify(image, {"X-TL-Head": "b"}).status_code == 404
    assert {r.json()["head"] for r in hammer(server, [image], 16, threads=4)} == {"a"}
    response = server.admin("/admin/retire", {"head": "a"})
    assert response.status_code == 409 and "no head with traffic" in response.json()["error"]

    response = server.admin("/admin/load", {"tag": "build-head-b:v1", "weight": 50})
    assert response.status_code == 200, response.text
    assert {h["name"]: h["weight"] for h in response.json()["heads"]} == {"a": 50, "b": 50}
    answer = server.classify(image, {"X-TL-Head": "b"})
    assert answer.status_code == 200 and answer.json()["version"] == 1


def test_per_head_metrics(server, deployment):
    image = deployment.images(1)[0]
    before = server.client.get("/metrics").text
    assert server.classify(image, {"X-TL-Head": "b"}).status_code == 200
    assert server.classify(b"nope", {"X-TL-Head": "b"}).status_code == 400
    after = server.client.get("/metrics").text
    labels = {"head": "b", "version": "1", "endpoint": "classify"}
    assert (
        metric(after, "tl_models_head_requests_total", **labels)
        - metric(before, "tl_models_head_requests_total", **labels)
        == 2
    )
    assert (
        metric(after, "tl_models_head_errors_total", reason="bad_input", **labels)
        - metric(before, "tl_models_head_errors_total", reason="bad_input", **labels)
        == 1
    )
    assert (
        metric(after, "tl_models_head_request_duration_seconds_count", **labels)
        - metric(before, "tl_models_head_request_duration_seconds_count", **labels)
        == 2
    )


def test_bentoml_build_bundles_the_models_offline(deployment):
    deployment.cli("bento", "package", str(deployment.build_dir))  # a:2 joins the store (kept if already there)
    env = {**deployment.env, "TL_MODELS_BENTO": "build", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(REPO), "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    bentos = list((deployment.root / "bentoml" / "bentos" / "classifier").glob("*/bento.yaml"))
    assert len(bentos) == 1, bentos
    info = yaml.safe_load(bentos[0].read_text())
    declared = {m["tag"] for m in info["services"][0]["models"]}
    assert {"build-head-a:v1", "build-head-a:v2", "build-head-b:v1"} < declared
    assert any(re.fullmatch(r"build-backbone:[0-9a-f]{16}", tag) for tag in declared), declared
    source = bentos[0].parent / "src"
    assert (source / "service.py").is_file() and (source / "tl_models" / "bento" / "engine.py").is_file()
    assert not (source / "tl_models" / "training").exists()  # the bento ships the serving path only (no torch side)

    archive = deployment.root / "classifier.tar"  # what ships: the bento with its models (uncompressed: fast)
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "export", "classifier:latest", str(archive)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with tarfile.open(archive) as bundle:
        names = {Path(n).as_posix().lstrip("./") for n in bundle.getnames()}
    for model in ("build-head-a/v1/head.onnx", "build-head-a/v2/head.onnx", "build-head-b/v1/head.onnx"):
        assert f"models/{model}" in names
    assert any(re.fullmatch(r"models/build-backbone/[0-9a-f]{16}/backbone\.onnx", n) for n in names)
