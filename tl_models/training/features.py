"""Frozen-backbone feature extraction, computed once and cached on disk.

The cache key covers everything that changes the embeddings: backbone name, weights id,
preprocessing and the data's content hash. A second head on the same data reads the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.files import atomic_write_bytes
from ..core.preprocess import Preprocessing, preprocess_file
from .backbones import LoadedBackbone
from .data import ImageFolderData

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$TL_MODELS_CACHE`` or ``~/.cache/tl-models``."""
    return Path(os.environ.get("TL_MODELS_CACHE", Path.home() / ".cache" / "tl-models"))


def load_images(data: ImageFolderData, preprocessing: Preprocessing, progress: bool = True) -> np.ndarray:
    """Every image of the data set preprocessed to uint8 N×3×H×W."""
    images = [preprocess_file(p, preprocessing) for p in tqdm(data.paths, desc="preprocess", unit="img",
                                                             disable=not progress)]
    return np.stack(images)


@torch.inference_mode()
def embed(backbone: LoadedBackbone, images: np.ndarray, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Run the frozen backbone (eval mode) over uint8 images; returns float32 N×D."""
    backbone.module.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=f"embed {backbone.spec.name}", unit="batch",
                      disable=not progress):
        out.append(backbone.module(torch.from_numpy(images[start:start + batch_size])).numpy())
    return np.concatenate(out).astype(np.float32)


@dataclass
class FeatureCache:
    """Embeddings of a data set under one backbone, cached as ``<cache_dir>/features/<key>.npy``."""

    cache_dir: Path

    @staticmethod
    def key(backbone: LoadedBackbone, data_hash: str) -> str:
        ident = {"backbone": backbone.spec.name, "weights": backbone.weights_id,
                 "preprocessing": backbone.preprocessing.to_dict(), "data": data_hash}
        if backbone.state_sha256 is not None:
            ident["state"] = backbone.state_sha256
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.cache_dir / "features" / f"{key}.npy"

    def get_or_compute(self, backbone: LoadedBackbone, data: ImageFolderData, batch_size: int = 32,
                       progress: bool = True) -> tuple[np.ndarray, bool]:
        """(embeddings N×D, cache hit?) — runs the backbone only on a miss."""
        key = self.key(backbone, data.content_hash())
        path = self.path(key)
        if path.is_file():
            features = np.load(path)
            if features.shape == (len(data.paths), backbone.spec.embedding_dim):
                log.info("feature cache hit: %s", path)
                return features, True
            log.warning("feature cache entry %s has shape %s; recomputing", path, features.shape)
        features = embed(backbone, load_images(data, backbone.preprocessing, progress), batch_size, progress)
        buffer = io.BytesIO()
        np.save(buffer, features)
        atomic_write_bytes(path, buffer.getvalue())
        log.info("feature cache written: %s", path)
        return features, False
