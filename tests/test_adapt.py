"""`tl-models build --target`: CORAL aligns the labelled embeddings to the target domain's, the target's
standardisation is a layer of the exported head graph, and on inverted digits it beats the source-only head."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_models.cli import main
from tl_models.core.manifest import BuildDir
from tl_models.core.runtime import create_session
from tl_models.training.adapt import coral
from tl_models.training.build_backbone import load_build_backbone
from tl_models.training.data import load_image_folder, load_unlabeled_folder, write_demo_dataset
from tl_models.training.features import FeatureCache
from tl_models.training.pipeline import load_head_module
from tl_models.training.train import predict

pytestmark = pytest.mark.slow


def test_coral_gives_the_source_the_target_covariance():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(4000, 3)) @ np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 0.2]]) + 5.0
    target = rng.normal(size=(4000, 3)) @ np.array([[0.5, 0.0, 0.9], [0.4, 1.5, 0.0], [0.0, 0.0, 1.0]]) - 2.0
    aligned = coral(source, target, eps=1e-6)
    np.testing.assert_allclose(aligned.source.mean(axis=0), target.mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(np.cov(aligned.source, rowvar=False), np.cov(target, rowvar=False), rtol=0.02, atol=0.02)
    np.testing.assert_allclose(aligned.target_std, target.std(axis=0), rtol=1e-4)  # no dimension below the floor


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    """Source: 20 labelled digits per class. Target: other digits inverted, 15 per class unlabelled and the rest
    (up to 15 per class) labelled for testing."""
    root = tmp_path_factory.mktemp("adapt")
    everything = write_demo_dataset(root / "all", per_class=50)
    source, target, test = root / "source", root / "target", root / "test"
    target.mkdir()
    for class_dir in sorted(p for p in everything.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        (source / class_dir.name).mkdir(parents=True)
        (test / class_dir.name).mkdir(parents=True)
        for path in files[:20]:
            shutil.copy(path, source / class_dir.name / path.name)
        for i, path in enumerate(files[20:]):
            inverted = Image.fromarray(255 - np.asarray(Image.open(path).convert("RGB")))
            inverted.save(target / f"{class_dir.name}-{path.name}" if i < 15 else test / class_dir.name / path.name)
    return {"source": source, "target": target, "test": test, "root": root}


def _accuracy(build_dir: Path, images: Path, cache: Path) -> float:
    build = BuildDir(build_dir)
    manifest = build.manifest()
    data = load_image_folder(images)
    features, _ = FeatureCache(cache).get_or_compute(load_build_backbone(build, manifest), data, progress=False)
    head = load_head_module(build, manifest.head("digits"))
    return float((predict(head, torch.from_numpy(features)).argmax(1).numpy() == np.array(data.targets)).mean())


def test_the_alignment_is_inside_the_exported_head_and_beats_source_only(domains, tmp_path, offline_weights, capsys):
    cache = domains["root"] / "cache"
    common = [
        "--data",
        str(domains["source"]),
        "--head",
        "digits",
        "--weights",
        "IMAGENET1K_V1",
        "--cache-dir",
        str(cache),
    ]
    assert main(["build", *common, "--out", str(tmp_path / "source-only"), "--no-export"]) == 0
    adapted = tmp_path / "adapted"
    assert main(["build", *common, "--out", str(adapted), "--target", str(domains["target"])]) == 0, (
        capsys.readouterr().err
    )
    build = BuildDir(adapted)
    manifest = build.verify()
    entry = manifest.head("digits")
    assert entry.spec["standardise"] and entry.train["adaptation"]["method"] == "coral"
    assert entry.data["target"]["images"] == 150 and entry.parity["passed"]

    # the head graph standardises with the target's statistics: head.onnx on raw target embeddings = the torch head
    target = load_image_folder(domains["test"])
    embeddings, _ = FeatureCache(cache).get_or_compute(load_build_backbone(build, manifest), target, progress=False)
    head = load_head_module(build, entry)
    unlabelled = load_unlabeled_folder(domains["target"], load_image_folder(domains["source"]))
    pool, _ = FeatureCache(cache).get_or_compute(load_build_backbone(build, manifest), unlabelled, progress=False)
    np.testing.assert_allclose(head[0].mean.numpy(), pool.mean(axis=0), rtol=1e-4, atol=1e-5)
    onnx = create_session(adapted / entry.path / "head.onnx", "cpu").run(["logits"], {"embedding": embeddings})[0]
    np.testing.assert_allclose(onnx, predict(head, torch.from_numpy(embeddings)).numpy(), atol=1e-4, rtol=1e-3)

    source_only = _accuracy(tmp_path / "source-only", domains["test"], cache)
    aligned = _accuracy(adapted, domains["test"], cache)
    assert aligned > source_only + 0.05, f"CORAL {aligned:.3f} vs source only {source_only:.3f}"


def test_a_target_folder_without_images_is_refused_and_nothing_is_written(domains, tmp_path, offline_weights, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    out = tmp_path / "build"
    assert (
        main(
            [
                "build",
                "--data",
                str(domains["source"]),
                "--out",
                str(out),
                "--weights",
                "IMAGENET1K_V1",
                "--target",
                str(empty),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "target folder" in err and "has no readable images" in err, err
    assert not out.exists()
