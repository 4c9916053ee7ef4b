"""What `tl-models build` takes (:class:`BuildOptions`) and what a build gives back (:class:`BuildReport` and its
one-line summary), in a module of their own: the pipeline, the training methods and `build --from-log` all use them
and none of them imports another for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.manifest import HeadEntry, Manifest
from .config import FineTune, SelfTraining, TrainConfig
from .parity import Tolerance


@dataclass
class BuildOptions:
    """Everything `tl-models build` takes."""

    data: Path | None
    out: Path
    backbone: str = "mobilenet_v2"
    weights: str = "DEFAULT"
    kind: str = "linear"
    head: str = "default"
    hidden: int = 512
    dropout: float = 0.0
    fine_tune: FineTune = field(default_factory=FineTune)  # stages 0: the backbone stays frozen
    val_fraction: float = 0.2
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: Path | None = None
    progress: bool = True
    export: bool = True
    fused: bool = False
    tolerance: Tolerance = field(default_factory=Tolerance)
    unlabeled: Path | None = None  # self-training on these images' embeddings (training.semi)
    target: Path | None = None  # unlabelled target-domain images: align to them (training.adapt)
    self_training: SelfTraining = field(default_factory=SelfTraining)
    from_log: Path | None = None  # train from a service's embedding log instead (training.traffic)
    engine: str = "auto"  # feature extraction: auto, onnxruntime or torch (training.extract)
    device: str = "auto"  # auto, cpu or cuda: extraction and fine-tuning's stage 2
    ray: str | None = None  # a Ray cluster's HOST:PORT: extraction there (training.distributed)
    ray_actors: int = 2  # backbone sessions (actors) on the cluster


@dataclass
class BuildReport:
    """What a build produced: the head entry, whether the feature cache was hit, the manifest."""

    head: HeadEntry
    cache_hit: bool
    manifest: Manifest
    extraction: dict = field(default_factory=dict)  # Features.summary() of the labelled images (not in the manifest)


def summary_line(report: BuildReport) -> str:
    """One line for the terminal."""
    head = report.head
    tuned = head.train.get("fine_tune")
    stage2 = (
        ""
        if not tuned
        else (
            f"; fine-tuned {tuned['stages']} stage(s): val {tuned['stage1_val_accuracy']:.4f} -> "
            f"{tuned['stage2_val_accuracy']:.4f}" + ("" if tuned["kept"] else ", no better: backbone left frozen")
        )
    )
    return (
        f"{head.name} v{head.version} ({head.kind}) on {report.manifest.backbone} "
        f"[{report.manifest.weights}]: val accuracy {head.metrics['val_accuracy']:.4f} "
        f"(feature cache {_cache_word(report)}{stage2})"
    )


def _cache_word(report: BuildReport) -> str:
    if "log" in report.head.data and "images" not in report.head.data:
        return "not used: logged embeddings"
    if report.cache_hit:
        return "hit"
    run = report.extraction
    if run.get("shards_cached"):
        return (
            f"resumed: {run['shards_cached']} of {run['shards']} shards cached, {run['embedded']} of "
            f"{run['images']} images embedded by {run['engine']} on {run['device']}, {run['where']}"
        )
    if not run:
        return "miss"
    return f"miss: {run['images']} images embedded by {run['engine']} on {run['device']}, {run['where']}"
