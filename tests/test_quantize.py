"""`tl-models quantize`: an int8 backbone is written only past the accuracy gate and only when it is faster than fp32
on this CPU; the fastest passing setting is chosen; a refusal changes nothing; `--verify` re-measures on this machine.

The speed gate is forced with ``--min-speedup`` (0: anything passes; 1000: nothing does), never with the CPU the
tests run on, so every test here holds on any CPU."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tl_models.cli import main
from tl_models.core.cpu import isa_class, this_machine
from tl_models.core.files import LockHeld, file_lock
from tl_models.core.manifest import BuildDir
from tl_models.core.runtime import create_session
from tl_models.training.quantize import Calibration, Gate, QuantizeRefused, candidates, quantize

pytestmark = pytest.mark.slow

OPEN = ["--min-agreement", "0", "--max-drop", "1"]  # the accuracy gate open: these tests are about the rest
ANY_SPEED = ["--min-speedup", "0"]  # the speed gate open, whatever the CPU


def _snapshot(build: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(build)): p.read_bytes() for p in sorted(build.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def test_a_calibration_that_breaks_accuracy_is_refused_and_the_build_is_unchanged(deployment, tmp_path):
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    before = _snapshot(build)
    blank = np.full((1, 3, 224, 224), 128, np.uint8)  # one grey image: ranges that fit no real image
    with pytest.raises(QuantizeRefused, match="passed the accuracy gate; the build is unchanged") as refused:
        quantize(build, Calibration(images=1), Gate(), calibration_images=blank)
    table = str(refused.value)
    assert "u8s8 minmax, per-channel on, 1 images" in table.splitlines()[3]  # the asked-for setting first
    assert table.count(" refused ") == len(candidates(Calibration(images=1), "all"))  # then every other one
    assert _snapshot(build) == before
    BuildDir(build).verify()


def test_the_fastest_setting_past_the_gate_is_chosen_recorded_and_runs(deployment, tmp_path, capsys):
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    code = main(
        [
            "quantize",
            str(build),
            "--calibration-images",
            "8",
            "--types",
            "s8s8",
            "--search",
            "types",
            *OPEN,
            "--min-speedup",
            "0",
        ]
    )  # s8s8 first: on a VNNI CPU the slowest, so the first is not the fastest
    out, err = capsys.readouterr()
    assert code == 0, err
    manifest = BuildDir(build).verify()  # the int8 file is listed with its sha256
    assert "backbone.int8.onnx" in manifest.files and "backbone.int8.onnx" in manifest.top_files
    record = manifest.int8
    attempts = record["attempts"]
    assert [a["calibration"]["types"] for a in attempts][:3] == ["s8s8", "u8s8", "u8u8"]
    assert all(a["passed"] and a["speed"]["speedup"] > 0 and a["speed"]["batch"] == 32 for a in attempts)
    speedups = [a["speed"]["speedup"] for a in attempts]
    chosen = attempts[record["chosen"]]
    assert chosen["speed"]["speedup"] == max(speedups)  # the fastest, not the first, that passed
    assert record["calibration"] == chosen["calibration"] and record["heads"] == chosen["heads"]
    assert set(chosen["heads"]) == {"a:2", "b:1"}  # the latest version of each head
    assert all(0 <= m["agreement"] <= 1 and m["val_images"] > 0 for m in chosen["heads"].values())
    machine = record["machine"]
    assert machine["isa"] == isa_class() and machine["onnxruntime"] == this_machine()["onnxruntime"]
    assert machine["speedup"] == chosen["speed"]["speedup"] and machine["images_per_s"] > 0
    assert record["gate"]["min_speedup"] == 0
    # the table: one row per setting with agreement, drop, img/s and the ratio to fp32; the chosen one marked
    rows = [line for line in out.splitlines() if "images " in line and "per-channel" in line]
    assert len(rows) == len(attempts) and sum("<- chosen" in r for r in rows) == 1
    assert f"{chosen['speed']['speedup']:.2f}x" in next(r for r in rows if "<- chosen" in r)
    assert f"{machine['isa']}, ONNX Runtime {machine['onnxruntime']}" in out
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    int8 = create_session(build / "backbone.int8.onnx", "cpu").run(["embedding"], {"image": images})[0]
    assert int8.shape == (3, 1280) and np.isfinite(int8).all()

    # parity judges the int8 graph by its gate's measures, re-measured on the file as it is now
    assert main(["parity", str(build), "--batch-sizes", "1"]) == 0
    out = capsys.readouterr().out
    assert "backbone.int8.onnx against fp32 ONNX Runtime" in out and "a:2" in out and "parity passed" in out, out
    report = json.loads((build / "parity.json").read_text())
    assert report["int8"]["heads"] == chosen["heads"] and report["int8"]["passed"]
    manifest_path = build / "manifest.json"  # a stricter gate than the one it passed: parity fails (exit 3)
    record = json.loads(manifest_path.read_text())
    record["int8"]["gate"]["min_agreement"] = 1.01
    manifest_path.write_text(json.dumps(record))
    assert main(["parity", str(build), "--batch-sizes", "1"]) == 3
    assert "no longer passes the gate" in capsys.readouterr().err


def test_int8_that_passes_accuracy_but_is_not_fast_enough_is_refused(deployment, tmp_path, capsys):
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    before = _snapshot(build)
    code = main(
        [
            "quantize",
            str(build),
            "--calibration-images",
            "8",
            "--no-search",
            "--reduce-range",
            *OPEN,
            "--min-speedup",
            "1000",
        ]
    )
    err = capsys.readouterr().err
    assert code == 4, err
    first = err.splitlines()[0]
    assert "passes accuracy but is" in first and "x fp32 here" in first and ">= 1000x" in first, err
    assert "(u8s8 reduce-range minmax, per-channel on, 8 images)" in first  # 7-bit weights, forced on any CPU
    assert isa_class() in first and "the build is unchanged" in first
    assert _snapshot(build) == before


def test_the_search_covers_every_setting_and_reduce_range_only_without_vnni():
    asked = Calibration(images=8, types="s8s8")
    for isa, reduced in (("avx512_vnni", 0), ("amx", 0), ("avx2", 6), ("avx512", 6)):
        every = candidates(asked, "all", isa)
        assert every[0] == asked and len(every) == len(set(every)) == 18 + reduced, isa
        assert sum(c.reduce_range for c in every) == reduced and all(c.types == "u8s8" for c in every if c.reduce_range)
    assert [(c.types, c.reduce_range) for c in candidates(asked, "types", "avx2")] == [
        ("s8s8", False),
        ("u8s8", False),
        ("u8s8", True),
        ("u8u8", False),
    ]
    assert candidates(asked, "none", "avx2") == [asked]


def test_the_cli_exit_code_says_the_gate_refused(deployment, tmp_path, capsys):
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    before = _snapshot(build)
    code = main(["quantize", str(build), "--calibration-images", "1", "--no-search"])
    err = capsys.readouterr().err
    assert code == 4 and "passed the accuracy gate" in err and "agreement" in err, err
    assert _snapshot(build) == before


def test_verify_re_measures_here_and_updates_the_record_or_refuses(deployment, tmp_path, capsys):
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    assert main(["quantize", str(build), "--calibration-images", "8", "--no-search", *OPEN, "--min-speedup", "0"]) == 0
    manifest_path = build / "manifest.json"
    record = json.loads(manifest_path.read_text())
    record["int8"]["machine"].update(isa="another-cpu", onnxruntime="0.1.0", speedup=99.0)  # measured elsewhere
    manifest_path.write_text(json.dumps(record))
    int8_bytes = (build / "backbone.int8.onnx").read_bytes()
    capsys.readouterr()

    assert main(["quantize", str(build), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "the record is updated" in out
    updated = BuildDir(build).verify().int8
    assert (
        updated["machine"]["isa"] == isa_class() and updated["machine"]["onnxruntime"] == this_machine()["onnxruntime"]
    )
    assert (
        updated["machine"]["speedup"] != 99.0
        and updated["machine"]["speedup"] == updated["attempts"][0]["speed"]["speedup"]
    )
    assert updated["calibration"] == record["int8"]["calibration"] and "verified" in updated
    assert updated["gated"] == record["int8"]["gated"]
    assert (build / "backbone.int8.onnx").read_bytes() == int8_bytes  # the graph is the stored setting's, kept

    # the recorded gate asks more speed than this machine gives: refused (exit 4), the build as it was
    record = json.loads(manifest_path.read_text())
    record["int8"]["gate"]["min_speedup"] = 1000
    manifest_path.write_text(json.dumps(record))
    before = _snapshot(build)
    assert main(["quantize", str(build), "--verify"]) == 4
    assert "passes accuracy but is" in capsys.readouterr().err
    assert _snapshot(build) == before

    assert main(["quantize", str(deployment.build_dir), "--verify"]) == 1  # nothing to verify
    assert "has no int8 backbone" in capsys.readouterr().err


def test_quantize_during_a_build_waits_for_it_and_gates_the_new_head(deployment, tmp_path, capsys, caplog):
    """`quantize` started while a build adds a head version to the same directory waits for the build's lock (and
    says so), then gates the new head too: the manifest has both, nothing of either is lost."""
    build = shutil.copytree(deployment.build_dir, tmp_path / "build")
    builder = subprocess.Popen(
        [sys.executable, "-m", "tl_models.cli", "build", "--data", str(deployment.root / "data"), "--out", str(build)]
        + ["--head", "c", "--backbone", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--epochs", "15"]
        + ["--cache-dir", str(deployment.root / "cache")],
        env=deployment.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while builder.poll() is None and time.monotonic() < deadline:  # until the build holds its lock
            try:
                with file_lock(build / ".lock", wait=False):
                    pass
            except LockHeld as held:
                assert f"pid {builder.pid} " in held.message, held.message
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"the build never held its lock: {builder.communicate()[0][-2000:]}")
        with caplog.at_level(logging.WARNING, logger="tl_models.core.manifest"):
            code = main(["quantize", str(build), "--calibration-images", "8", "--no-search", *OPEN, *ANY_SPEED])
        output = builder.communicate(timeout=600)[0]
    finally:
        builder.kill()
    assert builder.returncode == 0, output[-2000:]
    assert code == 0, capsys.readouterr().err
    assert f"waiting for {build}: its lock is held by pid {builder.pid}" in caplog.text
    manifest = BuildDir(build).verify()
    assert manifest.latest_versions() == {"a": 2, "b": 1, "c": 1}
    assert manifest.int8 is not None and set(manifest.int8["heads"]) == {"a:2", "b:1", "c:1"}
