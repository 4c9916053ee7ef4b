"""Helpers shared by test modules (plain functions and classes; the fixtures that use them live in conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from tl_models.core.manifest import BuildDir
from tl_models.bento.launcher import BentoServer
from tl_models.build.pipeline import BuildOptions, build
from tl_models.build.data import write_demo_dataset
from tl_models.core.preprocess import Preprocessing
from tl_models.core.routing import RoutingState
from tl_models.build.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}

# figures of the reliability tests, printed at the end of the run (conftest.pytest_terminal_summary)
RELIABILITY: Counter = Counter()
RELIABILITY_NOTES: dict[str, str] = {}


def serving_build(root: Path, per_class: int = 10) -> Path:
    """A real build for serving tests: digits, mobilenet_v2 with ImageNet weights, heads ``a`` (linear) and
    ``b`` (mlp), each exported to ONNX with parity checked. Returns the build directory."""
    data = write_demo_dataset(root / "data", per_class=per_class)
    out = root / "build"
    for name, kind in (("a", "linear"), ("b", "mlp")):
        build(BuildOptions(data=data, out=out, backbone="mobilenet_v2", weights="IMAGENET1K_V1", head=kind,
                           name=name, train=TrainConfig(epochs=15), cache_dir=root / "cache", progress=False))
    return out


# ---------------------------------------------------------------- BentoML

@dataclass
class Deployment:
    """A build (heads a:1, b:1 packaged; a:2 trained afterwards, not packaged) and its BentoML store."""

    root: Path
    build_dir: Path
    env: dict[str, str]

    @property
    def manifest(self) -> dict:
        return BuildDir(self.build_dir).manifest()

    def images(self, n: int) -> list[bytes]:
        paths = sorted((self.build_dir.parent / "data").rglob("*.png"))
        return [p.read_bytes() for p in paths[:: max(1, len(paths) // n)][:n]]

    def cli(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "tl_models.cli", *args], env=self.env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


@dataclass
class Server:
    """A running ``bentoml serve`` (``process``) and an HTTP client on it."""

    url: str
    client: httpx.Client
    process: BentoServer

    def admin(self, path: str, body: dict, headers: dict | None = ADMIN) -> httpx.Response:
        return self.client.post(path, json=body, headers=headers or {})

    def heads(self) -> dict:
        response = self.client.get("/heads")
        assert response.status_code == 200, response.text
        return response.json()

    def live(self) -> dict[str, int]:
        return {h["name"]: h["version"] for h in self.heads()["heads"]}

    def classify(self, image: bytes, headers: dict | None = None, top_k: int | None = None) -> httpx.Response:
        data = {"top_k": str(top_k)} if top_k is not None else {}
        return self.client.post("/classify", files={"image": ("x.png", image, "image/png")}, data=data,
                                headers=headers or {})


@dataclass
class Call:
    """One /classify call made by :func:`load_until`: when, the status (None: no answer) and the body."""

    start: float
    end: float
    status: int | None
    body: dict | str


def load_until(server: Server, images: list[bytes], stop: threading.Event,
               threads: int = 8) -> tuple[list[Call], list[threading.Thread]]:
    """Client threads sending /classify (each with its own sticky key) until ``stop`` is set."""
    calls: list[Call] = []

    def worker(index: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            j = 0
            while not stop.is_set():
                start = time.monotonic()
                try:
                    r = client.post("/classify", files={"image": ("x.png", images[j % len(images)], "image/png")},
                                    headers={"X-TL-Key": f"client-{index}-{j}"})
                    calls.append(Call(start, time.monotonic(), r.status_code, r.json()))
                except httpx.HTTPError as exc:
                    calls.append(Call(start, time.monotonic(), None, repr(exc)))
                j += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    return calls, pool


class DirectOnnx:
    """The build's ONNX files run with plain onnxruntime: the reference for what the service answers."""

    def __init__(self, build_dir: Path):
        self.build_dir = build_dir
        manifest = BuildDir(build_dir).manifest()
        self.spec = Preprocessing.from_dict(manifest["preprocessing"])
        self.labels = manifest["labels"]
        self.backbone = ort.InferenceSession(str(build_dir / "backbone.onnx"), providers=["CPUExecutionProvider"])
        self._heads: dict[tuple[str, int], ort.InferenceSession] = {}

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.backbone.run(["embedding"], {"image": batch})[0]

    def logits(self, batch: np.ndarray, head: str, version: int) -> np.ndarray:
        if (head, version) not in self._heads:
            path = self.build_dir / "heads" / head / str(version) / "head.onnx"
            self._heads[(head, version)] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return self._heads[(head, version)].run(["logits"], {"embedding": self.embed(batch)})[0]


# ---------------------------------------------------------------- Triton

def live(served: dict, head: str) -> int:
    """The live version of ``head`` in the served repository's route file."""
    return RoutingState(served["repo"] / served["name"] / "route.json", poll=0).current().versions[head]


def url(served: dict, protocol: str) -> str:
    return served["server"].http_url if protocol == "http" else served["server"].grpc_url


def bytes_input(module, data: list[bytes], name: str = "image_bytes"):
    """A BYTES input of ``len(data)`` rows for tritonclient.http or tritonclient.grpc (``module``)."""
    tensor = module.InferInput(name, [len(data), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_).reshape(-1, 1))
    return tensor
