"""Training settings, torch-free so that the CLI can show their defaults without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and stopping settings."""

    epochs: int = 50
    lr: float = 1e-2
    backbone_lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    patience: int = 10
    seed: int = 0
