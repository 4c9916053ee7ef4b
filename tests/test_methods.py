"""The training methods' registry (`training.methods`): the four methods, which options select them, the
combinations refused before any work, and a method registered here that a real build runs with no change to the
pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from tl_models.core.errors import BadRequest
from tl_models.core.manifest import BuildDir, HeadEntry
from tl_models.training import methods
from tl_models.training.config import FineTune
from tl_models.training.data import load_data, write_demo_dataset
from tl_models.training.options import BuildOptions


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("methods") / "digits", size=32, per_class=3)


def _names(options: BuildOptions) -> list[str]:
    return [method.name for method in methods.selected(options)]


def test_the_registry_lists_the_four_methods_in_their_order():
    assert list(methods.METHODS) == ["fine-tune", "self-training", "coral", "from-log"]


def test_options_select_their_methods(digits, tmp_path):
    plain = BuildOptions(data=digits, out=tmp_path / "out")
    assert _names(plain) == []
    assert _names(BuildOptions(data=digits, out=tmp_path, unlabeled=digits, target=digits)) == [
        "self-training",
        "coral",
    ]
    assert _names(BuildOptions(data=digits, out=tmp_path, fine_tune=FineTune(stages=2))) == ["fine-tune"]
    from_log = BuildOptions(data=None, out=tmp_path, from_log=tmp_path / "log")
    assert _names(from_log) == ["from-log"] and methods.entry_point(from_log) is not None
    assert methods.entry_point(plain) is None


def test_checks_refuse_fine_tuning_with_cached_embedding_methods_and_read_one_folder_once(digits, tmp_path):
    data, pool = load_data(digits), write_demo_dataset(tmp_path / "pool", size=40, per_class=1)
    with pytest.raises(BadRequest, match="cannot be combined with --fine-tune"):
        methods.checked(BuildOptions(data=digits, out=tmp_path, target=pool, fine_tune=FineTune(stages=1)), data)
    both = methods.checked(BuildOptions(data=digits, out=tmp_path, unlabeled=pool, target=pool), data)
    assert both[0].folder is both[1].folder  # one folder given twice is read once


@pytest.mark.slow
def test_a_method_registered_outside_the_pipeline_runs_in_a_real_build(digits, tmp_path, quick_build):
    @methods.register_method
    class Noted(methods.TrainingMethod):
        """Records the number of training rows; selected by the head's name."""

        name = "noted"

        @staticmethod
        def wanted(options: BuildOptions) -> bool:
            return options.head == "noted"

        def annotate(self, run: methods.Run, staged: Path, entry: HeadEntry) -> None:
            entry.train["noted"] = len(run.train_idx)

    try:
        with pytest.raises(ValueError, match="registered already"):
            methods.register_method(Noted)
        report = quick_build(digits, tmp_path / "build", head="noted", epochs=1)
        plain = quick_build(digits, tmp_path / "build", head="plain", epochs=1)
    finally:
        del methods.METHODS["noted"]
    heads = {h.name: h for h in BuildDir(tmp_path / "build").manifest().heads}
    assert heads["noted"].train["noted"] == report.head.data["train"] > 0
    assert "noted" not in heads["plain"].train and "noted" not in plain.head.train
