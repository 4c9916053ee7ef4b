"""Helpers shared by test modules (plain functions and classes; the fixtures that use them live in conftest.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tl_models.bench.loadgen import BentoCaller, Record, drive
from tl_models.bento.launcher import BentoServer
from tl_models.core.files import file_sha256
from tl_models.core.manifest import BuildDir, Manifest
from tl_models.core.preprocess import Preprocessing, preprocess_bytes
from tl_models.core.routing import Route, RoutingState, read_route
from tl_models.training.config import TrainConfig
from tl_models.training.data import write_demo_dataset
from tl_models.training.options import BuildOptions
from tl_models.training.pipeline import build
from tl_models.triton import swap as triton_swap
from tl_models.triton.config import head_model

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FEEDBACK_TOKEN = "test-feedback-token"
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}

# figures of the reliability tests, printed at the end of the run (conftest.pytest_terminal_summary)
RELIABILITY: Counter = Counter()
RELIABILITY_NOTES: dict[str, str] = {}


def serving_build(root: Path, per_class: int = 10) -> Path:
    """A real build for serving tests: digits, mobilenet_v2 with ImageNet weights, heads ``a`` (linear) and
    ``b`` (mlp), each exported to ONNX with parity checked. Returns the build directory."""
    data = write_demo_dataset(root / "data", per_class=per_class)
    out = root / "build"
    for name, kind in (("a", "linear"), ("b", "mlp")):
        build(
            BuildOptions(
                data=data,
                out=out,
                backbone="mobilenet_v2",
                weights="IMAGENET1K_V1",
                kind=kind,
                head=name,
                train=TrainConfig(epochs=15),
                cache_dir=root / "cache",
                progress=False,
            )
        )
    return out


# ---------------------------------------------------------------- BentoML


@dataclass
class Deployment:
    """A build (heads a:1, b:1 packaged; a:2 trained afterwards, not packaged) and its BentoML store."""

    root: Path
    build_dir: Path
    env: dict[str, str]

    @property
    def manifest(self) -> Manifest:
        return BuildDir(self.build_dir).manifest()

    def fake_build(
        self,
        root: Path,
        head: str,
        version: int,
        head_bytes: bytes,
        sha: str | None = None,
        backbone_sha: str | None = None,
    ) -> Path:
        """A build directory at ``root`` whose only head ``head``:``version`` has ``head_bytes`` as head.onnx (and
        ``sha`` / ``backbone_sha`` in its manifest instead of the true ones, when given)."""
        manifest = self.manifest.to_dict()
        rel = f"heads/{head}/{version}"
        (root / rel).mkdir(parents=True)
        (root / rel / "head.onnx").write_bytes(head_bytes)
        manifest["heads"] = [
            {**manifest["heads"][0], "name": head, "version": version, "path": rel, "files": ["head.onnx"]}
        ]
        manifest["files"] = {
            "backbone.onnx": backbone_sha or manifest["files"]["backbone.onnx"],
            f"{rel}/head.onnx": sha or file_sha256(root / rel / "head.onnx"),
        }
        (root / "manifest.json").write_text(json.dumps(manifest))
        return root

    def images(self, n: int) -> list[bytes]:
        paths = sorted((self.build_dir.parent / "data").rglob("*.png"))
        return [p.read_bytes() for p in paths[:: max(1, len(paths) // n)][:n]]

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "tl_models.cli", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
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

    def reset(self) -> None:
        """The service as its fixture started it: no shadow head, heads a:1 and b:1 from the store, live with equal
        weights (``conftest.shared_servers_as_started`` calls it before every test that uses the server)."""
        for shadow in {s["name"] for s in self.heads()["shadow"]}:
            response = self.admin("/admin/shadow", {"head": shadow, "share": 0})
            assert response.status_code == 200, response.text
        for head in ("a", "b"):
            response = self.admin("/admin/load", {"head": head, "version": 1})
            assert response.status_code == 200, response.text
        response = self.admin("/admin/weights", {"weights": {"a": 1, "b": 1}})
        assert response.status_code == 200, response.text
        status = self.heads()
        assert self.live() == {"a": 1, "b": 1} and status["shadow"] == [], status

    def classify(self, image: bytes, headers: dict | None = None, top_k: int | None = None) -> httpx.Response:
        data = {"top_k": str(top_k)} if top_k is not None else {}
        return self.client.post(
            "/classify", files={"image": ("x.png", image, "image/png")}, data=data, headers=headers or {}
        )


def load_until(
    server: Server, images: list[bytes], stop: threading.Event, threads: int = 8
) -> tuple[list[Record], list[threading.Thread]]:
    """``threads`` clients (``tl_models.bench.loadgen.drive``) sending /classify until ``stop`` is set; the records
    (``answer``: the JSON body; ``error``: None on success) are in the list once the returned thread has ended."""
    records: list[Record] = []
    runner = threading.Thread(
        target=lambda: records.extend(drive(lambda: BentoCaller(server.url), images, threads, stop=stop)[0])
    )
    runner.start()
    return records, [runner]


class DirectOnnx:
    """The build's ONNX files run with plain onnxruntime: the reference for what the service answers."""

    def __init__(self, build_dir: Path, backbone: str = "backbone.onnx"):
        self.build_dir = build_dir
        manifest = BuildDir(build_dir).manifest()
        self.spec = Preprocessing.from_dict(manifest.preprocessing)
        self.labels = manifest.labels
        self.backbone = ort.InferenceSession(str(build_dir / backbone), providers=["CPUExecutionProvider"])
        self._heads: dict[tuple[str, int], ort.InferenceSession] = {}

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.backbone.run(["embedding"], {"image": batch})[0]

    def logits(self, batch: np.ndarray, head: str, version: int) -> np.ndarray:
        if (head, version) not in self._heads:
            path = self.build_dir / "heads" / head / str(version) / "head.onnx"
            self._heads[(head, version)] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return self._heads[(head, version)].run(["logits"], {"embedding": self.embed(batch)})[0]

    def __call__(self, images: list[bytes], head: str, version: int) -> np.ndarray:
        """Logits of encoded images, preprocessed as the servers do."""
        return self.logits(np.stack([preprocess_bytes(data, self.spec) for data in images]), head, version)


