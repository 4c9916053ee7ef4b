"""Reliability of the real `bentoml serve` (2 workers): fuzzed bad input, a soak at concurrency 32, head faults,
a killed worker, and who may change the model. Figures go to the reliability summary printed by the run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import psutil
import pytest
from PIL import Image

from tl_models.bento import launcher as bento_server
from tl_models.bento.catalog import HeadCatalog
from tl_models.bento.launcher import BentoServerError
from tl_models.core.files import file_sha256
from tl_models.core.heads import softmax, sources_from_build
from tl_models.core.preprocess import preprocess_bytes

from bad_inputs import bad_images, bad_tensors, encode, odd_images
from helpers import RELIABILITY, RELIABILITY_NOTES, DirectOnnx, Server, damage_bytes, load_until
from reliability import MAX_MEMORY_GROWTH, burst, record_soak, settled_pids, soak, tree_pids

pytestmark = pytest.mark.slow

INPUT_SIZE = (3, 224, 224)


def _tensor_body(array: np.ndarray) -> bytes:
    """A /predict JSON body; numbers stay numbers (NaN/Infinity as JSON's common extension), others text."""
    values = array.tolist() if array.dtype.kind in "fiu" else array.astype(str).tolist()
    return json.dumps({"tensor": values}).encode()


# malformed HTTP requests: (kind, path, httpx keyword arguments, regex the answer must match)
MALFORMED: list[tuple[str, str, dict, str]] = [
    ("json body to /classify", "/classify", {"json": {"image": "abc"}}, r"send the image as a file upload: multipart"),
    (
        "raw png body to /classify",
        "/classify",
        {"content": b"\x89PNG\r\n", "headers": {"content-type": "image/png"}},
        r"send the image as a file upload: multipart",
    ),
    (
        "form field instead of a file",
        "/classify",
        {"data": {"image": "http://example.com/cat.png"}},
        r"a file part, not text\); URLs are not fetched",
    ),
    (
        "multipart without the image",
        "/classify",
        {"files": {"picture": ("x.png", b"abc", "image/png")}},
        r"field required: the file part 'image'",
    ),
    (
        "top_k not a number",
        "/classify",
        {"files": {"image": ("x.png", b"abc", "image/png")}, "data": {"top_k": "all"}},
        r"top_k must be a valid integer, got 'all'",
    ),
    (
        "top_k zero",
        "/classify",
        {"files": {"image": ("x.png", encode(Image.new("RGB", (64, 64))), "image/png")}, "data": {"top_k": "0"}},
        r"top_k must be at least 1, got 0",
    ),
    (
        "text body to /predict",
        "/predict",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        r"invalid json",
    ),
    (
        "broken json to /predict",
        "/predict",
        {"content": b"{nope", "headers": {"content-type": "application/json"}},
        r"invalid json",
    ),
    ("ragged tensor", "/predict", {"json": {"tensor": [[1, 2], [3]]}}, r"validation|shape"),
    ("no tensor", "/predict", {"json": {"x": 1}}, r"field required"),
    (
        "body over the size limit",
        "/classify",
        {"files": {"image": ("x.png", b"\0" * (9 << 20), "image/png")}},
        r"too large",
    ),
    (
        "unknown head",
        "/classify",
        {"files": {"image": ("x.png", b"abc", "image/png")}, "headers": {"X-TL-Head": "nope"}},
        r"unknown head",
    ),
    (
        "head header walking out",
        "/classify",
        {"files": {"image": ("x.png", b"abc", "image/png")}, "headers": {"X-TL-Head": "../../etc/passwd"}},
        r"unknown head",
    ),
]


def _bad_requests(rng: np.random.Generator) -> list[tuple[str, str, dict, str]]:
    """At least 1,000 bad requests: images to /classify, tensors to /predict, malformed HTTP."""
    requests: list[tuple[str, str, dict, str]] = [
        (b.kind, "/classify", {"files": {"image": ("x.png", b.payload, "image/png")}}, b.expect)
        for b in bad_images(rng, 800)
    ]
    requests += [
        (
            b.kind,
            "/predict",
            {"content": _tensor_body(np.asarray(b.payload)), "headers": {"content-type": "application/json"}},
            b.expect,
        )
        for b in bad_tensors(rng, 100, INPUT_SIZE, max_batch=4)
    ]
    requests += [MALFORMED[i % len(MALFORMED)] for i in range(130)]
    return requests


def _readable(text: str) -> str:
    """An answer's body with JSON's escapes undone ("N\\u00d73" reads "N×3"), so a message is matched as written."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text


def _check_answer(server: Server, direct: DirectOnnx, image: bytes) -> None:
    """A valid request answers, with the scores ONNX Runtime gives run directly."""
    response = server.classify(image, top_k=3)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["predictions"]) == 3, answer
    expected = softmax(direct.logits(preprocess_bytes(image, direct.spec)[None], answer["head"], answer["version"]))[0]
    for prediction in answer["predictions"]:
        assert abs(prediction["score"] - expected[direct.labels.index(prediction["label"])]) < 1e-4


def test_fuzzed_bad_requests_get_a_4xx_that_says_what_was_wrong(server, deployment):
    direct = DirectOnnx(deployment.build_dir)
    good = deployment.images(1)[0]
    workers = settled_pids(server.process.pid)
    requests = _bad_requests(np.random.default_rng(7))
    assert len(requests) >= 1000

    def send(request: tuple[str, str, dict, str]) -> tuple[str, int, str, str]:
        kind, path, options, expect = request
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = client.post(path, **options)
        return kind, response.status_code, response.text, expect

    results = burst(send, requests)
    server_errors = [r[:3] for r in results if r[1] >= 500]
    RELIABILITY["requests tried"] += len(results)
    RELIABILITY["bad inputs tried (BentoML)"] += len(results)
    RELIABILITY["5xx answers"] += len(server_errors)
    assert not server_errors, server_errors[:5]
    wrong = [
        (kind, status, text[:200])
        for kind, status, text, expect in results
        if not 400 <= status < 500 or not re.search(expect, _readable(text), re.IGNORECASE)
    ]
    assert not wrong, wrong[:5]
    assert {kind for kind, status, *_ in results if status == 413} == {"body over the size limit"}
    assert server.process.alive() and tree_pids(server.process.pid) == workers, "a worker died"
    _check_answer(server, direct, good)


def test_odd_but_valid_images_are_converted_and_answered(server, deployment):
    direct = DirectOnnx(deployment.build_dir)
    for image in odd_images(np.random.default_rng(3)).values():
        _check_answer(server, direct, image)


def test_soak_at_concurrency_32(server, deployment):
    direct = DirectOnnx(deployment.build_dir)
    images = deployment.images(8)
    live = server.live()
    batch = np.stack([preprocess_bytes(image, direct.spec) for image in images])
    expected = {(head, version): softmax(direct.logits(batch, head, version)) for head, version in live.items()}

    def make_worker():
        client = httpx.Client(base_url=server.url, timeout=60)

        def call(i: int) -> str | None:
            try:
                response = client.post("/classify", files={"image": ("x.png", images[i % len(images)], "image/png")})
            except httpx.HTTPError as exc:
                return repr(exc)
            if response.status_code != 200:
                return f"{response.status_code}: {response.text[:200]}"
            answer = response.json()
            scores = expected[(answer["head"], answer["version"])][i % len(images)]
            if any(abs(p["score"] - scores[direct.labels.index(p["label"])]) > 1e-4 for p in answer["predictions"]):
                return f"answer differs from ONNX Runtime: {answer}"
            return None

        return call

    outcome = soak(server.process.pid, make_worker)
    record_soak("BentoML HTTP", outcome)
    assert not outcome.failures, outcome.failures[:5]
    assert outcome.calls > 100
    assert outcome.growth < MAX_MEMORY_GROWTH, f"resident memory grew {outcome.growth:.1%}"


# ---------------------------------------------------------------- faults


def _route(server: Server) -> list[tuple]:
    status = server.heads()
    return [status["revision"]] + [(h["name"], h["version"], h["weight"]) for h in status["heads"]]


def test_truncated_or_corrupt_head_is_refused_and_the_live_heads_keep_serving(server, deployment, tmp_path):
    """Corrupt, wrong sha256 and wrong shapes are in test_bento; here: a truncated head.onnx, and bytes that
    change after the manifest was written."""
    source = deployment.build_dir / "heads" / "a" / "2" / "head.onnx"
    data = source.read_bytes()
    before = _route(server)
    for name, head_bytes, keep_sha in (
        ("truncated", data[: len(data) // 2], False),
        ("changed", data[:-1] + b"x", True),
    ):
        root = deployment.fake_build(tmp_path / name, "a", 9, head_bytes, sha=file_sha256(source) if keep_sha else None)
        response = server.admin("/admin/load", {"build_dir": str(root), "head": "a"})
        assert response.status_code == 422, response.text
        assert ("sha256" if keep_sha else "not a loadable ONNX model") in response.json()["error"]
    assert _route(server) == before
    _check_answer(server, DirectOnnx(deployment.build_dir), deployment.images(1)[0])


def test_a_swap_refused_half_way_leaves_the_previous_route_in_force(server, deployment):
    """Head a:2 passes every check and is recorded, then the route change is refused (a negative weight): the
    route stays as it was, and no request fails meanwhile."""
    before = _route(server)
    old = server.live()["a"]
    new = 2 if old == 1 else 1
    stop = threading.Event()
    calls, pool = load_until(server, deployment.images(8), stop)
    time.sleep(1.0)
    response = server.admin(
        "/admin/load", {"build_dir": str(deployment.build_dir), "head": "a", "version": new, "weight": -1}
    )
    time.sleep(1.0)
    stop.set()
    for thread in pool:
        thread.join(timeout=60)
    failed = [c for c in calls if c.error]
    RELIABILITY["requests during swaps"] += len(calls)
    RELIABILITY["failed requests during swaps"] += len(failed)
    assert response.status_code == 400 and "weight" in response.json()["error"], response.text
    assert not failed, failed[:5]
    assert _route(server) == before
    assert {c.answer["version"] for c in calls if c.answer["head"] == "a"} == {old}


def _workers(server: Server) -> list[psutil.Process]:
    """The live worker processes of ``bentoml serve`` (a killed one may linger as a zombie: skipped)."""
    found = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "--worker-id" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:  # gone between listing and looking
            pass
    return found


def test_a_killed_worker_is_replaced_and_the_service_recovers(server, deployment):
    images = deployment.images(8)
    workers = _workers(server)
    assert len(workers) == 2
    stop = threading.Event()
    calls, pool = load_until(server, images, stop)
    time.sleep(2.0)
    victim = workers[0]
    killed_at = time.perf_counter()  # the clock of loadgen's records
    os.kill(victim.pid, signal.SIGKILL)
    deadline, replaced_at = killed_at + 60, None
    while time.perf_counter() < deadline and replaced_at is None:
        time.sleep(0.2)
        current = _workers(server)
        if len(current) == 2 and victim.pid not in {p.pid for p in current}:
            replaced_at = time.perf_counter()
    time.sleep(5.0)  # load on the recovered service
    stop.set()
    for thread in pool:
        thread.join(timeout=60)
    assert replaced_at is not None, "the killed worker was not replaced within 60 s"
    failed = [c for c in calls if c.error]
    RELIABILITY["requests tried"] += len(calls)
    RELIABILITY["failed requests while a worker was down"] += len(failed)
    RELIABILITY_NOTES["worker kill"] = (
        f"SIGKILL of 1 of 2 workers under 8 clients: replaced after "
        f"{replaced_at - killed_at:.1f} s, {len(failed)} of {len(calls)} requests "
        "failed (those in flight on the killed worker)"
    )
    assert len(failed) <= 8, failed[:10]  # at most the requests in flight on the killed worker
    assert all(c.start < killed_at + 0.5 for c in failed), [c for c in failed if c.start >= killed_at + 0.5][:5]
    after = [c for c in calls if c.start > replaced_at + 1.0]
    assert len(after) > 10 and all(c.error is None for c in after)
    assert server.client.get("/readyz").status_code == 200
    _check_answer(server, DirectOnnx(deployment.build_dir), images[0])


# ---------------------------------------------------------------- who may change the model


def test_paths_from_requests_cannot_leave_the_model_store(server, deployment, tmp_path_factory):
    """Admin token tests (401, nothing changes) are in test_bento; here, with the token: names and paths."""
    before = _route(server)
    outside = tmp_path_factory.getbasetemp().parent  # outside TL_MODELS_BUILD_ROOTS
    cases = [
        ({"head": "../../etc/passwd", "version": 1}, 400, "bad head name"),
        ({"head": "a/../../b", "version": 1}, 400, "bad head name"),
        ({"tag": "../../etc/passwd"}, 400, "bad model tag"),
        ({"tag": "build-head-a:../../v1"}, 400, "bad model tag"),
        ({"tag": "x:y:z"}, 400, "bad model tag"),
        ({"build_dir": "/etc", "head": "a"}, 403, "outside the directories"),
        ({"build_dir": str(deployment.build_dir / ".." / ".." / ".." / ".."), "head": "a"}, 403, "outside"),
        ({"build_dir": str(outside), "head": "a"}, 403, "outside"),
        ({"build_dir": str(deployment.build_dir), "head": "../../../etc/passwd"}, 400, "bad head name"),
    ]
    for body, status, message in cases:
        response = server.admin("/admin/load", body)
        assert response.status_code == status, (body, response.text)
        assert message in response.json()["error"], (body, response.text)
    response = server.admin("/admin/retire", {"head": "../../etc/passwd"})
    assert response.status_code == 404, response.text
    assert _route(server) == before
    state = deployment.root / "state"
    assert all(p.resolve().is_relative_to(state.resolve()) for p in state.rglob("*"))


def test_a_damaged_route_file_keeps_the_last_good_route_serving(server: Server, deployment) -> None:
    """A half-written route file on the state volume (a hand edit, a copy cut short): both workers keep answering
    on their last good route, /heads names the damage, the gauge says so, and an admin change is refused without
    touching the file; a repaired file is followed again."""
    path = deployment.root / "state" / "route.json"
    good, damaged = path.read_bytes(), b'{"weights": {"a": 1.0, "b": 1.0}, "versions": {"a": 1'
    image = deployment.images(1)[0]
    try:
        path.write_bytes(damaged)
        answers = [server.classify(image) for _ in range(8)]
        assert [a.status_code for a in answers] == [200] * 8, answers[-1].text
        error = server.heads()["route_error"]
        assert error and f"route file {path} is damaged" in error, error
        assert re.search(r"^tl_models_route_damaged(\{[^}]*\})? 1\.0$", server.client.get("/metrics").text, re.M)
        response = server.admin("/admin/weights", {"weights": {"a": 1, "b": 3}})
        assert response.status_code == 422 and "nothing was changed" in response.text, response.text
        assert path.read_bytes() == damaged
    finally:
        path.write_bytes(good)
        os.utime(path)
    assert server.heads()["route_error"] is None
    assert server.classify(image).status_code == 200


def _another_backbone(build: Path, out: Path) -> Path:
    """A copy of ``build`` whose backbone graph has other bytes (its doc string): to the service, another backbone
    (its heads are recorded as trained on it)."""
    shutil.copytree(build, out)
    model = onnx.load(out / "backbone.onnx")
    model.doc_string = "another backbone"
    onnx.save(model, out / "backbone.onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["backbone.onnx"] = file_sha256(out / "backbone.onnx")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _cannot_start(deployment, kind: str, root: Path) -> tuple[dict, str]:
    """An environment `bentoml serve` cannot start on, made the way a bad copy or a wrong setting would; the line
    it must print."""
    env = {**deployment.env, "TL_MODELS_STATE_DIR": str(root / "state"), "TL_MODELS_WORKERS": "1"}
    if kind == "corrupt backbone":
        build = shutil.copytree(deployment.build_dir, root / "build")
        damage_bytes(build / "backbone.onnx")
        return {**env, "TL_MODELS_BUILD": str(build)}, f"{build / 'backbone.onnx'} fails its sha256 check"
    if kind == "tampered head in the model store":
        home = shutil.copytree(deployment.env["BENTOML_HOME"], root / "bentoml")
        latest = (home / "models" / "build-head-a" / "latest").read_text().strip()  # the version a new route takes
        (head,) = (home / "models" / "build-head-a" / latest).rglob("head.onnx")
        damage_bytes(head)
        return {**env, "BENTOML_HOME": str(home)}, f"head a:{latest[1:]}: {head} fails its sha256 check"
    if kind == "state dir of another backbone":
        HeadCatalog(root / "state" / "heads.json").put(sources_from_build(deployment.build_dir)[1])
        other = _another_backbone(deployment.build_dir, root / "other")
        return {**env, "TL_MODELS_BUILD": str(other)}, f"state directory {root / 'state'} was made for another backbone"
    assert kind == "damaged route file"
    (root / "state").mkdir()
    route = root / "state" / "route.json"
    route.write_text('{"weights": {"a": 1.0}, "versions": {"a"')
    return {**env, "TL_MODELS_BUILD": str(deployment.build_dir)}, f"route file {route} is damaged"


@pytest.mark.parametrize(
    "kind",
    ["corrupt backbone", "tampered head in the model store", "state dir of another backbone", "damaged route file"],
)
def test_a_service_that_cannot_start_exits_once_with_one_line(deployment, tmp_path: Path, kind: str) -> None:
    """BentoML restarts a worker whose start fails, forever: what would stop every worker is refused where
    `bentoml serve` imports the service, before any worker starts: exit 1, one line naming the file."""
    env, line = _cannot_start(deployment, kind, tmp_path)
    log_path = tmp_path / "serve.log"
    started = time.monotonic()
    with pytest.raises(BentoServerError, match="exited with code 1 before it was ready"):
        bento_server.start(env, log_path=log_path, timeout=120)
    log_text = log_path.read_text()
    assert "tl-models: the service cannot start: " in log_text and line in log_text, log_text[-2000:]
    assert "Traceback" not in log_text and "Initializing service error" not in log_text, log_text[-2000:]
    assert time.monotonic() - started < 60


def test_a_tampered_head_in_the_model_store_is_refused_and_the_service_keeps_serving(server: Server, deployment):
    """A head file in the BentoML store changed after packaging: loading it is refused (422, the file named), the
    route and the answers stay as they were."""
    (head,) = (Path(deployment.env["BENTOML_HOME"]) / "models" / "build-head-b" / "v1").rglob("head.onnx")
    good = head.read_bytes()
    before = _route(server)
    try:
        damage_bytes(head)
        response = server.admin("/admin/load", {"head": "b", "version": 1})
        assert response.status_code == 422, response.text
        assert f"{head} fails its sha256 check" in response.json()["error"], response.text
        assert _route(server) == before
        assert server.classify(deployment.images(1)[0]).status_code == 200
    finally:
        head.write_bytes(good)
    assert server.admin("/admin/load", {"head": "b", "version": 1}).status_code == 200
