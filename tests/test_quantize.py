"""`tl-models quantize`: an int8 backbone is written only past the accuracy gate, and a refusal changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tl_models.training.quantize import Calibration, Gate, QuantizeRefused, quantize
from tl_models.cli import main
from tl_models.core.manifest import BuildDir
from tl_models.core.runtime import create_session

pytestmark = pytest.mark.slow


def _snapshot(build: Path) -> dict[str, bytes]:
    return {str(p.relative_to(build)): p.read_bytes() for p in sorted(build.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_a_calibration_that_breaks_accuracy_is_refused_and_the_build_is_unchanged(deployment, tmp_path):
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    before = _snapshot(build)
    blank = np.full((1, 3, 224, 224), 128, np.uint8)  # one grey image: ranges that fit no real image
    with pytest.raises(QuantizeRefused, match="the build is unchanged") as refused:
        quantize(build, Calibration(images=1), Gate(), calibration_images=blank)
    assert "minmax, per-channel on, 1 images: refused" in str(refused.value)
    assert str(refused.value).count(": refused") == 12  # the asked-for setting, then the 11 others (s8s8 first)
    assert _snapshot(build) == before
    BuildDir(build).verify()


def test_an_int8_backbone_past_the_gate_is_recorded_and_runs(deployment, tmp_path, capsys):
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    code = main(["quantize", str(build), "--calibration-images", "8", "--no-search", "--min-agreement", "0",
                 "--max-drop", "1"])
    assert code == 0, capsys.readouterr().err
    manifest = BuildDir(build).verify()  # the int8 file is listed with its sha256
    assert "backbone.int8.onnx" in manifest.files and "backbone.int8.onnx" in manifest.top_files
    attempt = manifest.int8["attempts"][-1]
    assert attempt["passed"] and attempt["calibration"] == {"method": "minmax", "per_channel": True, "images": 8,
                                                     "types": "s8s8"}
    assert set(attempt["heads"]) == {"a:2", "b:1"}  # the latest version of each head
    assert all(0 <= m["agreement"] <= 1 and m["val_images"] > 0 for m in attempt["heads"].values())
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    int8 = create_session(build / "backbone.int8.onnx", "cpu").run(["embedding"], {"image": images})[0]
    assert int8.shape == (3, 1280) and np.isfinite(int8).all()

    # parity judges the int8 graph by its gate's measures, re-measured on the file as it is now
    capsys.readouterr()
    assert main(["parity", str(build), "--batch-sizes", "1"]) == 0
    out = capsys.readouterr().out
    assert "backbone.int8.onnx against fp32 ONNX Runtime" in out and "a:2" in out and "parity passed" in out, out
    report = json.loads((build / "parity.json").read_text())
    assert report["int8"]["heads"] == attempt["heads"] and report["int8"]["passed"]
    manifest_path = build / "manifest.json"  # a stricter gate than the one it passed: parity fails (exit 3)
    record = json.loads(manifest_path.read_text())
    record["int8"]["gate"]["min_agreement"] = 1.01
    manifest_path.write_text(json.dumps(record))
    assert main(["parity", str(build), "--batch-sizes", "1"]) == 3
    assert "no longer passes the gate" in capsys.readouterr().err


def test_the_cli_exit_code_says_the_gate_refused(deployment, tmp_path, capsys):
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    before = _snapshot(build)
    code = main(["quantize", str(build), "--calibration-images", "1", "--no-search"])
    err = capsys.readouterr().err
    assert code == 4 and "passed the gate" in err and "agreement" in err, err
    assert _snapshot(build) == before
