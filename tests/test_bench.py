"""``bench_train`` on a tiny setting: it runs both trainings in full and reports positive, consistent figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tl_models.bench.offline import bench_train, subset
from tl_models.training.data import DataError, load_image_folder

FIELDS = {
    "backbone",
    "weights",
    "images",
    "classes",
    "epochs",
    "train_images",
    "val_images",
    "batch_size",
    "preprocess_s",
    "extract_s",
    "cached_train_s",
    "cached_total_s",
    "nocache_train_s",
    "speedup_train_only",
    "speedup_with_extraction",
    "val_accuracy_cached",
    "val_accuracy_nocache",
    "max_abs_feature_diff",
}


def test_bench_train_writes_its_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bench.json"
    returned = bench_train(None, "resnet18", "none", epochs=2, images=20, json_path=path)
    figures = json.loads(path.read_text())
    assert figures == pytest.approx(returned)
    assert set(figures) >= FIELDS
    assert (figures["backbone"], figures["weights"]) == ("resnet18", "none:seed=0")
    assert (figures["images"], figures["classes"], figures["epochs"]) == (20, 10, 2)
    assert figures["train_images"] + figures["val_images"] == 20
    for key in ("preprocess_s", "extract_s", "cached_train_s", "nocache_train_s"):
        assert figures[key] > 0, key
    assert figures["cached_total_s"] == pytest.approx(figures["extract_s"] + figures["cached_train_s"])
    assert figures["speedup_train_only"] == pytest.approx(figures["nocache_train_s"] / figures["cached_train_s"])
    # what the bench exists to show: a head on cached features trains far faster than one that runs the backbone
    # every epoch (resnet18 forward on 20 images per epoch against a linear layer on 20 embeddings)
    assert figures["speedup_train_only"] > 2, figures
    assert figures["speedup_with_extraction"] == pytest.approx(figures["nocache_train_s"] / figures["cached_total_s"])
    assert figures["max_abs_feature_diff"] < 1e-3  # the no-cache run left the backbone as it was
    out = capsys.readouterr().out
    assert "ratio no-cache / cached, training alone" in out and "with extraction" in out


def test_subset_keeps_every_class(demo_data: Path) -> None:
    data = load_image_folder(demo_data)
    picked = subset(data, 25)
    assert len(picked.paths) == 25
    assert sorted(set(picked.targets)) == list(range(10))
    assert subset(data, 25).paths == picked.paths
    assert len(subset(data, 10_000).paths) == 80
    with pytest.raises(DataError, match="at least 20 images"):
        subset(data, 15)


def test_bench_runtime_measures_both_runtimes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tl_models.bench.offline import bench_runtime

    path = tmp_path / "runtime.json"
    figures = bench_runtime(("resnet18",), (1, 2), seconds=0.05, json_path=path, int8=True)
    assert json.loads(path.read_text()) == figures
    assert [(r["backbone"], r["batch"]) for r in figures["rows"]] == [("resnet18", 1), ("resnet18", 2)]
    for row in figures["rows"]:
        assert row["torch_images_per_s"] > 0 and row["ort_images_per_s"] > 0
        assert row["ort_over_torch"] == pytest.approx(row["ort_images_per_s"] / row["torch_images_per_s"])
        assert row["provider"] == "CPUExecutionProvider" or row["provider"].startswith(("CUDA", "Tensorrt"))
        assert set(row["int8"]) == {"u8s8", "s8s8", "u8u8"}  # every integer type the gate searches
        for measured in row["int8"].values():
            assert measured["images_per_s"] > 0
            assert measured["over_ort"] == pytest.approx(measured["images_per_s"] / row["ort_images_per_s"])
        assert row["int8_fastest"] == max(row["int8"], key=lambda t: row["int8"][t]["images_per_s"])
    out = capsys.readouterr().out
    assert "resnet18 batch 2" in out and "int8 u8s8" in out and figures["isa"] in out


def test_bench_build_times_whole_builds_against_the_raw_backbone(
    offline_weights, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tl_models.bench.build import bench_build, synthetic_images
    from tl_models.core.runtime import gpu_count

    figures = bench_build(60, ("ort-cpu", "cuda"), tmp_path, epochs=10, seconds=0.5, json_path=tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(figures))
    assert len(list((tmp_path / "images-60").rglob("*.jpg"))) == 60
    assert sorted(p.name for p in (tmp_path / "images-60").iterdir() if p.is_dir()) == [f"c{i}" for i in range(10)]
    (row,) = [r for r in figures["rows"] if r["stack"] == "ort-cpu"]
    assert row["images_per_s"] == pytest.approx(60 / row["seconds"])
    assert 200 * 2**20 < row["peak_rss_bytes"] < 8 * 2**30  # torch + ORT are in it; far from the machine's size
    assert figures["raw_ort_batch32_images_per_s"] > 0
    assert row["over_raw_ort"] == pytest.approx(row["images_per_s"] / figures["raw_ort_batch32_images_per_s"])
    assert row["val_accuracy"] >= 0.8  # the synthetic classes are easy: a build that learns nothing is a bug
    if gpu_count() == 0:
        assert figures["skipped"] == [{"stack": "cuda", "why": "no CUDA device"}]
    assert "ort-cpu:" in capsys.readouterr().out
    before = (tmp_path / "images-60" / "c0").stat().st_mtime_ns
    synthetic_images(tmp_path, 60)  # written once, reused after
    assert (tmp_path / "images-60" / "c0").stat().st_mtime_ns == before
