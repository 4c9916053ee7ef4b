"""Fine-tuned versions on a build's shared trunk (``tl_models.training.tails``): `build --out EXISTING --head NAME
--fine-tune N` adds a version whose last N stages are its own, the frozen heads' files untouched, parity on both
paths, `tl-models parity` and `tl-models export` through them; the servers leave such versions out until they run
tails."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tl_models.bench.loadgen import BentoCaller, drive
from tl_models.bento import launcher
from tl_models.bento.engine import ServingConfig, ServingEngine
from tl_models.core.embedding_log import read_log
from tl_models.core.errors import BuildError, Refused
from tl_models.core.heads import frozen_versions, head_source_from_build, sources_from_build
from tl_models.core.manifest import BuildDir
from tl_models.core.preprocess import Preprocessing, preprocess_bytes
from tl_models.core.routing import RoutingState
from tl_models.core.runtime import create_session
from tl_models.training.config import FineTune
from tl_models.training.data import load_image_folder
from tl_models.training.features import load_images
from tl_models.training.options import BuildReport
from tl_models.training.pipeline import check_parity, load_head_module, reexport
from tl_models.training.tails import tuned_backbone

from helpers import ADMIN, FEEDBACK, FEEDBACK_TOKEN, TOKEN, sticky_head, subset

pytestmark = pytest.mark.slow
TUNE = FineTune(stages=2, lr=3e-5, epochs=2, augment=("crop",))  # short and visible: stage 2 must move the weights


@pytest.fixture(scope="module")
def small(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subset(demo_data, tmp_path_factory.mktemp("tails") / "small", ["3", "8"], per_class=8)


@pytest.fixture(scope="module")
def tuned(small: Path, quick_build, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, BuildReport]:
    """A build with a frozen head a:1, then a:2 fine-tuned on its trunk (its last two stages): the folder, the
    files and sha256s before a:2, a:2's report. Tests copy it before changing it."""
    out = tmp_path_factory.mktemp("tuned") / "out"
    quick_build(small, out, head="a", epochs=1, export=True)
    before = dict(BuildDir(out).manifest().files)
    return out, before, quick_build(small, out, head="a", epochs=1, export=True, fine_tune=TUNE)


