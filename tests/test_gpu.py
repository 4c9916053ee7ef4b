"""The GPU paths on a real CUDA device: ONNX Runtime's CUDA and TensorRT providers on a build's backbone, the fp16
graphs' parity, tritonserver loading KIND_GPU configs, and `bentoml serve` on CUDA. Every test here is marked
``gpu`` and skipped without a CUDA device (CI has none): run them with ``pytest -m gpu`` on a machine that has one.
The other GPU tests (the CUDA provider on a tiny graph, CUDA feature extraction) carry the same marker."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tl_models.bento import launcher as bento_server
from tl_models.core.heads import softmax
from tl_models.core.manifest import BuildDir
from tl_models.core.names import BACKBONE_FP16, BACKBONE_ONNX
from tl_models.core.preprocess import preprocess_bytes
from tl_models.core.runtime import active_provider, create_session, gpu_count
from tl_models.training.pipeline import reexport
from tl_models.triton.config import RepositoryOptions, head_model, read_config
from tl_models.triton.launcher import start as start_triton
from tl_models.triton.repository import write_repository

from helpers import Deployment, DirectOnnx, bytes_input, serving_build

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_build(tmp_path_factory, offline_weights) -> Path:
    """The serving tests' build (heads a and b on mobilenet_v2 ImageNet weights), built on this machine."""
    return serving_build(tmp_path_factory.mktemp("gpu"))


def _images(build: Path, n: int = 8) -> list[bytes]:
    return [p.read_bytes() for p in sorted((build.parent / "data").rglob("*.png"))[:n]]


def test_cuda_and_tensorrt_providers_match_the_cpu(gpu_build):
    direct = DirectOnnx(gpu_build)  # the CPU reference
    batch = np.stack([preprocess_bytes(png, direct.spec) for png in _images(gpu_build)])
    expected = direct.embed(batch)
    wanted = [("cuda", "CUDAExecutionProvider", 1e-3)]
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        wanted.append(("trt", "TensorrtExecutionProvider", 1e-2))
    for providers, name, tolerance in wanted:
        session = create_session(gpu_build / BACKBONE_ONNX, providers=providers)
        assert active_provider(session) == name
        got = session.run(["embedding"], {"image": batch})[0]
        np.testing.assert_allclose(got, expected, atol=tolerance * np.abs(expected).max(), rtol=0)


def test_fp16_graphs_pass_their_parity_on_the_gpu(gpu_build, tmp_path):
    """`tl-models export --fp16 --fused` on a GPU machine checks the fp16 graphs' parity (it raises past the fp16
    tolerance) and commits backbone.fp16.onnx."""
    build = Path(shutil.copytree(gpu_build, tmp_path / "build"))
    reexport(build, fp16=True, fused=True)
    manifest = BuildDir(build).verify()
    assert BACKBONE_FP16 in manifest.top_files
    session = create_session(build / BACKBONE_FP16, providers="cuda")
    assert active_provider(session) == "CUDAExecutionProvider"


def test_tritonserver_loads_kind_gpu_configs_and_answers_like_the_cpu(gpu_build, tmp_path):
    repo = write_repository(gpu_build, tmp_path / "repo", RepositoryOptions(flavour="python", gpu=True))
    head = read_config(repo.path / head_model(repo.name, "a"))
    assert all(group.kind == group.KIND_GPU for group in head.instance_group)
    server = start_triton(repo.path, workdir=tmp_path / "tritonserver", timeout=600)
    try:
        client = httpclient.InferenceServerClient(server.http_url)
        images = _images(gpu_build)
        logits = client.infer(f"{repo.name}_a", [bytes_input(httpclient, images)]).as_numpy("logits")
        expected = DirectOnnx(gpu_build)(images, "a", 1)
        np.testing.assert_allclose(logits, expected, atol=1e-3 * np.abs(expected).max(), rtol=0)
        client.close()
    finally:
        server.stop()


def test_bentoml_serves_on_cuda_like_the_cpu(gpu_build, tmp_path):
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "TL_MODELS_PROVIDERS": "cuda",
        "TL_MODELS_WORKERS": "1",
        "TL_MODELS_STATE_DIR": str(tmp_path / "state"),
    }
    Deployment(tmp_path, gpu_build, env).cli("bento", "package", str(gpu_build))
    server = bento_server.start(env, log_path=tmp_path / "serve.log", timeout=600)
    try:
        image = _images(gpu_build, 1)[0]
        response = httpx.post(
            f"{server.url}/classify",
            files={"image": ("x.png", image, "image/png")},
            headers={"X-TL-Head": "a"},
            data={"top_k": "10"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert "fell back" not in (tmp_path / "serve.log").read_text()  # core.runtime warns when CUDA was refused
        answer, direct = response.json(), DirectOnnx(gpu_build)
        expected = softmax(direct([image], "a", answer["version"]))[0]
        for prediction in answer["predictions"]:
            assert abs(prediction["score"] - expected[direct.labels.index(prediction["label"])]) < 1e-3
    finally:
        server.stop()
