"""PNG plots of a training run: curves per epoch and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Train/val loss and val accuracy per epoch; a fine-tuned build's stage 2 starts at a dashed line."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    loss_ax.set_xlabel("epoch")
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], color="tab:green")
    stage2 = [h["epoch"] for h in history if h.get("stage") == 2]
    if stage2:
        for ax in (loss_ax, acc_ax):
            ax.axvline(stage2[0] - 0.5, color="grey", linestyle="--", label="stage 2: fine-tune")
    loss_ax.legend()
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("val accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], labels: list[str], path: str | Path) -> None:
    """Confusion matrix with counts (rows = true class)."""
    matrix = np.asarray(confusion)
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 30:
        for (row, col), value in np.ndenumerate(matrix):
            ax.text(
                col,
                row,
                str(value),
                ha="center",
                va="center",
                color="white" if value > matrix.max() / 2 else "black",
                fontsize=8,
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
