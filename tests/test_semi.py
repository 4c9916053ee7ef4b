"""`tl-models build --unlabeled`: self-training on cached embeddings of real digits adds correct pseudo-labels on an
easy split, stops on a hopeless one, and refuses bad unlabelled folders without touching the build directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tl_models.cli import main
from tl_models.core.errors import BadRequest
from tl_models.core.manifest import BuildDir
from tl_models.training.config import SelfTraining
from tl_models.training.data import write_demo_dataset
from tl_models.training.semi import select

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    """10 labelled digits per class; 30 more per class unlabelled, named ``<class>-<file>`` so the test knows them."""
    root = tmp_path_factory.mktemp("semi")
    everything = write_demo_dataset(root / "all", per_class=40)
    labelled, unlabelled = root / "labelled", root / "unlabelled"
    for class_dir in sorted(p for p in everything.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        (labelled / class_dir.name).mkdir(parents=True)
        for path in files[:10]:
            shutil.copy(path, labelled / class_dir.name / path.name)
        unlabelled.mkdir(exist_ok=True)
        for path in files[10:]:
            shutil.copy(path, unlabelled / f"{class_dir.name}-{path.name}")
    noise = root / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(100):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    return {"labelled": labelled, "unlabelled": unlabelled, "noise": noise}


def _build(digits, out: Path, unlabelled: Path, *extra: str) -> int:
    return main(
        [
            "build",
            "--data",
            str(digits["labelled"]),
            "--out",
            str(out),
            "--head",
            "digits",
            "--weights",
            "IMAGENET1K_V1",
            "--no-export",
            "--unlabeled",
            str(unlabelled),
            *extra,
        ]
    )


def test_select_keeps_confident_rows_and_caps_each_class():
    probabilities = np.array([[0.95, 0.05], [0.97, 0.03], [0.99, 0.01], [0.2, 0.8], [0.05, 0.95]])
    assert select(probabilities, 0.9, cap=2).tolist() == [1, 2, 4]  # row 0 loses to more confident rows of class 0
    assert select(probabilities, 0.999, cap=10).tolist() == []


def test_pseudo_labels_on_an_easy_split_are_correct_and_recorded(digits, tmp_path, offline_weights, capsys):
    out = tmp_path / "build"
    assert _build(digits, out, digits["unlabelled"]) == 0, capsys.readouterr().err
    manifest = BuildDir(out).verify()
    entry = manifest.head("digits")
    record = entry.train["self_training"]
    assert record["best_round"] >= 1 and record["pseudo_labels"] > 100
    first = record["rounds"][0]  # the labelled-only head
    assert first["round"] == 0 and first["pseudo_labels"] == 0 and first["kept"]
    kept = [r for r in record["rounds"] if r["kept"]]
    assert [r["val_accuracy"] for r in kept] == sorted(r["val_accuracy"] for r in kept)  # never kept a worse round
    assert entry.data["unlabeled"]["images"] == 300
    pseudo = json.loads((out / entry.path / "pseudo_labels.json").read_text())
    assert len(pseudo) == record["pseudo_labels"] and "pseudo_labels.json" in entry.files
    correct = np.mean([p["label"] == p["image"].split("-")[0] for p in pseudo])
    assert correct >= 0.9, f"only {correct:.0%} of the pseudo-labels are right"
    assert all(p["confidence"] >= 0.9 for p in pseudo)


def test_self_training_stops_on_a_hopeless_split(digits, tmp_path, offline_weights, capsys):
    out = tmp_path / "build"
    assert _build(digits, out, digits["noise"], "--pseudo-threshold", "0.99") == 0, capsys.readouterr().err
    entry = BuildDir(out).manifest().head("digits")
    record = entry.train["self_training"]
    assert record["best_round"] == 0 and len(record["rounds"]) == 2 and not record["rounds"][1]["kept"]
    assert json.loads((out / entry.path / "pseudo_labels.json").read_text()) == []


def test_bad_unlabelled_folders_are_refused_and_leave_the_build_as_it_was(digits, tmp_path, offline_weights, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    copies = tmp_path / "copies"
    shutil.copytree(digits["labelled"] / "3", copies)
    out = tmp_path / "build"
    cases = [
        (empty, [], "has no readable images"),
        (copies, [], "are also labelled images"),
        (digits["labelled"] / "3", [], "overlaps the labelled data"),
        (digits["unlabelled"], ["--fine-tune", "1"], "cannot be combined with --fine-tune"),
    ]
    for folder, extra, message in cases:
        assert _build(digits, out, folder, *extra) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()  # a first build that fails leaves nothing
    assert (
        main(
            [
                "build",
                "--data",
                str(digits["labelled"]),
                "--out",
                str(out),
                "--head",
                "digits",
                "--weights",
                "IMAGENET1K_V1",
                "--no-export",
            ]
        )
        == 0
    )
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert _build(digits, out, empty) == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    with pytest.raises(BadRequest, match="self-training needs at least 1 round"):
        SelfTraining(rounds=0).check()


def test_all_rounds_runs_every_round_and_keeps_the_last(digits, tmp_path, offline_weights, capsys):
    """--pseudo-all-rounds: no validation stop; each round is labelled by the one before, the last is the head."""
    out = tmp_path / "build"
    assert _build(digits, out, digits["unlabelled"], "--pseudo-rounds", "3", "--pseudo-all-rounds") == 0, (
        capsys.readouterr().err
    )
    entry = BuildDir(out).manifest().head("digits")
    record = entry.train["self_training"]
    assert record["stop"] is False and record["best_round"] == 3
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2, 3] and all(r["kept"] for r in record["rounds"])
    assert all(r["pseudo_labels"] > 0 for r in record["rounds"][1:])
    pseudo = json.loads((out / entry.path / "pseudo_labels.json").read_text())
    assert len(pseudo) == record["rounds"][3]["pseudo_labels"]