# ---------------------------------------------------------------- Triton


def live(served: dict, head: str) -> int:
    """The live version of ``head`` in the served repository's route file."""
    return read_route(served["repo"] / served["name"] / "route.json").versions[head]


TRITON_START = Route(weights={"a": 90.0, "b": 10.0}, versions={"a": 1, "b": 1})


def restore_triton(served: dict) -> None:
    """The shared tritonserver as the ``served`` fixture started it (``TRITON_START``: a:1 and b:1 live at 90/10,
    no shadow head), through the same swap functions the CLI uses, each step only where the state differs
    (``conftest.shared_servers_as_started`` calls it before every test that uses the server)."""
    url, repo, name = served["server"].http_url, served["repo"], served["name"]
    state = RoutingState(repo / name / "route.json", poll=0)
    client = httpclient.InferenceServerClient(url)
    try:
        for head, version, _ in state.current().shadows():
            if client.is_model_ready(head_model(name, head), str(version)):
                triton_swap.shadow(url, repo, name, head, version, share=0, drain=0.2)
            else:  # a version that never loaded (a test's failing shadow): only the route names it
                state.update(shadow={f"{head}:{version}": 0})
    finally:
        client.close()
    for head, version in TRITON_START.versions.items():
        if state.current().versions.get(head) != version:
            triton_swap.swap(url, repo, name, head, version, drain=0.2)
    if state.current().weights != TRITON_START.weights:
        state.update(weights=TRITON_START.weights)
    route = state.current()
    assert (route.versions, route.weights, route.shadow) == (TRITON_START.versions, TRITON_START.weights, {}), route
    # ready again: Triton reports not ready while it finishes the unloads above (or the test before's)
    triton_swap.Replicas([url]).check_ready(wait=60)


