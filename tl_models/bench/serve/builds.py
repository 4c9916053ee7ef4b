"""The build a serving benchmark runs on, and its images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...core.errors import UserError
from ...core.manifest import BuildDir, HeadEntry, Manifest
from .options import BenchServeError, ServeBenchOptions


def default_build(options: ServeBenchOptions, data: Path, workdir: Path) -> Path:
    """Heads ``a`` (linear) and ``b`` (mlp) on ``data``, exported with parity checked (like the tests' build)."""
    from ...training.config import TrainConfig
    from ...training.options import BuildOptions
    from ...training.pipeline import build

    out = workdir / "build"
    for name, kind in (("a", "linear"), ("b", "mlp")):
        options.progress(f"[bench serve] building head {name} ({kind}) on {options.backbone} [{options.weights}]")
        build(
            BuildOptions(
                data=data,
                out=out,
                backbone=options.backbone,
                weights=options.weights,
                kind=kind,
                head=name,
                hidden=256,
                train=TrainConfig(epochs=15),
                cache_dir=workdir / "cache",
                progress=False,
            )
        )
    return out


def sample_images(data: Path, count: int = 20) -> list[bytes]:
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise BenchServeError(f"no PNG/JPEG images under {data}")
    return [p.read_bytes() for p in paths[:: max(1, len(paths) // count)][:count]]


def first_head(manifest: Manifest) -> HeadEntry:
    """The latest version of the build's first head (what the in-process stacks run)."""
    return manifest.head(manifest.heads[0].name)


def int8_backbone(build_dir: Path, own: bool, progress: Callable[[str], None]) -> None:
    """Make sure the build has an int8 backbone that may serve on this CPU: quantize the benchmark's own build with
    the accuracy gate open (a speed figure, not an accuracy one), each integer type tried and the fastest here
    chosen, as the gate chooses; a user's build must have passed `tl-models quantize` (or `--verify`) here."""
    from ...core.heads import backbone_from_build

    build = BuildDir(build_dir)
    try:
        backbone_from_build(build, build.manifest(), "int8").check_machine()
        return
    except UserError as exc:
        if not own:
            raise BenchServeError(f"--int8: {exc.message}") from None
    from ...training.quantize import Calibration, Gate, quantize

    progress(
        "[bench serve] quantizing the benchmark's build to int8 (accuracy gate open: a speed figure, not an "
        "accuracy one; the fastest integer type here)"
    )
    report = quantize(
        build_dir,
        Calibration(images=16),
        Gate(min_agreement=0.0, max_accuracy_drop=1.0, min_speedup=0.0),
        search="types",
    )
    chosen = report.chosen
    assert chosen is not None  # quantize refuses when no setting passed
    progress(f"[bench serve] int8: {chosen.calibration.label()}, {chosen.speedup:.2f}x fp32 at batch 32")


def weights_argument(weights_id: str) -> tuple[str, int]:
    """The ``--weights`` value and seed that reproduce a manifest's weights id (new heads must match it)."""
    if weights_id.startswith("none:seed="):
        return "none", int(weights_id.split("=", 1)[1])
    if weights_id.startswith("torchvision:"):
        return weights_id.rsplit(".", 1)[-1], 0
    raise BenchServeError(
        f"the heads and variant parts add heads to a copy of the build, which needs its weights again; "
        f"{weights_id!r} cannot be reloaded by name: use --heads 0 and no --variant"
    )


def head_into(copy: Path, data: Path, workdir: Path, head: str, epochs: int, fine_tune: Any = None) -> Any:
    """Train a linear head (a new version of ``head``) on ``data`` into the benchmark's copy of a build, on the
    build's own backbone and weights (its ``BuildReport``); ``fine_tune``: a ``FineTune`` for a version on the
    build's trunk."""
    from ...training.config import FineTune, TrainConfig
    from ...training.options import BuildOptions
    from ...training.pipeline import build

    manifest = BuildDir(copy).manifest()
    weights, seed = weights_argument(manifest.weights)
    return build(
        BuildOptions(
            data=data,
            out=copy,
            backbone=manifest.backbone,
            weights=weights,
            kind="linear",
            head=head,
            train=TrainConfig(epochs=epochs, seed=seed),
            fine_tune=fine_tune or FineTune(),
            cache_dir=workdir / "cache",
            progress=False,
        )
    )
