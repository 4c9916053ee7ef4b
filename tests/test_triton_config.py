"""Generated Triton configs parse with Triton's protobuf schema and say what each flavour promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from tl_models.cli import main as cli_main
from tl_models.core.routing import RoutingError, parse_weights
from tl_models.core.runtime import CPU_RUN_ROWS
from tl_models.training.backbones import install_offline_weights
from tl_models.triton.config import RepositoryOptions, TritonConfigError, model_names, validate_config
from tl_models.triton.repository import write_repository

from helpers import serving_build

ONNX_STEPS = ("build_backbone", "build_head_a", "build_head_b")
ENSEMBLES = ("build_a", "build_a_tensor", "build_b", "build_b_tensor")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-config")
    install_offline_weights()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TL_MODELS_CACHE", str(root / "cache"))
        return serving_build(root)


def configs(repo) -> dict[str, mc.ModelConfig]:
    """Every config.pbtxt of the repository, parsed with Triton's own schema."""
    return {
        path.parent.name: text_format.Parse(path.read_text(), mc.ModelConfig())
        for path in sorted(repo.glob("*/config.pbtxt"))
    }


@pytest.mark.parametrize("flavour", ["onnxruntime", "python"])
@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_every_config_parses_and_serves_as_promised(build_dir, tmp_path, flavour, gpu):
    repo = tmp_path / "repo"
    written = write_repository(build_dir, repo, RepositoryOptions(flavour=flavour, gpu=gpu))
    found = configs(repo)
    assert set(found) == set(written.models) == {"preprocess", "build", *ONNX_STEPS, *ENSEMBLES}
    labels = json.loads((build_dir / "manifest.json").read_text())["labels"]
    for name, config in found.items():
        assert config.name == name and config.max_batch_size > 0
        if name in ENSEMBLES:
            assert config.platform == "ensemble"
            steps = config.ensemble_scheduling.step
            assert [s.model_name for s in steps][-2:] == ["build_backbone", f"build_head_{name.split('_')[1]}"]
            assert all(s.model_name in found for s in steps)
            assert steps[-1].model_version == 1
        else:
            assert config.HasField("dynamic_batching") and len(config.instance_group) == 1
            assert config.dynamic_batching.max_queue_delay_microseconds == 0  # no hop of the chain waits
            assert name == "build" or len(config.model_warmup) == 1, f"{name} has no warmup"
        for output in config.output:
            if output.label_filename:
                assert (repo / name / output.label_filename).read_text().split("\n")[:-1] == labels
    for name in ONNX_STEPS:
        config = found[name]
        kind = config.instance_group[0].kind
        assert kind == (mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)
        if flavour == "onnxruntime":
            assert config.platform == "onnxruntime_onnx" and not (repo / name / "1" / "model.py").exists()
        else:
            assert config.backend == "python" and (repo / name / "1" / "model.py").is_file()
            # the backbone on the CPU runs a dynamic batch in runs of CPU_RUN_ROWS (cheaper per image); the rest whole
            rows = CPU_RUN_ROWS if name == "build_backbone" and not gpu else 0
            assert config.parameters["rows"].string_value == str(rows)
        assert (repo / name / "1" / "model.onnx").is_file()
    router = found["build"].parameters  # python flavour on the CPU: the router runs the graphs itself
    assert ("in_process" in router) == (flavour == "python" and not gpu)
    if "in_process" in router:
        sha256 = (repo / "build_backbone" / "1" / "model.onnx.sha256").read_text()
        assert router["in_process"].string_value == "1" and router["backbone_sha256"].string_value == sha256
        assert router["backbone_rows"].string_value == str(CPU_RUN_ROWS)
    for name in ("preprocess", "build"):
        assert found[name].backend == "python" and found[name].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert found["build_head_a"].output[0].label_filename == "labels.txt"
    assert found["build_a"].output[0].label_filename == "labels.txt"
    assert not list(repo.glob(".*")) and not list(repo.glob("*/.*"))


def test_tensorrt_accelerator_needs_the_onnxruntime_flavour_on_gpu(build_dir, tmp_path):
    write_repository(build_dir, tmp_path / "trt", RepositoryOptions(flavour="onnxruntime", gpu=True, tensorrt=True))
    accelerators = configs(tmp_path / "trt")["build_backbone"].optimization.execution_accelerators
    assert [a.name for a in accelerators.gpu_execution_accelerator] == ["tensorrt"]
    assert accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP16"
    with pytest.raises(TritonConfigError, match="needs --flavour onnxruntime --gpu"):
        write_repository(build_dir, tmp_path / "nope", RepositoryOptions(flavour="onnxruntime", tensorrt=True))
    assert not (tmp_path / "nope").exists()
    with pytest.raises(TritonConfigError, match="max queue delay"):
        write_repository(build_dir, tmp_path / "nope", RepositoryOptions(max_queue_delay_us=-1))
    assert not (tmp_path / "nope").exists()


