"""Frozen-backbone embeddings, computed once and cached on disk as shards.

The cache key covers everything that changes the embeddings: backbone name, weights id (and saved state),
preprocessing, the data's content hash, and the engine, device and precision that computed them. An entry is a
folder of shards (``shard-NNNNNN.npy``, a fixed range of images each) and ``index.json``, which lists every
committed shard with its image range and sha256; a shard is written whole, then the index, both atomically. A
build killed mid-extraction resumes from the committed shards; a damaged shard (sha256 mismatch) is recomputed.
A second head on the same data reads the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.files import atomic_write_bytes, atomic_write_json, file_lock
from ..core.preprocess import Preprocessing
from .backbones import LoadedBackbone
from .data import ImageFolderData, read_image
from .extract import BATCH, Engine, StreamEngine, TorchEngine, embed_stream

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$TL_MODELS_CACHE`` or ``~/.cache/tl-models``."""
    return Path(os.environ.get("TL_MODELS_CACHE", Path.home() / ".cache" / "tl-models"))


def load_images(data: ImageFolderData, preprocessing: Preprocessing, progress: bool = True) -> np.ndarray:
    """Every image of the data set preprocessed to uint8 N×3×H×W, in memory: for small sets only (calibration,
    fine-tuning's augmented images, benchmarks); extraction streams instead."""
    images = [
        read_image(p, preprocessing) for p in tqdm(data.paths, desc="preprocess", unit="img", disable=not progress)
    ]
    return np.stack(images)


@torch.inference_mode()
def embed(backbone: LoadedBackbone, images: np.ndarray, batch_size: int = BATCH, progress: bool = True) -> np.ndarray:
    """Run the frozen backbone (eval mode) over uint8 images; returns float32 N×D."""
    backbone.module.eval()
    out = []
    for start in tqdm(
        range(0, len(images), batch_size), desc=f"embed {backbone.spec.name}", unit="batch", disable=not progress
    ):
        out.append(backbone.module(torch.from_numpy(images[start : start + batch_size])).numpy())
    return np.concatenate(out).astype(np.float32)


def default_shard_images() -> int:
    """Images per feature cache shard: ``$TL_MODELS_SHARD_IMAGES`` or 4096."""
    return max(1, int(os.environ.get("TL_MODELS_SHARD_IMAGES", "4096")))


INDEX = "index.json"
CACHE_FORMAT = 1


@dataclass
class Features:
    """Embeddings of a data set, and how they were had: all from the cache (``hit``), or how many images this call
    embedded, with the engine that did."""

    embeddings: CachedEmbeddings
    hit: bool
    embedded: int
    shards: int
    shards_cached: int
    engine: dict
    where: str = "in process"  # or the Ray cluster that ran the engine

    @cached_property
    def array(self) -> np.ndarray:
        """Every embedding as one N×D array in memory (for the methods that need them all at once)."""
        return self.embeddings.load()

    def summary(self) -> dict:
        """What a build reports about its extraction (not in the manifest: a resumed build has the same one)."""
        return {
            "embedded": self.embedded,
            "images": len(self.embeddings),
            "shards": self.shards,
            "shards_cached": self.shards_cached,
            "where": self.where,
            **self.engine,
        }


