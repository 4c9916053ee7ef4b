"""Self-training on cached embeddings: `tl-models build --unlabeled DIR`.

Round 0 trains the head on the labelled training split. Each later round labels every unlabelled embedding with
the best head so far, keeps those it predicts with confidence >= ``threshold`` (at most ``cap`` per class, the
most confident first, so that one class cannot flood the set), and trains a fresh head on the labelled and the
pseudo-labelled embeddings. A round is kept only when it improves the labelled validation split (accuracy, then
loss); the first round that does not ends the loop, and the best head is the result. With ``stop`` off every round
is kept: each labels with the one before, and the last is the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .config import SelfTraining, TrainConfig
from .train import TrainResult, fit, predict

log = logging.getLogger(__name__)


@dataclass
class SelfTrainResult:
    """The best round's head and training result, every round's record, and the pseudo-labels it trained on."""

    head: torch.nn.Module
    result: TrainResult
    rounds: list[dict] = field(default_factory=list)
    pseudo_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pseudo_label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pseudo_confidence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def record(self, settings: SelfTraining) -> dict:
        """What the manifest keeps: the settings, every round, and which round won."""
        best = max((r for r in self.rounds if r["kept"]), key=lambda r: r["round"])
        return {
            **asdict(settings),
            "rounds": self.rounds,
            "best_round": best["round"],
            "pseudo_labels": int(len(self.pseudo_index)),
        }


def select(probabilities: np.ndarray, threshold: float, cap: int) -> np.ndarray:
    """Indices of rows predicted with confidence >= ``threshold``, at most ``cap`` per predicted class (the most
    confident first), in ascending order."""
    confidence, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)
    chosen = []
    for cls in np.unique(predicted):
        rows = np.flatnonzero((predicted == cls) & (confidence >= threshold))
        chosen.append(rows[np.argsort(-confidence[rows], kind="stable")[:cap]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _score(result: TrainResult) -> tuple[float, float]:
    """Validation accuracy, then minus loss, of a result's best epoch: larger is better."""
    best = result.history[result.best_epoch - 1]
    return best["val_accuracy"], -best["val_loss"]


def self_train(
    make_head: Callable[[], torch.nn.Module],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    x_unlabeled: torch.Tensor,
    config: TrainConfig,
    settings: SelfTraining,
    progress: bool = True,
) -> SelfTrainResult:
    """Train on the labelled split, then self-train on ``x_unlabeled`` (see the module docstring)."""
    settings.check()
    classes = int(y_train.max()) + 1
    cap = settings.cap or max(1, len(x_unlabeled) // classes)
    head = make_head()
    result = fit(head, x_train, y_train, x_val, y_val, config, progress=progress)
    best = SelfTrainResult(
        head,
        result,
        [
            {
                "round": 0,
                "pseudo_labels": 0,
                "per_class": [0] * classes,
                "val_accuracy": _score(result)[0],
                "val_loss": -_score(result)[1],
                "kept": True,
            }
        ],
    )
    for round_ in range(1, settings.rounds + 1):
        probabilities = torch.softmax(predict(best.head, x_unlabeled), dim=1).numpy()
        chosen = select(probabilities, settings.threshold, cap)
        labels = probabilities[chosen].argmax(axis=1)
        candidate = make_head()
        result = fit(
            candidate,
            torch.cat([x_train, x_unlabeled[chosen]]),
            torch.cat([y_train, torch.from_numpy(labels).to(y_train.dtype)]),
            x_val,
            y_val,
            config,
            progress=progress,
        )
        kept = not settings.stop or _score(result) > _score(best.result)
        record = {
            "round": round_,
            "pseudo_labels": int(len(chosen)),
            "per_class": np.bincount(labels, minlength=classes).tolist(),
            "labeller_val_accuracy": _score(best.result)[0],  # how right the head that labelled them is
            "val_accuracy": _score(result)[0],
            "val_loss": -_score(result)[1],
            "kept": kept,
        }
        best.rounds.append(record)
        log.info(
            "self-training round %d: %d pseudo-labels, val accuracy %.4f (%s)",
            round_,
            len(chosen),
            record["val_accuracy"],
            "kept" if kept else "no better: stop",
        )
        if not kept:
            break
        best.head, best.result = candidate, result
        best.pseudo_index, best.pseudo_label = chosen, labels
        best.pseudo_confidence = probabilities[chosen].max(axis=1)
    return best
