"""Embedding drift: how far the embeddings a service sees have moved from the ones a head was trained on.

The statistic: the distance between the mean of the last ``window`` served embeddings and the mean of the head's
training embeddings, divided by the training spread (the root-mean-square distance of one training embedding from
that mean). 0 means the centre has not moved; 1 means it moved as far as a typical training image lies from the
centre. Without drift it stays near the sampling noise, about ``1/sqrt(window)``, plus the small gap between
training and held-out images (``EmbeddingReference.baseline``, measured on the validation split at build time).

Each head version carries its reference (mean, spread, baseline) in ``embedding_reference.json`` beside its
``head.onnx`` and inside the ONNX file's metadata, so it travels wherever the head goes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

DRIFT_THRESHOLD = 0.5  # above this the served embeddings have moved (README "Judging heads": how it was chosen)
DRIFT_WINDOW = 256  # served embeddings in the window
MIN_WINDOW = 32  # below this many embeddings no drift is reported (sampling noise ~ 1/sqrt(n) dominates)
REFERENCE_CHUNK = 8192  # training embeddings summarised at a time


class Rowed(Protocol):
    """N×D embeddings that can be read a chunk of rows at a time."""

    def __len__(self) -> int: ...

    def __getitem__(self, rows: np.ndarray) -> np.ndarray: ...


def _chunks(rows: np.ndarray) -> list[np.ndarray]:
    return [rows[i : i + REFERENCE_CHUNK] for i in range(0, len(rows), REFERENCE_CHUNK)]


def _mean(embeddings: Rowed, rows: np.ndarray) -> np.ndarray:
    """Mean of ``embeddings[rows]`` in float64, read a chunk at a time."""
    total: np.ndarray = sum(np.asarray(embeddings[chunk], np.float64).sum(axis=0) for chunk in _chunks(rows))
    return total / len(rows)


@dataclass(frozen=True)
class EmbeddingReference:
    """The training embeddings of one head version, summarised: mean, spread, and the drift of its validation
    split (what "no drift" looks like for this data)."""

    mean: np.ndarray
    spread: float
    images: int
    baseline: float | None = None

    @classmethod
    def of(
        cls,
        embeddings: Rowed,
        rows: np.ndarray | list[int] | None = None,
        validation_rows: np.ndarray | list[int] | None = None,
    ) -> EmbeddingReference:
        """The reference of the training embeddings ``embeddings[rows]`` (every row by default), with the drift of
        the validation embeddings ``embeddings[validation_rows]`` as its baseline. Read in chunks (the feature
        cache's shards will do as well as an array): memory stays flat whatever N."""
        rows = np.arange(len(embeddings)) if rows is None else np.asarray(rows)
        mean = _mean(embeddings, rows)
        square = sum(float(((np.asarray(embeddings[chunk], np.float64) - mean) ** 2).sum()) for chunk in _chunks(rows))
        reference = cls(mean, max(float(np.sqrt(square / len(rows))), 1e-12), len(rows))
        if validation_rows is None or not len(validation_rows):
            return reference
        baseline = reference.drift(_mean(embeddings, np.asarray(validation_rows)))
        return cls(mean, reference.spread, len(rows), baseline)

    def drift(self, window_mean: np.ndarray) -> float:
        """Distance of a window's mean embedding from the training mean, in units of the training spread."""
        return float(np.linalg.norm(np.asarray(window_mean, np.float64) - self.mean) / self.spread)

    def to_dict(self) -> dict:
        return {
            "mean": [round(float(v), 7) for v in self.mean],
            "spread": self.spread,
            "images": self.images,
            "baseline": self.baseline,
        }

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingReference:
        return cls(
            np.asarray(data["mean"], np.float64),
            float(data["spread"]),
            int(data["images"]),
            None if data.get("baseline") is None else float(data["baseline"]),
        )


class DriftWindow:
    """The last ``size`` served embeddings (a ring buffer), thread-safe."""

    def __init__(self, dim: int, size: int = DRIFT_WINDOW):
        if size < 1:
            raise ValueError(f"drift window must hold at least 1 embedding, got {size}")
        self.size = size
        self._ring = np.zeros((size, dim), np.float64)
        self._count = 0
        self._next = 0
        self._lock = threading.Lock()

    def add(self, embeddings: np.ndarray) -> None:
        """Push N×D embeddings (the oldest fall out)."""
        with self._lock:
            for row in np.asarray(embeddings, np.float64)[-self.size :]:
                self._count = min(self._count + 1, self.size)
                self._ring[self._next] = row
                self._next = (self._next + 1) % self.size

    def mean(self) -> tuple[np.ndarray | None, int]:
        """The window's mean embedding (None below :data:`MIN_WINDOW`) and how many embeddings it holds."""
        with self._lock:
            if self._count < min(MIN_WINDOW, self.size):
                return None, self._count
            return self._ring[: self._count].mean(axis=0), self._count
