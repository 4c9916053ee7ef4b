"""Helpers shared by test modules (plain functions; fixtures that use them live in conftest.py / test files)."""

from __future__ import annotations

from pathlib import Path

from tl_models.build import BuildOptions, build
from tl_models.data import write_demo_dataset
from tl_models.train import TrainConfig


def serving_build(root: Path, per_class: int = 10) -> Path:
    """A real build for serving tests: digits, mobilenet_v2 with ImageNet weights, heads ``a`` (linear) and
    ``b`` (mlp), each exported to ONNX with parity checked. Returns the build directory."""
    data = write_demo_dataset(root / "data", per_class=per_class)
    out = root / "build"
    for name, kind in (("a", "linear"), ("b", "mlp")):
        build(BuildOptions(data=data, out=out, backbone="mobilenet_v2", weights="IMAGENET1K_V1", head=kind,
                           name=name, train=TrainConfig(epochs=15), cache_dir=root / "cache", progress=False))
    return out