def test_a_fine_tuned_version_joins_the_build_on_its_trunk(small: Path, quick_build, tuned, tmp_path: Path) -> None:
    out = Path(shutil.copytree(tuned[0], tmp_path / "out"))
    before, report = tuned[1], tuned[2]
    entry = report.head
    assert entry.key == "a:2" and entry.train["fine_tune"]["kept"] is True
    assert entry.tail == {
        "stages": 2,
        "at": "features.14",
        "activation": [96, 14, 14],
        "trunk": "trunk-2.onnx",
        "frozen_tail": "tail-2.onnx",
    }
    manifest = BuildDir(out).verify()  # every file's sha256, the new ones too
    assert {rel: manifest.files[rel] for rel in before} == before  # backbone.pt, backbone.onnx, a:1: untouched
    assert {"trunk-2.onnx", "tail-2.onnx"} <= set(manifest.top_files)
    assert {"tail.pt", "tail.onnx", "head.onnx", "parity.json"} <= set(entry.files)
    parity = json.loads((out / entry.path / "parity.json").read_text())
    assert parity["passed"]
    graphs = {check["graph"] for check in parity["checks"]}
    assert graphs == {"trunk-2.onnx+tail-2.onnx", "a:2/trunk+tail", "a:2/head", "a:2/fused"}, graphs

    # its path: the build's backbone.pt cut before the last two stages, its own tail.pt; only the tail was tuned
    cut = tuned_backbone(BuildDir(out), manifest, entry)
    saved = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    tail = cut.tail.state_dict()
    assert {key.split(".")[2] for key in tail} == {"14", "15", "16", "17", "18"}  # features.features.<block>...
    assert any(not torch.equal(saved[key], value) for key, value in tail.items())
    trunk_keys = set(saved) - set(tail)
    assert all(torch.equal(saved[key], cut.trunk.state_dict()[key]) for key in trunk_keys & set(cut.trunk.state_dict()))

    # the ONNX path (trunk-2.onnx, tail.onnx, head.onnx) answers as the PyTorch modules on real digits
    images = load_images(load_image_folder(small), Preprocessing.from_dict(manifest.preprocessing), progress=False)
    activation = create_session(out / "trunk-2.onnx").run(["activation"], {"image": images})[0]
    embedding = create_session(out / entry.path / "tail.onnx").run(["embedding"], {"activation": activation})[0]
    logits = create_session(out / entry.path / "head.onnx").run(["logits"], {"embedding": embedding})[0]
    head = load_head_module(BuildDir(out), entry)
    with torch.inference_mode():
        expected = head(cut.tail(cut.trunk(torch.from_numpy(images)))).numpy()
    assert np.allclose(logits, expected, atol=1e-4, rtol=1e-3) and (logits.argmax(1) == expected.argmax(1)).all()
    frozen = create_session(out / "backbone.onnx").run(["embedding"], {"image": images})[0]
    assert np.abs(embedding - frozen).max() > 1e-3  # the tuned path is not the frozen one

    # `tl-models parity` and `tl-models export` go through both paths
    checked = check_parity(out)
    assert checked.passed and {"a:1/fused", "trunk-2.onnx+tail-2.onnx", "a:2/fused"} <= {
        c.graph for c in checked.checks
    }
    assert reexport(out).passed
    assert BuildDir(out).verify().head("a", 2).tail == entry.tail

    # a frozen head can follow, and another tuned version with another cut
    assert quick_build(small, out, head="b", epochs=1, export=True).head.tail is None
    third = quick_build(small, out, head="b", epochs=1, export=True, fine_tune=FineTune(stages=1, lr=3e-5, epochs=2))
    assert third.head.train["fine_tune"]["kept"] and third.head.tail is not None, third.head.train["fine_tune"]
    assert third.head.tail["trunk"] == "trunk-1.onnx" and third.head.key == "b:2"
    assert {"trunk-1.onnx", "tail-1.onnx", "trunk-2.onnx"} <= set(BuildDir(out).verify().top_files)

    # packaging takes the frozen versions only (the model store and Triton's repository do not hold tails yet)
    assert [e.key for e in frozen_versions(BuildDir(out).manifest())] == ["a:1", "b:1"]


def test_a_fine_tuned_version_needs_an_exported_build(small: Path, quick_build, tmp_path: Path) -> None:
    out = tmp_path / "out"
    quick_build(small, out, head="a", epochs=1)  # export=False: no backbone.onnx for a trunk to equal
    before = BuildDir(out).manifest().files
    with pytest.raises(BuildError, match=r"--fine-tune into .* export the build first"):
        quick_build(small, out, head="a", epochs=1, fine_tune=TUNE)
    assert BuildDir(out).verify().files == before


def _offline(build: Path, key: str, images: np.ndarray) -> np.ndarray:
    """Top-1 of head version ``key`` on ``images``, its graphs run directly (ONNX Runtime, no server)."""
    manifest = BuildDir(build).manifest()
    name, _, version = key.partition(":")
    entry = manifest.head(name, int(version))
    if entry.tail is None:
        embedding = create_session(build / "backbone.onnx").run(["embedding"], {"image": images})[0]
    else:
        activation = create_session(build / entry.tail["trunk"]).run(["activation"], {"image": images})[0]
        embedding = create_session(build / entry.path / "tail.onnx").run(["embedding"], {"activation": activation})[0]
    return create_session(build / entry.path / "head.onnx").run(["logits"], {"embedding": embedding})[0].argmax(1)