class CachedEmbeddings:
    """The N×D float32 embeddings of a committed cache entry, read from its shard files on demand: ``take(rows)``
    reads just those rows (one positional read each, straight into the result), so what is in memory is what was
    asked for, whatever N. The shards were verified against their sha256 when the entry was opened."""

    def __init__(self, files: list[Path], ranges: list[tuple[int, int]], dim: int):
        self.files, self.dim = files, dim
        self.shape = (ranges[-1][1] if ranges else 0, dim)
        self._starts = np.array([start for start, _ in ranges], dtype=np.int64)
        self._offsets = np.array(
            [_data_offset(path, stop - start, dim) for path, (start, stop) in zip(files, ranges)], dtype=np.int64
        )
        self._row_bytes = dim * 4
        self._fds: list[int] = []

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray | list[int]) -> np.ndarray:
        return self.take(rows)

    def take(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as a len(rows)×D array."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        if not self._fds:
            self._fds = [os.open(path, os.O_RDONLY) for path in self.files]
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        offsets = self._offsets[shard] + (rows - self._starts[shard]) * self._row_bytes
        view, size = out.data.cast("B"), self._row_bytes  # out.data: the array's memoryview
        for i, (number, offset) in enumerate(zip(shard.tolist(), offsets.tolist())):
            if os.preadv(self._fds[number], [view[i * size : (i + 1) * size]], offset) != size:
                raise OSError(f"feature cache shard {self.files[number]} is shorter than its index says")
        return out

    def load(self) -> np.ndarray:
        """Every row, in order, as one array."""
        out = np.empty(self.shape, dtype=np.float32)
        for path, start in zip(self.files, self._starts.tolist()):
            shard = np.load(path, mmap_mode="r")
            out[start : start + len(shard)] = shard
        return out

    def close(self) -> None:
        """Close the shard files (``take`` opens them again when called)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self) -> None:
        self.close()


def _data_offset(path: Path, rows: int, dim: int) -> int:
    """Where the rows of a shard ``.npy`` (rows×dim float32, C order) begin in its file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        if fortran or dtype != np.float32 or shape != (rows, dim):
            raise ValueError(f"feature cache shard {path} is not a C-order float32 {rows}×{dim} matrix")
        return handle.tell()


class _Shards:
    """One cache entry's folder: committed shards by index, verified against ``index.json``."""

    def __init__(self, root: Path, images: int, dim: int, shard_images: int, ident: dict):
        self.root, self.images, self.dim, self.ident = root, images, dim, ident
        index = self._read_index()
        self.shard_images = index.get("shard_images", shard_images) if index else shard_images
        self.committed: dict[int, dict] = {int(s["index"]): s for s in (index or {}).get("shards", [])}

    def _read_index(self) -> dict | None:
        path = self.root / INDEX
        if not path.is_file():
            return None
        try:
            index = json.loads(path.read_text())
            if index.get("format") == CACHE_FORMAT and (index.get("images"), index.get("dim")) == (
                self.images,
                self.dim,
            ):
                return index
            log.warning("feature cache index %s does not describe this entry; recomputing it", path)
        except (ValueError, AttributeError) as exc:
            log.warning("feature cache index %s is not readable (%s); recomputing the entry", path, exc)
        return None

    def ranges(self) -> list[tuple[int, int]]:
        """(start, stop) of every shard of the entry."""
        return [(s, min(s + self.shard_images, self.images)) for s in range(0, self.images, self.shard_images)]

    def verify(self) -> None:
        """Drop committed shards whose file is missing, of the wrong shape or not the bytes the index names."""
        for number, shard in sorted(self.committed.items()):
            path = self.root / shard["file"]
            problem = None if path.is_file() else "missing"
            if problem is None and hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
                problem = "sha256 mismatch"
            if problem is None and (shard["start"], shard["stop"]) != self.ranges()[number]:
                problem = "wrong image range"
            if problem:
                log.warning("feature cache shard %s is damaged (%s): recomputing it", path, problem)
                del self.committed[number]

    def commit(self, number: int, embeddings: np.ndarray) -> None:
        """Write shard ``number`` whole, then the index that lists it."""
        start, stop = self.ranges()[number]
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(embeddings, dtype=np.float32))
        data = buffer.getvalue()
        name = f"shard-{number:06d}.npy"
        atomic_write_bytes(self.root / name, data)
        self.committed[number] = {
            "index": number,
            "file": name,
            "start": start,
            "stop": stop,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write_json(
            self.root / INDEX,
            {
                "format": CACHE_FORMAT,
                "images": self.images,
                "dim": self.dim,
                "shard_images": self.shard_images,
                "ident": self.ident,
                "shards": [self.committed[k] for k in sorted(self.committed)],
            },
        )

    def read(self) -> CachedEmbeddings:
        """The committed shards, in order, as one N×D view read on demand."""
        return CachedEmbeddings(
            [self.root / self.committed[n]["file"] for n in range(len(self.ranges()))], self.ranges(), self.dim
        )


@dataclass
class FeatureCache:
    """Embeddings of data sets under backbones, as sharded entries ``<cache_dir>/features/<key>/``."""

    cache_dir: Path
    shard_images: int = field(default_factory=default_shard_images)

    @staticmethod
    def key(backbone: LoadedBackbone, data_hash: str, engine: dict | None = None) -> str:
        ident = {
            "backbone": backbone.spec.name,
            "weights": backbone.weights_id,
            "preprocessing": backbone.preprocessing.to_dict(),
            "data": data_hash,
        }
        if backbone.state_sha256 is not None:
            ident["state"] = backbone.state_sha256
        if engine is not None:
            ident["engine"] = engine
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.cache_dir / "features" / key

    def features(
        self,
        backbone: LoadedBackbone,
        data: ImageFolderData,
        engine: Engine | StreamEngine | None = None,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> Features:
        """The embeddings of every image of ``data``: committed shards are read (after their sha256 is checked),
        the others computed by ``engine`` (default: torch on the CPU) in batches of ``batch_size`` (default: the
        engine's) and committed one by one."""
        engine = engine or TorchEngine(backbone)
        ident = engine.ident()
        key = self.key(backbone, data.content_hash(), ident)
        root = self.path(key)
        with file_lock(self.cache_dir / "features" / f".{key}.lock"):
            shards = _Shards(root, len(data.paths), backbone.spec.embedding_dim, self.shard_images, ident)
            shards.verify()
            ranges = shards.ranges()
            todo = [n for n in range(len(ranges)) if n not in shards.committed]
            cached = len(ranges) - len(todo)
            embedded = sum(ranges[n][1] - ranges[n][0] for n in todo)
            if todo:
                log.info(
                    "feature cache %s: embedding %d images (%d of %d shards cached)",
                    root,
                    embedded,
                    cached,
                    len(ranges),
                )
                _extract(
                    engine,
                    data,
                    backbone.preprocessing,
                    shards,
                    todo,
                    batch_size or int(getattr(engine, "batch", BATCH)),
                    progress,
                )
            else:
                log.info("feature cache hit: %s", root)
            return Features(
                shards.read(), not todo, embedded, len(ranges), cached, ident, getattr(engine, "where", "in process")
            )

    def get_or_compute(
        self,
        backbone: LoadedBackbone,
        data: ImageFolderData,
        batch_size: int | None = None,
        progress: bool = True,
        engine: Engine | StreamEngine | None = None,
    ) -> tuple[np.ndarray, bool]:
        """(embeddings N×D, cache hit?) — runs the backbone only on what the cache does not hold."""
        found = self.features(backbone, data, engine, batch_size, progress)
        return found.array, found.hit


def _extract(
    engine: Engine | StreamEngine,
    data: ImageFolderData,
    preprocessing: Preprocessing,
    shards: _Shards,
    todo: list[int],
    batch_size: int,
    progress: bool,
) -> None:
    """Embed the images of the shards ``todo`` and commit each shard once all its images have arrived (from the
    engine's own ``stream`` where it has one, as a cluster's engine does, in any order; an image that arrives
    twice is kept once)."""
    every = shards.ranges()
    ranges = [every[n] for n in todo]
    if hasattr(engine, "stream"):
        batches = engine.stream(data.paths, preprocessing, ranges, batch_size)
    else:
        batches = embed_stream(engine, data.paths, preprocessing, ranges, batch_size)
    open_shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # number -> (embeddings, which rows arrived)
    repeated = 0
    with tqdm(
        total=sum(stop - start for start, stop in ranges),
        desc=f"embed ({engine.ident()['engine']})",
        unit="img",
        disable=not progress,
    ) as bar:
        for indices, embeddings in batches:
            numbers = np.asarray(indices) // shards.shard_images
            for number in np.unique(numbers):
                start, stop = every[number]
                if number not in open_shards:
                    open_shards[number] = (
                        np.empty((stop - start, shards.dim), dtype=np.float32),
                        np.zeros(stop - start, dtype=bool),
                    )
                out, arrived = open_shards[number]
                rows = np.asarray(indices)[numbers == number] - start
                fresh = ~arrived[rows]
                repeated += int((~fresh).sum())
                out[rows[fresh]] = embeddings[numbers == number][fresh]
                arrived[rows[fresh]] = True
                bar.update(int(fresh.sum()))
                if arrived.all():
                    shards.commit(int(number), out)
                    del open_shards[number]
    if repeated:
        log.warning("%d images arrived twice (a task retried after a worker died): each kept once", repeated)
    if open_shards:
        missing = sum(int((~arrived).sum()) for _, arrived in open_shards.values())
        raise RuntimeError(f"extraction ended with {missing} images not embedded (shards {sorted(open_shards)})")