def url(served: dict, protocol: str) -> str:
    return served["server"].http_url if protocol == "http" else served["server"].grpc_url


def bytes_input(module, data: list[bytes], name: str = "image_bytes"):
    """A BYTES input of ``len(data)`` rows for tritonclient.http or tritonclient.grpc (``module``)."""
    tensor = module.InferInput(name, [len(data), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_).reshape(-1, 1))
    return tensor


class RouterCaller:
    """A ``loadgen.drive`` caller for a Triton model over ``protocol``: one image per call; for the router (the
    build's own name) every other call forces ``route_head``, and the answer is the ``head`` output ("a:2"); for
    an ensemble the answer is its name."""

    def __init__(self, served: dict, model: str, protocol: str, force_head: str | None = None):
        self.module = httpclient if protocol == "http" else grpcclient
        self.client = self.module.InferenceServerClient(url(served, protocol))
        self.model, self.router, self.force_head, self.calls = model, model == served["name"], force_head, 0
        names = ("logits", "head") if self.router else ("logits",)
        self.outputs = [self.module.InferRequestedOutput(n) for n in names]

    def __call__(self, image: bytes) -> str:
        self.calls += 1
        inputs = [bytes_input(self.module, [image])]
        if self.router and self.force_head and self.calls % 2:
            inputs.append(bytes_input(self.module, [self.force_head.encode()], "route_head"))
        result = self.client.infer(self.model, inputs, outputs=self.outputs)
        return result.as_numpy("head")[0, 0].decode() if self.router else self.model

    def close(self) -> None:
        self.client.close()


def load_triton_until(
    served: dict, images: list[bytes], stop: threading.Event, force_head: str | None = None
) -> tuple[list[Record], list[threading.Thread]]:
    """One ``loadgen.drive`` client per (router, ensemble ``NAME_a``) x (HTTP, gRPC) until ``stop`` is set; the
    records are in the list once the returned threads have ended."""
    records: list[Record] = []
    threads = [
        threading.Thread(
            target=lambda model=model, protocol=protocol: records.extend(
                drive(lambda: RouterCaller(served, model, protocol, force_head), images, 1, stop=stop)[0]
            )
        )
        for model in (served["name"], f"{served['name']}_a")
        for protocol in ("http", "grpc")
    ]
    for thread in threads:
        thread.start()
    return records, threads


def sticky_head(weights: dict[str, float], versions: dict[str, int], key: str) -> str:
    """``head:version`` a sticky request with ``key`` must get, by the README's rule written out again here (not
    through ``tl_models.core.routing``): sha256 of the key, its first 8 bytes as a point in [0, 1), the heads with
    weight > 0 in name order taking consecutive shares of [0, 1) in proportion to their weights."""
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    live = sorted((name, w) for name, w in weights.items() if w > 0)
    total, edge = sum(w for _, w in live), 0.0
    for name, weight in live:
        edge += weight / total
        if point < edge:
            return f"{name}:{versions[name]}"
    return f"{live[-1][0]}:{versions[live[-1][0]]}"


def damage_bytes(path: Path) -> None:
    """Damage a file the way a bad copy would: a few bytes mid-file overwritten (its size unchanged, so only a
    checksum finds it; in a model file they fall among the weights, which ONNX Runtime would load)."""
    with open(path, "r+b") as handle:
        handle.seek(handle.seek(0, 2) // 2)
        handle.write(b"\x00\xff" * 8)


def subset(source: Path, target: Path, classes: list[str], per_class: int) -> Path:
    """Copy the first ``per_class`` images of ``classes`` into a new ImageFolder."""
    for cls in classes:
        (target / cls).mkdir(parents=True)
        for path in sorted((source / cls).iterdir())[:per_class]:
            shutil.copyfile(path, target / cls / path.name)
    return target
