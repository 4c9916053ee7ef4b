"""`tl-models build --ray`: extraction with Ray Data on a real local Ray cluster (a head node and a worker node,
each `ray start` on its own loopback address): the same embeddings and head as the local path, a killed worker
loses no image, and an address nothing answers at is a one-line error before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from tl_models.core.manifest import BuildDir
from tl_models.core.process import free_port
from tl_models.training.data import write_demo_dataset

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # loopback addresses Ray keeps (it rewrites 127.0.0.1)
ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def _ray(*args: str) -> subprocess.CompletedProcess:
    ray = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray), *args], capture_output=True, text=True, timeout=180, env={**os.environ, **ENV})


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head node and a worker node, 2 logical CPUs each; stopped (with every Ray process here) afterwards."""
    port = free_port()
    head = _ray(
        "start",
        "--head",
        "--node-ip-address",
        HEAD_IP,
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--include-dashboard=false",
        "--disable-usage-stats",
    )
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = _ray(
            "start",
            "--address",
            f"{HEAD_IP}:{port}",
            "--node-ip-address",
            WORKER_IP,
            "--num-cpus",
            "2",
            "--disable-usage-stats",
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"{HEAD_IP}:{port}"
    finally:
        _ray("stop", "--force")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("ray") / "digits", per_class=40)


def _build(data: Path, out: Path, cache: Path, *more: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "tl_models.cli",
        "build",
        "--data",
        str(data),
        "--out",
        str(out),
        "--weights",
        "IMAGENET1K_V1",
        "--epochs",
        "3",
        "--cache-dir",
        str(cache),
        *more,
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **ENV, "TL_MODELS_SHARD_IMAGES": "25"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _shards(cache: Path) -> np.ndarray:
    entry = next((cache / "features").glob("*/index.json")).parent
    index = json.loads((entry / "index.json").read_text())
    return np.concatenate([np.load(entry / s["file"]) for s in index["shards"]])


def _embed_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("_Embed" in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_a_ray_build_matches_the_local_one_and_survives_a_killed_worker(
    cluster: str, digits: Path, offline_weights, tmp_path: Path
) -> None:
    local = _build(digits, tmp_path / "local", tmp_path / "local-cache", "--engine", "onnxruntime")
    out, err = local.communicate(timeout=600)
    assert local.returncode == 0, err[-3000:]
    assert "in process" in out

    on_ray = _build(digits, tmp_path / "ray", tmp_path / "ray-cache", "--ray", cluster, "--ray-actors", "2")
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and on_ray.poll() is None:
        workers = _embed_workers()
        if workers and any((tmp_path / "ray-cache" / "features").glob("*/index.json")):
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)  # an actor's process, mid-extraction
        time.sleep(0.05)
    out, err = on_ray.communicate(timeout=600)
    assert on_ray.returncode == 0, err[-3000:]
    assert killed is not None, "the extraction ended before a worker could be killed"
    assert "400 images embedded by onnxruntime on cpu, Ray (2 actors)" in out, out

    # every image embedded exactly once, as the local engine embeds it
    ray_embeddings, local_embeddings = _shards(tmp_path / "ray-cache"), _shards(tmp_path / "local-cache")
    assert ray_embeddings.shape == local_embeddings.shape == (400, 1280)
    assert float(np.abs(ray_embeddings - local_embeddings).max()) <= 1e-5
    a, b = BuildDir(tmp_path / "ray").verify(), BuildDir(tmp_path / "local").verify()
    assert a.heads[0].metrics == b.heads[0].metrics
    assert a.files["heads/default/1/head.pt"] == b.files["heads/default/1/head.pt"]


def test_an_unreachable_ray_address_is_one_line_before_anything_is_written(digits: Path, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tl_models.cli",
            "build",
            "--data",
            str(digits),
            "--out",
            str(tmp_path / "out"),
            "--weights",
            "none",
            "--ray",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **ENV},
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: --ray 127.0.0.1:{port}: no Ray cluster answers there"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_cluster_too_small_for_its_actors_is_refused(cluster: str, digits: Path, tmp_path: Path) -> None:
    small = shutil.copytree(digits, tmp_path / "small", ignore=lambda d, names: sorted(names)[4:])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tl_models.cli",
            "build",
            "--data",
            str(small),
            "--out",
            str(tmp_path / "out"),
            "--weights",
            "none",
            "--ray",
            cluster,
            "--ray-actors",
            "9",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **ENV},
    )
    assert result.returncode == 1
    assert "the Ray cluster has 4 CPUs: 9 actor(s) take one each" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
