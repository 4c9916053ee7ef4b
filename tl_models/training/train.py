"""Head training: AdamW + cosine schedule, early stopping on val accuracy, seeded and reproducible.

By default the head trains on cached embeddings. With an ``embedder`` (the backbone) the inputs are
uint8 images and the backbone runs every step: that is the fine-tuning recipe's stage 2 (``--fine-tune``: its last
stages train, on augmented images) and the benchmark's no-cache baseline (all frozen). The backbone always stays in
eval mode, so BatchNorm statistics never move.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .config import TrainConfig

HEAD_THREADS = 1  # intra-op threads of a head trained on cached embeddings (fit's docstring says why)


@dataclass
class TrainResult:
    """Best head (and fine-tuned backbone stage) by val accuracy, per-epoch history and final metrics."""

    head_state: dict
    embedder_state: dict | None
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)


class RowSource(Protocol):
    """What rows can be read from without holding them all: the feature cache's shards, images decoded on demand."""

    def __len__(self) -> int: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...


class Rows:
    """Rows ``index`` of a tensor or of a ``RowSource``, gathered only when indexed: fit and predict take it where a
    copy of a split of every input would cost N rows."""

    def __init__(self, source: torch.Tensor | RowSource, index: np.ndarray | list[int]):
        self.source, self.index = source, torch.as_tensor(np.asarray(index), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: torch.Tensor | slice) -> torch.Tensor:
        index = self.index[key]
        if isinstance(self.source, torch.Tensor):
            return self.source[index]
        return torch.from_numpy(self.source.take(index.numpy()))


def classification_metrics(logits: np.ndarray, targets: np.ndarray, num_classes: int) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows = true class, columns = predicted)."""
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros(num_classes), where=support > 0)
    return {
        "val_accuracy": float((predicted == targets).mean()),
        "per_class_accuracy": [round(float(v), 6) for v in per_class],
        "confusion_matrix": confusion.tolist(),
    }


def _forward(head: nn.Module, embedder: nn.Module | None, inputs: torch.Tensor) -> torch.Tensor:
    inputs = inputs.to(next(head.parameters()).device, non_blocking=True)
    if embedder is None:
        return head(inputs)
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in embedder.parameters())):
        features = embedder(inputs)
    return head(features)


@torch.inference_mode()
def predict(
    head: nn.Module, inputs: torch.Tensor | Rows, embedder: nn.Module | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Logits for all inputs, head and embedder in eval mode."""
    head.eval()
    return torch.cat(
        [_forward(head, embedder, inputs[i : i + batch_size]).cpu() for i in range(0, len(inputs), batch_size)]
    )


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside the block, back to what they were after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(
    head: nn.Module,
    x_train: torch.Tensor | Rows,
    y_train: torch.Tensor,
    x_val: torch.Tensor | Rows,
    y_val: torch.Tensor,
    config: TrainConfig,
    embedder: nn.Module | None = None,
    progress: bool = True,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep_start: bool = False,
    desc: str = "train head",
    device: str = "cpu",
) -> TrainResult:
    """Train ``head`` (and any trainable ``embedder`` parameters, at ``config.backbone_lr``) on ``device``, keep the
    best epoch by val accuracy. ``augment`` transforms each training batch; ``keep_start``: the models as given
    count as epoch 0, so training that never beats them leaves them as they were (``best_epoch`` 0).

    A head on cached embeddings trains on one CPU thread: its steps take well under a millisecond, and a second
    intra-op thread only adds a wait at every operation, a long one when another process holds the other core."""
    threads = HEAD_THREADS if embedder is None and device == "cpu" else torch.get_num_threads()
    with torch_threads(threads):
        return _fit(head, x_train, y_train, x_val, y_val, config, embedder, progress, augment, keep_start, desc, device)


def _fit(
    head: nn.Module,
    x_train: torch.Tensor | Rows,
    y_train: torch.Tensor,
    x_val: torch.Tensor | Rows,
    y_val: torch.Tensor,
    config: TrainConfig,
    embedder: nn.Module | None,
    progress: bool,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    keep_start: bool,
    desc: str,
    device: str,
) -> TrainResult:
    head.to(device)
    if embedder is not None:
        embedder.to(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    groups = [{"params": list(head.parameters()), "lr": config.lr}]
    trainable = [p for p in embedder.parameters() if p.requires_grad] if embedder is not None else []
    if trainable:
        groups.append({"params": trainable, "lr": config.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss()
    best = (-1.0, math.inf)
    result = TrainResult(head_state={}, embedder_state=None)
    if keep_start:
        val_logits = predict(head, x_val, embedder)
        best = (float((val_logits.argmax(1) == y_val).float().mean()), float(loss_fn(val_logits, y_val)))
        result.head_state = copy.deepcopy(head.state_dict())
        if trainable:
            assert embedder is not None  # trainable parameters are the embedder's
            result.embedder_state = copy.deepcopy(embedder.state_dict())
    stale = 0
    bar = tqdm(range(1, config.epochs + 1), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        head.train()
        if embedder is not None:
            embedder.eval()
        total = 0.0
        for batch in torch.randperm(len(x_train), generator=generator).split(config.batch_size):
            inputs = x_train[batch] if augment is None else augment(x_train[batch])
            loss = loss_fn(_forward(head, embedder, inputs), y_train[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        val_logits = predict(head, x_val, embedder)
        val_loss = float(loss_fn(val_logits, y_val))
        val_acc = float((val_logits.argmax(1) == y_val).float().mean())
        result.history.append(
            {"epoch": epoch, "train_loss": total / len(x_train), "val_loss": val_loss, "val_accuracy": val_acc}
        )
        bar.set_postfix(loss=f"{total / len(x_train):.4f}", val_acc=f"{val_acc:.4f}")
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, stale, result.best_epoch = (val_acc, val_loss), 0, epoch
            result.head_state = copy.deepcopy(head.state_dict())
            if trainable:
                assert embedder is not None  # trainable parameters are the embedder's
                result.embedder_state = copy.deepcopy(embedder.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    head.load_state_dict(result.head_state)
    if result.embedder_state is not None:
        assert embedder is not None  # embedder_state is only kept when the embedder trains
        embedder.load_state_dict(result.embedder_state)
    logits = predict(head, x_val, embedder).numpy()
    result.metrics = classification_metrics(logits, y_val.numpy(), logits.shape[1])
    result.metrics["best_epoch"] = result.best_epoch
    return result