def test_a_worker_serves_a_tuned_version_beside_the_frozen_one(small: Path, tuned, tmp_path: Path) -> None:
    """A BentoML worker on the build: a:2 (tuned) answers, then a:1 (frozen) answers with a:2 shadowed on every
    request; each answer equals its graphs run directly, shadow agreement equals the offline count, and drift is
    measured on each path's own embeddings."""
    build = tuned[0]
    backbone, heads = sources_from_build(build)
    assert {h.key: h.tail is not None for h in heads} == {"a:1": False, "a:2": True}
    engine = ServingEngine(backbone, heads, ServingConfig(state_dir=tmp_path / "state"))
    files = sorted(p for p in small.rglob("*.png"))
    data = [p.read_bytes() for p in files]
    images = np.stack([engine.preprocess(d) for d in data])
    labels = BuildDir(build).manifest().labels
    tuned_top, frozen_top = _offline(build, "a:2", images), _offline(build, "a:1", images)

    async def answers() -> list[dict]:
        return list(await asyncio.gather(*(engine.classify(d, head="a") for d in data)))

    assert engine.status()["heads"][0]["version"] == 2 and engine.status()["heads"][0]["tail_stages"] == 2
    got = asyncio.run(answers())
    assert [(a["version"], a["predictions"][0]["label"]) for a in got] == [(2, labels[i]) for i in tuned_top]
    assert engine.paths.cut is not None and engine.paths.cut.stages == 2

    asyncio.run(engine.load(head_source_from_build(build, "a", 1)))
    asyncio.run(engine.set_shadow(head_source_from_build(build, "a", 2), "a", 2, 1.0))
    got = asyncio.run(answers())
    assert [(a["version"], a["predictions"][0]["label"]) for a in got] == [(1, labels[i]) for i in frozen_top]
    assert engine.judge.settle(10)
    status = engine.status()
    (shadow,) = status["shadow"]
    assert (shadow["name"], shadow["version"], shadow["scored"]) == ("a", 2, len(data))
    assert round(shadow["agreement"] * shadow["scored"]) == int((tuned_top == frozen_top).sum())
    assert status["drift"]["tuned"] == {"a:2": 2 * len(data)}  # answered once, shadowed once: its own window
    engine.close()


