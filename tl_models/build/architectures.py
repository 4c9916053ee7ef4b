"""Head architectures trained on backbone embeddings: ``linear`` and ``mlp``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    def from_dict(cls, data: dict) -> "HeadSpec":
        return cls(**{k: data[k] for k in ("kind", "embedding_dim", "num_classes", "hidden", "dropout")})


def build_head(spec: HeadSpec) -> nn.Module:
    """embedding N×D -> logits N×C."""
    if spec.kind == "linear":
        return nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(spec.embedding_dim, spec.num_classes))
    return nn.Sequential(
        nn.Linear(spec.embedding_dim, spec.hidden), nn.ReLU(), nn.Dropout(spec.dropout),
        nn.Linear(spec.hidden, spec.num_classes),
    )
