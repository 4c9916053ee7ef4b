"""int8 serving: both servers serve the backbone `tl-models quantize` wrote past its gate, with the same heads, and
answer the gate's own validation images exactly as the gate measured them; what the gate did not measure is refused.

The gate is loosened here (agreement >= 0, drop <= 1, any speed): mobilenet_v2 on the demo digits loses too much in
int8 on an AVX2-only CPU to pass the real one (README, "int8"); what these tests check is that serving keeps the
gate's word, and serves int8 only on the CPU class and ONNX Runtime minor version the gate measured it on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tl_models.bento import launcher as bento_server
from tl_models.bento.engine import ServingConfig, ServingEngine
from tl_models.bento.launcher import BentoServerError
from tl_models.cli import main as cli_main
from tl_models.core.cpu import isa_class, this_machine
from tl_models.core.errors import BuildError, Refused
from tl_models.core.heads import backbone_from_build, sources_from_build
from tl_models.core.manifest import BuildDir
from tl_models.core.routing import read_route
from tl_models.training.data import load_image_folder, stratified_split
from tl_models.training.quantize import Calibration, Gate, quantize
from tl_models.triton.config import RepositoryOptions
from tl_models.triton.launcher import start as start_triton
from tl_models.triton.repository import write_repository
from tl_models.triton.swap import TritonSwapError, swap

from helpers import ADMIN, TOKEN, DirectOnnx, bytes_input, damage_bytes

pytestmark = pytest.mark.slow

LOOSE = Gate(min_agreement=0.0, max_accuracy_drop=1.0, min_speedup=0.0)


@pytest.fixture(scope="module")
def int8_build(deployment, tmp_path_factory) -> Path:
    """A copy of the serving build (a:1, a:2, b:1) with an int8 backbone; the gate measured a:2 and b:1."""
    build = shutil.copytree(deployment.build_dir, tmp_path_factory.mktemp("int8") / "build")
    quantize(build, Calibration(images=16), LOOSE, search="none")
    return build


@pytest.fixture(scope="module")
def gate_images(int8_build) -> dict[str, object]:
    """Per head the gate measured: its validation images (split as its build split them) and the agreement the
    gate recorded; the int8 and fp32 references."""
    manifest = BuildDir(int8_build).manifest()
    assert manifest.int8 is not None
    measured, val_images = manifest.int8["heads"], {}
    for key in measured:
        entry = manifest.head(key.split(":")[0], int(key.split(":")[1]))
        data = load_image_folder(entry.data["root"])
        _, val = stratified_split(data.targets, entry.data["val_fraction"], entry.train["seed"])
        val_images[key] = [Path(data.paths[i]).read_bytes() for i in val]
    return {
        "images": val_images,
        "measured": measured,
        "int8": DirectOnnx(int8_build, "backbone.int8.onnx"),
        "fp32": DirectOnnx(int8_build),
    }


def _agreement(top1: list[int], fp32: DirectOnnx, images: list[bytes], head: str, version: int) -> float:
    return float(np.mean(np.array(top1) == fp32(images, head, version).argmax(1)))


def test_int8_sources_carry_the_gate_and_refuse_what_it_did_not_measure(int8_build, deployment, tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    backbone, heads = sources_from_build(int8_build, "int8")
    assert backbone.precision == "int8" and backbone.sha256 == BuildDir(int8_build).manifest().backbone_sha256()
    assert sorted(h.key for h in heads) == ["a:2", "b:1"]  # a:1 is older than the gate: not served on int8
    with pytest.raises(BuildError, match="no int8 backbone that passed the accuracy gate"):
        sources_from_build(deployment.build_dir, "int8")

    stale = shutil.copytree(int8_build, tmp_path / "stale")  # a head version built after the gate ran
    manifest = json.loads((stale / "manifest.json").read_text())
    del manifest["int8"]["gated"]["b:1"]
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match=r"heads \['b:1'\] were built after the int8 gate"):
        backbone_from_build(BuildDir(stale), BuildDir(stale).manifest(), "int8")
    for command in (
        ["bento", "package", str(stale), "--precision", "int8"],
        ["triton", "package", str(stale), "--repo", str(tmp_path / "repo"), "--precision", "int8"],
    ):
        assert cli_main(command) == 1
    assert not (tmp_path / "repo" / "build_backbone").exists()


def test_a_corrupt_int8_backbone_is_refused_at_load(int8_build, tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    corrupt = shutil.copytree(int8_build, tmp_path / "corrupt")
    path = corrupt / "backbone.int8.onnx"
    damage_bytes(path)
    backbone, heads = sources_from_build(corrupt, "int8")
    with pytest.raises(Refused, match="int8 backbone: .* fails its sha256 check"):
        ServingEngine(backbone, heads, ServingConfig(state_dir=tmp_path / "state"))
    assert cli_main(["bento", "package", str(corrupt), "--precision", "int8"]) == 1  # the build fails verification


def _recorded_machine(build: Path, machine: dict | None) -> None:
    """Rewrite fields of the int8 record's machine as if its gate had measured it elsewhere (None: drop the record
    of the machine, as in a build quantized before it was kept)."""
    path = build / "manifest.json"
    manifest = json.loads(path.read_text())
    if machine is None:
        del manifest["int8"]["machine"]
    else:
        manifest["int8"]["machine"].update(machine)
    path.write_text(json.dumps(manifest))


def test_int8_measured_on_another_cpu_is_refused_by_both_servers_until_verified_here(
    int8_build, deployment, tmp_path, capsys
):
    other = shutil.copytree(int8_build, tmp_path / "other").resolve()
    recorded = "avx2" if isa_class() != "avx2" else "amx"  # a class this machine is not
    _recorded_machine(other, {"isa": recorded})
    config = ServingConfig(state_dir=tmp_path / "state")
    verify = f"`tl-models quantize {other} --verify`"

    with pytest.raises(Refused) as refused:  # BentoML from the build directory
        ServingEngine(*sources_from_build(other, "int8"), config)
    line = refused.value.message
    assert "\n" not in line and f"measured on CPU class {recorded} " in line, line
    assert f"this CPU is {isa_class()} " in line
    assert this_machine()["onnxruntime"] in line and verify in line
    ServingEngine(*sources_from_build(other, "fp32"), config)  # fp32 serves anywhere

    assert cli_main(["triton", "package", str(other), "--repo", str(tmp_path / "repo"), "--precision", "int8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "int8 refused" in err and recorded in err and verify in err, err
    assert not (tmp_path / "repo" / "build_backbone").exists()

    env = {
        **deployment.env,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "TL_MODELS_PRECISION": "int8",
        "TL_MODELS_STATE_DIR": str(tmp_path / "state"),
    }
    subprocess.run(
        [sys.executable, "-m", "tl_models.cli", "bento", "package", str(other), "--precision", "int8"],
        env=env,
        check=True,
        capture_output=True,
    )  # the store keeps the record (its own process: the
    with pytest.raises(BentoServerError, match=r"int8 refused: .*--verify`, then package it again"):  # store binds
        bento_server.start(env, log_path=tmp_path / "refused.log", timeout=45)  # BENTOML_HOME once per process;
        # `bentoml serve` restarts a worker that fails to start, so it never exits: the log holds the refusal

    _recorded_machine(other, {"isa": isa_class(), "onnxruntime": "0.1.0"})  # same class, another ONNX Runtime minor
    with pytest.raises(Refused, match="ONNX Runtime 0.1.0"):
        ServingEngine(*sources_from_build(other, "int8"), config)
    _recorded_machine(other, None)  # a record from before the machine was recorded
    with pytest.raises(Refused, match=f"no record of the CPU .*{verify}"):
        ServingEngine(*sources_from_build(other, "int8"), config)

    assert cli_main(["quantize", str(other), "--verify"]) == 0  # measured here: both serve it
    engine = ServingEngine(*sources_from_build(other, "int8"), config)
    assert engine.backbone_source.int8_machine["isa"] == isa_class()
    repo = write_repository(other, tmp_path / "repo", RepositoryOptions(precision="int8"))
    facts = json.loads((repo.path / f"{repo.name}_backbone" / "1" / "backbone.json").read_text())
    assert facts["int8_machine"]["isa"] == isa_class()  # what the python backend checks when Triton loads it
    subprocess.run(
        [sys.executable, "-m", "tl_models.cli", "bento", "package", str(other), "--precision", "int8"],
        env=env,
        check=True,
        capture_output=True,
    )  # stored again, with the new record: it serves
    bento_server.start(env, log_path=tmp_path / "serve.log", timeout=300).stop()


@pytest.fixture(scope="module")
def int8_bento(int8_build, deployment, tmp_path_factory):
    """`bento package` fp32 and int8 into one store; `bentoml serve` with TL_MODELS_PRECISION=int8."""
    root = tmp_path_factory.mktemp("int8-bento")
    env = {**deployment.env, "BENTOML_HOME": str(root / "bentoml")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENTOML_HOME", env["BENTOML_HOME"])
        assert cli_main(["bento", "package", str(int8_build)]) == 0
        assert cli_main(["bento", "package", str(int8_build), "--precision", "int8"]) == 0
    env.update(TL_MODELS_PRECISION="int8", TL_MODELS_ADMIN_TOKEN=TOKEN, TL_MODELS_STATE_DIR=str(root / "state"))
    process = bento_server.start(env, log_path=root / "serve.log")
    client = httpx.Client(base_url=process.url, timeout=60)
    try:
        yield client
    finally:
        client.close()
        process.stop()


def test_bentoml_serves_the_int8_backbone_as_the_gate_measured_it(int8_bento, int8_build, gate_images):
    status = int8_bento.get("/heads").json()
    manifest = BuildDir(int8_build).manifest()
    assert status["backbone"]["precision"] == "int8"
    assert status["backbone"]["graph_sha256"] == manifest.files["backbone.int8.onnx"]
    assert {(h["name"], h["version"]) for h in status["heads"]} == {("a", 2), ("b", 1)}
    for head, version in (("a", 2), ("b", 1)):
        images = gate_images["images"][f"{head}:{version}"]
        answers = [
            int8_bento.post(
                "/classify", files={"image": ("x.png", image, "image/png")}, headers={"X-TL-Head": head}
            ).json()
            for image in images
        ]
        assert {(a["head"], a["version"]) for a in answers} == {(head, version)}
        expected = gate_images["int8"](images, head, version)
        labels = manifest.labels
        assert [a["predictions"][0]["label"] for a in answers] == [labels[i] for i in expected.argmax(1)]
        top1 = [labels.index(a["predictions"][0]["label"]) for a in answers]
        assert _agreement(top1, gate_images["fp32"], images, head, version) == pytest.approx(
            gate_images["measured"][f"{head}:{version}"]["agreement"]
        )

    response = int8_bento.post("/admin/load", json={"head": "a", "version": 1}, headers=ADMIN)
    assert response.status_code == 422 and "not measured by the accuracy gate" in response.text, response.text
    assert int8_bento.get("/heads").json()["heads"][0]["version"] == 2  # the refusal changed nothing


@pytest.fixture(scope="module")
def int8_triton(int8_build, tmp_path_factory):
    """The int8 build's Triton repository (python flavour) and a tritonserver on it."""
    root = tmp_path_factory.mktemp("int8-triton")
    repo = write_repository(int8_build, root / "repo", RepositoryOptions(precision="int8"))
    server = start_triton(repo.path, workdir=root / "tritonserver", timeout=600)
    try:
        yield {"server": server, "repo": repo}
    finally:
        server.stop()


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_triton_serves_the_int8_backbone_as_the_gate_measured_it(int8_triton, gate_images, module):
    server, repo = int8_triton["server"], int8_triton["repo"]
    client = module.InferenceServerClient(server.http_url if module is httpclient else server.grpc_url)
    for model in (f"{repo.name}_backbone", repo.name):  # the backbone and the router say which precision is live
        config = client.get_model_config(model, **({"as_json": True} if module is grpcclient else {}))
        config = config["config"] if module is grpcclient else config
        assert config["parameters"]["precision"]["string_value"] == "int8", model
    for head, version in sorted(repo.live.items()):
        images = gate_images["images"][f"{head}:{version}"]
        logits = np.concatenate(
            [
                client.infer(
                    repo.name, [bytes_input(module, [image]), bytes_input(module, [head.encode()], "route_head")]
                ).as_numpy("logits")
                for image in images
            ]
        )
        np.testing.assert_allclose(logits, gate_images["int8"](images, head, version), atol=1e-4, rtol=0)
        assert _agreement(list(logits.argmax(1)), gate_images["fp32"], images, head, version) == pytest.approx(
            gate_images["measured"][f"{head}:{version}"]["agreement"]
        )


def test_a_triton_swap_to_a_head_the_int8_gate_did_not_measure_is_refused(int8_triton):
    repo = int8_triton["repo"]
    with pytest.raises(TritonSwapError, match="not measured by the accuracy gate"):
        swap(int8_triton["server"].http_url, repo.path, repo.name, "a", 1)
    assert read_route(repo.path / repo.name / "route.json").versions == {"a": 2, "b": 1}
