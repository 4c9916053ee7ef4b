"""Benchmarks behind `tl-models bench`: measured figures, printed as a small table, optionally saved as JSON.

``bench_train``: head training on cached embeddings (one backbone pass over the data, then epochs on
D-dim vectors) against the same training with the frozen backbone run on every batch of every epoch.
``bench_runtime``: backbone images/s in ONNX Runtime against PyTorch eager, per batch size.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import BadRequest
from ..core.names import IMAGE
from ..training.architectures import HeadSpec, build_head
from ..training.backbones import freeze, load_backbone
from ..training.config import TrainConfig
from ..training.data import DataError, ImageFolderData, load_image_folder, stratified_split, write_demo_dataset
from ..training.features import embed, load_images
from ..training.train import TrainResult, fit
from .report import format_table, images_per_second, write_json

log = logging.getLogger(__name__)

DEMO_CLASSES = 10  # the digits


@contextmanager
def _timer(figures: dict, key: str) -> Iterator[None]:
    """Store the wall-clock seconds of the block in ``figures[key]``."""
    start = time.perf_counter()
    yield
    figures[key] = time.perf_counter() - start


def subset(data: ImageFolderData, images: int, seed: int = 0) -> ImageFolderData:
    """At most ``images`` images, taken class by class in turn (seeded) so every class keeps its share."""
    rng = random.Random(seed)
    per_class = [[i for i, t in enumerate(data.targets) if t == c] for c in range(len(data.classes))]
    for members in per_class:
        rng.shuffle(members)
    chosen: list[int] = []
    for rank in range(max(len(m) for m in per_class)):
        chosen.extend(m[rank] for m in per_class if rank < len(m))
    chosen = sorted(chosen[:images])
    picked = data.subset(chosen)
    too_few = [data.classes[c] for c in range(len(data.classes)) if picked.targets.count(c) < 2]
    if too_few:
        raise DataError(
            f"{images} images leave fewer than 2 for class(es) {', '.join(too_few)}: "
            f"use at least {2 * len(data.classes)} images"
        )
    return picked


def _fit_timed(
    figures: dict,
    key: str,
    spec: HeadSpec,
    split: tuple[list[int], list[int]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    embedder: torch.nn.Module | None = None,
) -> TrainResult:
    train, val = split
    torch.manual_seed(config.seed)
    head = build_head(spec)  # same seed: both runs start from the same head
    with _timer(figures, key):
        result = fit(
            head, inputs[train], targets[train], inputs[val], targets[val], config, embedder=embedder, progress=False
        )
    if len(result.history) != config.epochs:
        raise RuntimeError(f"{key}: ran {len(result.history)} of {config.epochs} epochs")
    return result


def bench_train(
    data: str | Path | None,
    backbone: str = "mobilenet_v2",
    weights: str = "IMAGENET1K_V1",
    epochs: int = 20,
    images: int = 300,
    json_path: str | Path | None = None,
) -> dict:
    """Time head training with cached features vs the frozen backbone forward every epoch, on the same images.

    Preprocessing (decode, resize, crop) is done once and shared by both runs; it is reported but not in the
    ratios. Returns the figures (also printed, and written to ``json_path`` when given).
    """
    if epochs < 1:
        raise BadRequest(f"epochs must be at least 1, got {epochs}")
    with tempfile.TemporaryDirectory(prefix="tl-models-bench-") as tmp:
        if data is None:
            per_class = min(math.ceil(images / DEMO_CLASSES), 200)
            data = write_demo_dataset(Path(tmp) / "digits", per_class=per_class)
        dataset = subset(load_image_folder(data), images)
        loaded = load_backbone(backbone, weights)
        figures: dict = {
            "benchmark": "train",
            "backbone": loaded.spec.name,
            "weights": loaded.weights_id,
            "images": len(dataset.paths),
            "classes": len(dataset.classes),
            "epochs": epochs,
        }
        with _timer(figures, "preprocess_s"):
            pixels = load_images(dataset, loaded.preprocessing, progress=False)
    split = stratified_split(dataset.targets, 0.2, seed=0)
    targets = torch.tensor(dataset.targets)
    config = TrainConfig(epochs=epochs, patience=epochs + 1, seed=0)
    spec = HeadSpec("linear", loaded.spec.embedding_dim, len(dataset.classes))
    figures.update(
        train_images=len(split[0]),
        val_images=len(split[1]),
        batch_size=config.batch_size,
        torch_threads=torch.get_num_threads(),
    )

    with _timer(figures, "extract_s"):
        features = embed(loaded, pixels, progress=False)
    cached = _fit_timed(figures, "cached_train_s", spec, split, torch.from_numpy(features), targets, config)
    freeze(loaded.module)  # every backbone parameter frozen, eval mode: only the head learns
    baseline = _fit_timed(
        figures, "nocache_train_s", spec, split, torch.from_numpy(pixels), targets, config, embedder=loaded.module
    )
    if any(p.requires_grad for p in loaded.module.parameters()):
        raise RuntimeError("the backbone was not frozen during the no-cache run")

    figures["cached_total_s"] = figures["extract_s"] + figures["cached_train_s"]
    figures["speedup_train_only"] = figures["nocache_train_s"] / figures["cached_train_s"]
    figures["speedup_with_extraction"] = figures["nocache_train_s"] / figures["cached_total_s"]
    figures["val_accuracy_cached"] = cached.metrics["val_accuracy"]
    figures["val_accuracy_nocache"] = baseline.metrics["val_accuracy"]
    figures["max_abs_feature_diff"] = float(np.abs(features[:8] - _embeddings(loaded.module, pixels[:8])).max())

    title = (
        f"bench train: {figures['backbone']} [{figures['weights']}], {figures['images']} images "
        f"({figures['train_images']} train / {figures['val_images']} val), {epochs} epochs, "
        f"batch {config.batch_size}, {figures['torch_threads']} threads"
    )
    print(
        format_table(
            title,
            [
                ("preprocess images (once, shared by both runs)", f"{figures['preprocess_s']:.2f} s"),
                ("feature extraction (once)", f"{figures['extract_s']:.2f} s"),
                (f"train on cached features ({epochs} epochs)", f"{figures['cached_train_s']:.3f} s"),
                ("cached total: extraction + training", f"{figures['cached_total_s']:.2f} s"),
                (f"train with backbone forward every epoch ({epochs} epochs)", f"{figures['nocache_train_s']:.2f} s"),
                ("ratio no-cache / cached, training alone", f"{figures['speedup_train_only']:.1f}x"),
                ("ratio no-cache / cached, with extraction", f"{figures['speedup_with_extraction']:.1f}x"),
                (
                    "val accuracy: cached / no-cache",
                    f"{figures['val_accuracy_cached']:.3f} / {figures['val_accuracy_nocache']:.3f}",
                ),
            ],
        )
    )
    write_json(json_path, figures)
    return figures


@torch.inference_mode()
def _embeddings(module: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    """Embeddings of a few images recomputed after both runs (the cache must still describe the backbone)."""
    return module(torch.from_numpy(pixels)).numpy()


def bench_runtime(
    backbones: tuple[str, ...] = ("resnet50", "mobilenet_v3_large"),
    batches: tuple[int, ...] = (1, 32),
    seconds: float = 3.0,
    providers: str | None = None,
    json_path: str | Path | None = None,
    int8: bool = False,
    int8_types: tuple[str, ...] = ("u8s8", "s8s8", "u8u8"),
) -> dict:
    """ONNX Runtime vs PyTorch eager backbone throughput (images/s) per backbone and batch, in one run; with
    ``int8`` also the static int8 QDQ graph of each of ``int8_types`` (per-channel minmax, the gate's default,
    calibrated on 16 random images: speed figures, not accuracy ones) and the fastest of them, as the gate picks."""
    from ..core.cpu import this_machine
    from ..core.runtime import active_provider, create_session
    from ..training.export import export_backbone
    from ..training.quantize import Calibration, prepare, quantize_graph

    figures: dict = {
        "benchmark": "runtime",
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "int8": int8,
        "int8_types": list(int8_types) if int8 else [],
        **this_machine(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="tl-models-bench-") as tmp:
        for name in backbones:
            loaded = load_backbone(name, "none")
            size = [3, loaded.preprocessing.crop_size, loaded.preprocessing.crop_size]
            path = Path(tmp) / f"{name}.onnx"
            export_backbone(loaded.module, size, path, {"backbone": name}, loaded.spec.onnx_exporter)
            session = create_session(path, providers)
            quantized = {}
            if int8:
                calibration = np.random.default_rng(0).integers(0, 256, (16, *size), dtype=np.uint8)
                prepare(path, Path(tmp) / f"{name}.prepared.onnx")
                for types in int8_types:
                    out = Path(tmp) / f"{name}.{types}.onnx"
                    quantize_graph(
                        Path(tmp) / f"{name}.prepared.onnx",
                        calibration,
                        Calibration(images=16, types=types).check(),
                        out,
                    )
                    quantized[types] = create_session(out, providers)
            for batch in batches:
                pixels = np.random.default_rng(batch).integers(0, 256, (batch, *size), dtype=np.uint8)
                tensor = torch.from_numpy(pixels)

                @torch.inference_mode()
                def eager(module: torch.nn.Module = loaded.module, tensor: torch.Tensor = tensor) -> None:
                    module(tensor)

                torch_ips, torch_ms = images_per_second(eager, batch, seconds)
                ort_ips, ort_ms = images_per_second(
                    lambda session=session, pixels=pixels: session.run(None, {IMAGE: pixels}), batch, seconds
                )
                row: dict[str, Any] = {
                    "backbone": name,
                    "batch": batch,
                    "provider": active_provider(session),
                    "torch_images_per_s": torch_ips,
                    "torch_ms_per_batch": torch_ms,
                    "ort_images_per_s": ort_ips,
                    "ort_ms_per_batch": ort_ms,
                    "ort_over_torch": ort_ips / torch_ips,
                }
                for types, int8_session in quantized.items():
                    int8_ips, int8_ms = images_per_second(
                        lambda session=int8_session, pixels=pixels: session.run(None, {IMAGE: pixels}), batch, seconds
                    )
                    row.setdefault("int8", {})[types] = {
                        "images_per_s": int8_ips,
                        "ms_per_batch": int8_ms,
                        "over_ort": int8_ips / ort_ips,
                    }
                if quantized:
                    row["int8_fastest"] = max(row["int8"], key=lambda t: row["int8"][t]["images_per_s"])
                figures["rows"].append(row)
    rows = [
        (
            f"{r['backbone']} batch {r['batch']}: torch {r['torch_images_per_s']:.1f} img/s, "
            f"ORT ({r['provider'].replace('ExecutionProvider', '')}) {r['ort_images_per_s']:.1f} img/s"
            + "".join(
                f", int8 {t} {m['images_per_s']:.1f} img/s ({m['over_ort']:.2f}x ORT)"
                for t, m in r.get("int8", {}).items()
            ),
            f"{r['ort_over_torch']:.2f}x",
        )
        for r in figures["rows"]
    ]
    print(
        format_table(
            f"bench runtime: ONNX Runtime / PyTorch eager, {figures['torch_threads']} threads, "
            f"{figures['isa']} CPU, ONNX Runtime {figures['onnxruntime']}",
            rows,
        )
    )
    write_json(json_path, figures)
    return figures
