"""Head architectures trained on backbone embeddings: ``linear`` and ``mlp``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.errors import BadRequest

HEAD_KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class HeadSpec:
    """Everything needed to rebuild a head: kind, sizes and dropout."""

    kind: str
    embedding_dim: int
    num_classes: int
    hidden: int = 512
    dropout: float = 0.0
    standardise: bool = False  # a first layer (x - mean) / std with stored statistics (domain adaptation)

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise BadRequest(f"unknown head kind {self.kind!r}; use one of {', '.join(HEAD_KINDS)}")
        if self.num_classes < 2:
            raise BadRequest(f"a head needs at least 2 classes, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadRequest(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HeadSpec:
        return cls(
            **{k: data[k] for k in ("kind", "embedding_dim", "num_classes", "hidden", "dropout")},
            standardise=data.get("standardise", False),
        )  # heads built before it existed have none


class Standardise(nn.Module):
    """``(x - mean) / std`` per embedding dimension, with the statistics stored as buffers (exported as-is)."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_head(spec: HeadSpec) -> nn.Sequential:
    """embedding N×D -> logits N×C (with ``standardise``, a :class:`Standardise` layer first)."""
    first = [Standardise(spec.embedding_dim)] if spec.standardise else []
    if spec.kind == "linear":
        return nn.Sequential(*first, nn.Dropout(spec.dropout), nn.Linear(spec.embedding_dim, spec.num_classes))
    return nn.Sequential(
        *first,
        nn.Linear(spec.embedding_dim, spec.hidden),
        nn.ReLU(),
        nn.Dropout(spec.dropout),
        nn.Linear(spec.hidden, spec.num_classes),
    )