def test_cli_package_triton_gpu(build_dir, tmp_path, capsys):
    repo = tmp_path / "cli-repo"
    code = cli_main(
        [
            "triton",
            "package",
            str(build_dir),
            "--repo",
            str(repo),
            "--flavour",
            "onnxruntime",
            "--gpu",
            "--split",
            "a=90,b=10",
            "--max-queue-delay-us",
            "100",
        ]
    )
    assert code == 0 and "build_head_a" in capsys.readouterr().out
    backbone = configs(repo)["build_backbone"]
    assert backbone.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert backbone.dynamic_batching.max_queue_delay_microseconds == 100
    route = json.loads((repo / "build" / "route.json").read_text())
    assert route["weights"] == {"a": 90, "b": 10} and route["versions"] == {"a": 1, "b": 1}


def test_repackaging_rewrites_nothing_unchanged_and_replaces_changed_versions_whole(build_dir, tmp_path):
    repo = tmp_path / "repo"
    write_repository(build_dir, repo)
    files = sorted(p for p in repo.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    write_repository(build_dir, repo)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps, "an identical re-package must not touch files"
    write_repository(build_dir, repo, RepositoryOptions(flavour="onnxruntime"))
    assert not (repo / "build_head_a" / "1" / "model.py").exists(), "the version dir was not replaced whole"
    assert (repo / "build_head_a" / "1" / "model.onnx").is_file()
    assert 'platform: "onnxruntime_onnx"' in (repo / "build_head_a" / "config.pbtxt").read_text()
    assert not [p for p in repo.rglob(".*") if p.is_dir()], "staging directories were left behind"


def test_validation_rejects_what_triton_would_reject(tmp_path):
    with pytest.raises(TritonConfigError, match="does not parse"):
        validate_config('name: "m"\nmax_batch_sise: 4\n')
    base = (
        'name: "m" backend: "python" input { name: "x" data_type: TYPE_FP32 dims: 4 } '
        'output { name: "y" data_type: TYPE_FP32 dims: 2 } '
    )
    validate_config(base + "max_batch_size: 8 dynamic_batching {}")
    with pytest.raises(TritonConfigError, match="dynamic_batching needs max_batch_size"):
        validate_config(base + "dynamic_batching {}")
    with pytest.raises(TritonConfigError, match="label file 'labels.txt' is missing"):
        (tmp_path / "m" / "1").mkdir(parents=True)
        validate_config(base.replace("dims: 2", 'dims: 2 label_filename: "labels.txt"'), tmp_path / "m")
    with pytest.raises(TritonConfigError, match="missing file warmup/x"):
        validate_config(
            base + 'max_batch_size: 1 model_warmup { name: "w" batch_size: 1 inputs { key: "x" value '
            '{ data_type: TYPE_FP32 dims: 4 input_data_file: "x" } } }',
            tmp_path / "m",
        )
    ensemble = (
        'name: "e" platform: "ensemble" max_batch_size: 8 input { name: "x" data_type: TYPE_FP32 dims: 4 } '
        'output { name: "y" data_type: TYPE_FP32 dims: 2 } ensemble_scheduling { step { model_name: "m" '
        'model_version: -1 input_map { key: "x" value: "%s" } output_map { key: "y" value: "y" } } }'
    )
    validate_config(ensemble % "x")
    with pytest.raises(TritonConfigError, match="reads 'z' before any step"):
        validate_config(ensemble % "z")
    with pytest.raises(TritonConfigError, match="instance_group is not allowed on an ensemble"):
        validate_config(ensemble % "x" + " instance_group { kind: KIND_CPU }")
    with pytest.raises(TritonConfigError, match="oneof"):  # the schema itself: one scheduling choice
        validate_config(ensemble % "x" + " dynamic_batching {}")


def test_names_and_weights():
    with pytest.raises(TritonConfigError, match="clashing Triton model names"):
        model_names("m", ["backbone", "x"])
    assert parse_weights("a=90, b=10") == {"a": 90.0, "b": 10.0}
    with pytest.raises(RoutingError, match="bad weight"):
        parse_weights("a:90")


PACKAGE_AND_SWAP = """
import json, sys
from tl_models.cli import main
codes = [main(["triton", "package", sys.argv[1], "--repo", sys.argv[2]])]
# no server listens there: the swap is refused before it changes anything, with exit 1 (a crash fails the test)
codes.append(main(["triton", "swap", "--url", "http://127.0.0.1:9", "--repo", sys.argv[2], "--build", "build",
                   "--head", "a", "--version", "1"]))
print(json.dumps([codes, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))]))
"""


def test_triton_package_and_swap_load_no_torch(build_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", PACKAGE_AND_SWAP, str(build_dir), str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    codes, torch_modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert codes == [0, 1], (codes, result.stderr[-2000:])
    assert "error: refused before any change: 127.0.0.1:9: cannot reach Triton" in result.stderr
    assert (tmp_path / "repo" / "build_head_a" / "1" / "head.json").is_file()
    assert torch_modules == []