def test_a_tuned_version_a_worker_cannot_run_is_refused_in_one_line_and_the_route_stays(
    small: Path, quick_build, tuned, tmp_path: Path
) -> None:
    """Phase 1 refusals of a tuned version: its tail file damaged, or a cut other than the one this worker runs
    (one cut per worker); each a one-line Refused naming the version, the route and answers unchanged."""
    build = Path(shutil.copytree(tuned[0], tmp_path / "out"))
    other = quick_build(small, build, head="b", epochs=1, export=True, fine_tune=FineTune(stages=1, lr=3e-5, epochs=2))
    assert other.head.key == "b:1" and other.head.tail is not None and other.head.tail["stages"] == 1
    backbone, heads = sources_from_build(build)
    engine = ServingEngine(backbone, [h for h in heads if h.key == "a:2"], ServingConfig(state_dir=tmp_path / "s"))
    image = next(small.rglob("*.png")).read_bytes()
    before = engine.status()["revision"]
    with pytest.raises(Refused, match=r"^head b:1 is cut before its last 1 stage\(s\) .* one cut per service$"):
        asyncio.run(engine.load(head_source_from_build(build, "b", 1)))
    tail = build / "heads" / "a" / "2" / "tail.onnx"
    tail.write_bytes(tail.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(Refused, match=r"^head a:2's tail: .*tail.onnx fails its sha256 check"):
        asyncio.run(engine.load(head_source_from_build(build, "a", 2), live=False))
    assert engine.status()["revision"] == before
    assert asyncio.run(engine.classify(image, head="a"))["version"] == 2  # the loaded session still answers
    engine.close()


def test_bentoml_serve_splits_and_judges_a_tuned_head_against_the_frozen_one(
    small: Path, quick_build, tuned, tmp_path: Path
) -> None:
    """A real `bentoml serve` on the build: head `a` at its frozen a:1 and head `tuned` (fine-tuned on the trunk)
    split 50/50 on sticky keys; every answer equals its head's graphs run directly, and feedback accuracy per head in
    `/heads` equals the offline count."""
    build = Path(shutil.copytree(tuned[0], tmp_path / "out"))
    assert quick_build(small, build, head="tuned", epochs=1, export=True, fine_tune=TUNE).head.tail is not None
    env = {
        **os.environ,
        "TL_MODELS_BUILD": str(build),
        "TL_MODELS_STATE_DIR": str(tmp_path / "state"),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "TL_MODELS_WORKERS": "1",
        "TL_MODELS_ACCESS_LOG": "0",
        "TL_MODELS_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
        "TL_MODELS_ADMIN_TOKEN": TOKEN,
        "TL_MODELS_BUILD_ROOTS": str(tmp_path),
        "TL_MODELS_LOG_SHARE": "1",
    }
    RoutingState(tmp_path / "state" / "route.json").update(weights={"a": 1, "tuned": 1}, versions={"a": 1, "tuned": 1})
    manifest = BuildDir(build).manifest()
    spec = Preprocessing.from_dict(manifest.preprocessing)
    files = sorted(small.rglob("*.png"))
    images = np.stack([preprocess_bytes(p.read_bytes(), spec) for p in files])
    offline = {"a:1": _offline(build, "a:1", images), "tuned:1": _offline(build, "tuned:1", images)}
    server = launcher.start(env, log_path=tmp_path / "serve.log", timeout=600)
    try:
        heads = httpx.get(f"{server.url}/heads", timeout=30).json()
        assert {(h["name"], h["version"], h["tail_stages"]) for h in heads["heads"]} == {
            ("a", 1, None),
            ("tuned", 1, 2),
        }
        answered: dict[str, list[int]] = {"a:1": [], "tuned:1": []}
        correct: dict[str, int] = {"a:1": 0, "tuned:1": 0}
        with httpx.Client(timeout=60) as client:
            for round_ in range(2):  # sticky: the same key gets the same head both times
                for index, path in enumerate(files):
                    key = f"user-{index}"
                    reply = client.post(
                        f"{server.url}/classify",
                        files={"image": (path.name, path.read_bytes(), "image/png")},
                        headers={"X-TL-Key": key},
                    ).json()
                    head = f"{reply['head']}:{reply['version']}"
                    assert head == sticky_head({"a": 1.0, "tuned": 1.0}, {"a": 1, "tuned": 1}, key)
                    label = manifest.labels[offline[head][index]]
                    assert reply["predictions"][0]["label"] == label, (head, path)
                    if round_ == 0:
                        answered[head].append(index)
                        truth = path.parent.name
                        response = client.post(
                            f"{server.url}/feedback",
                            json={"request_id": reply["request_id"], "label": truth},
                            headers=FEEDBACK,
                        )
                        assert response.status_code == 200, response.text
                        correct[head] += label == truth
        assert all(answered.values()), answered  # both heads answered some keys
        heads = {f"{h['name']}:{h['version']}": h for h in httpx.get(f"{server.url}/heads", timeout=30).json()["heads"]}
        for key, rows in answered.items():
            assert heads[key]["feedback"]["labelled"] == len(rows)
            assert heads[key]["feedback"]["correct"] == correct[key]

        # head a swapped from its frozen version to the tuned a:2 and back, under load: no request fails
        stop = threading.Event()
        records: list = []
        load = threading.Thread(
            target=lambda: records.extend(
                drive(lambda: BentoCaller(server.url), [p.read_bytes() for p in files], 4, stop=stop)[0]
            )
        )
        load.start()
        try:
            for version in (2, 1):
                time.sleep(1.0)
                body = {"build_dir": str(build), "head": "a", "version": version}
                response = httpx.post(f"{server.url}/admin/load", json=body, headers=ADMIN, timeout=120)
                assert response.status_code == 200, response.text
            time.sleep(1.0)
        finally:
            stop.set()
            load.join()
        assert records and not [r.error for r in records if r.error], [r.error for r in records if r.error][:3]
        served = {(r.answer["head"], r.answer["version"]) for r in records}
        assert {("a", 1), ("a", 2), ("tuned", 1)} <= served, served
    finally:
        server.stop()
    # the embedding log says whose embeddings each record holds: a tuned version's own, or the frozen backbone's
    log = read_log(tmp_path / "state" / "embedding-log")
    pairs = set(zip(log.columns["head"].tolist(), log.columns["path"].tolist()))
    assert pairs == {("a:1", ""), ("a:2", "a:2"), ("tuned:1", "tuned:1")}, pairs
