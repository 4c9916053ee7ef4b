"""PNG plots of a training run: curves per epoch and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Train/val loss and val accuracy per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.legend()
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], color="tab:green")
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
            ax.text(col, row, str(value), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_serving(figures: dict, path: str | Path) -> None:
    """`bench serve`: throughput and p99 latency vs client concurrency, one line per server stack, with the
    raw ONNX Runtime best (in process) as a dashed line."""
    fig, (rate_ax, p99_ax) = plt.subplots(1, 2, figsize=(10, 4))
    stacks = list(dict.fromkeys(row["stack"] for row in figures["servers"]))
    for stack in stacks:
        rows = sorted((r for r in figures["servers"] if r["stack"] == stack), key=lambda r: r["concurrency"])
        level = [r["concurrency"] for r in rows]
        rate_ax.plot(level, [r["throughput"] for r in rows], marker="o", label=stack)
        p99_ax.plot(level, [r["p99_ms"] if r["p99_ms"] is not None else np.nan for r in rows], marker="o",
                    label=stack)
    if "ort_best" in figures:
        best = figures["ort_best"]
        rate_ax.axhline(best["throughput"], color="grey", linestyle="--",
                        label=f"ONNX Runtime in process, batch {best['batch']}")
    for ax, label in ((rate_ax, "requests/s (1 image each)"), (p99_ax, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("client concurrency")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    rate_ax.set_ylim(bottom=0)
    fig.suptitle(f"{figures['backbone']}: serving on {figures['cpu_count']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
