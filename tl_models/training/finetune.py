"""The fine-tuning recipe (`tl-models build --fine-tune N`): stage 1 trains the head on cached embeddings of the
frozen backbone (the pipeline does that as for any build); stage 2, here, unfreezes the backbone's last N stages
(the registry's ``stages``) and trains them with the head at a low learning rate on augmented images, BatchNorm
statistics frozen, early-stopped on validation. Stage 2 starts from stage 1's result and is kept only where it
beats it on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from .augment import CROP_SCALE, Augment
from .backbones import LoadedBackbone, freeze, unfreeze_stages
from .config import FineTune, TrainConfig
from .data import ImageFolderData
from .extract import DecodedImages, TorchEngine, embed_stream
from .train import Rows, TrainResult, fit


@dataclass
class FineTuned:
    """Stage 2's outcome: the combined result (both stages' history), the manifest record, and the embeddings of
    every image under the backbone as it now is (the drift reference is taken from them)."""

    result: TrainResult
    record: dict
    embeddings: np.ndarray


def fine_tune(
    backbone: LoadedBackbone,
    head: torch.nn.Module,
    data: ImageFolderData,
    train_idx: np.ndarray | list[int],
    val_idx: np.ndarray | list[int],
    stage1: TrainResult,
    embeddings: np.ndarray,
    config: TrainConfig,
    settings: FineTune,
    progress: bool = True,
    device: str = "cpu",
) -> FineTuned:
    """Stage 2 on ``head`` (trained in stage 1) and ``backbone``, both changed in place to the kept result (trained
    on ``device``, returned on the CPU); ``embeddings``: the frozen backbone's, returned unchanged when stage 2
    does not beat stage 1."""
    targets = torch.tensor(data.targets)
    lr = settings.learning_rate(config.lr)
    modules = unfreeze_stages(backbone, settings.stages)
    try:
        with DecodedImages(data.paths, backbone.preprocessing) as images:  # decoded batch by batch, every epoch
            stage2 = fit(
                head,
                Rows(images, train_idx),
                targets[train_idx],
                Rows(images, val_idx),
                targets[val_idx],
                replace(config, epochs=settings.epochs, lr=lr, backbone_lr=lr),
                embedder=backbone.module,
                progress=progress,
                augment=Augment(backbone.preprocessing.crop_size, settings.augment),
                keep_start=True,
                desc=f"fine-tune {settings.stages} stage(s)",
                device=device,
            )
    finally:
        freeze(backbone.module)
        backbone.module.cpu()
        head.cpu()
    offset = len(stage1.history)
    improved = stage2.best_epoch > 0
    result = TrainResult(
        head_state=stage2.head_state,
        embedder_state=stage2.embedder_state,
        history=[{**h, "stage": 1} for h in stage1.history]
        + [{**h, "epoch": h["epoch"] + offset, "stage": 2} for h in stage2.history],
        best_epoch=offset + stage2.best_epoch if improved else stage1.best_epoch,
        metrics={**stage2.metrics},
    )
    result.metrics["best_epoch"] = result.best_epoch
    record = {
        "stages": settings.stages,
        "modules": modules,
        "lr": lr,
        "epochs": settings.epochs,
        "augment": list(settings.augment),
        "crop_scale": list(CROP_SCALE),
        "stage1_val_accuracy": stage1.metrics["val_accuracy"],
        "stage2_val_accuracy": stage2.metrics["val_accuracy"],
        "stage2_best_epoch": stage2.best_epoch,
        "kept": improved,
    }
    if improved:  # every image again, through the tuned backbone
        engine = TorchEngine(backbone, device)
        embeddings = np.empty((len(data.paths), backbone.spec.embedding_dim), dtype=np.float32)
        with tqdm(total=len(data.paths), desc="embed (tuned)", unit="img", disable=not progress) as bar:
            for rows, batch in embed_stream(engine, data.paths, backbone.preprocessing, [(0, len(data.paths))]):
                embeddings[rows] = batch
                bar.update(len(rows))
    return FineTuned(result, record, embeddings)
