"""Streaming feature extraction: background threads decode images into a bounded queue of batches, and the
backbone runs on each batch as it arrives, on one of two engines:

- ``onnxruntime``: the build's own ``backbone.onnx`` (heads then train on exactly the embeddings serving computes;
  the parity check bounds its difference to torch), on the CPU or, with ``--device cuda``, CUDA's provider;
- ``torch``: the frozen module in eval mode, on the CPU or a CUDA device (a copy moves there; the build's module
  stays on the CPU for export and parity).

``auto`` is ONNX Runtime on the CPU (4-6x torch eager for mobilenet_v2 here, ``tl-models bench build``) and torch
on CUDA where one is visible. Pixels never pile up: at most ``2 * workers`` decoded batches exist at once.

On the CPU the ONNX Runtime engine runs :func:`extraction_sessions` sessions side by side, each on its own batch
with its share of the cores: decoding shares those cores, and one session's intra-op threads wait at every parallel
section for a thread a decoder has preempted; single-threaded sessions do not (README, "Build at scale").
"""

from __future__ import annotations

import copy
import os
import queue
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..core.errors import BadRequest
from ..core.names import EMBEDDING, IMAGE
from ..core.preprocess import ImageError, Preprocessing
from ..core.runtime import active_provider, create_session
from .backbones import LoadedBackbone
from .config import DEVICES, ENGINES
from .data import DataError, ImagePath, decode_workers, read_image

BATCH = 32  # images per extraction batch


class Engine(Protocol):
    """A backbone that turns uint8 B×3×H×W batches into float32 B×D embeddings, ``parallel`` batches at once
    (called from that many threads), best fed ``batch`` images a call."""

    parallel: int
    batch: int

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def ident(self) -> dict:
        """What the feature cache key and the manifest record: engine, device, precision."""
        ...


class StreamEngine(Protocol):
    """An engine that embeds ranges of images itself, in any order (a cluster's: ``distributed.RayEngine``); the
    feature cache takes its ``stream`` in place of :func:`embed_stream`."""

    def ident(self) -> dict: ...

    def stream(
        self, paths: list, preprocessing: Preprocessing, ranges: list[tuple[int, int]], batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


class TorchEngine:
    """The frozen module (eval mode, inference mode) on ``device``."""

    parallel, batch = 1, BATCH

    def __init__(self, backbone: LoadedBackbone, device: str = "cpu"):
        self.device = torch.device(device)
        module = backbone.module if self.device.type == "cpu" else copy.deepcopy(backbone.module).to(self.device)
        self.module = module.eval()

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        inputs = torch.from_numpy(batch).to(self.device, non_blocking=True)
        return self.module(inputs).float().cpu().numpy()

    def ident(self) -> dict:
        return {"engine": "torch", "device": self.device.type, "precision": "fp32"}


def extraction_sessions() -> int:
    """ONNX Runtime sessions that CPU extraction runs side by side: ``$TL_MODELS_EXTRACT_SESSIONS``, else the CPU
    count up to 4 (each session holds its own copy of the weights)."""
    return max(1, int(os.environ.get("TL_MODELS_EXTRACT_SESSIONS", "0")) or min(4, os.cpu_count() or 1))


class OrtEngine:
    """ONNX Runtime on a backbone graph (``image`` -> ``embedding``): ``sessions`` sessions on the CPU, each with
    an equal share of the cores, one batch at a time and ``BATCH / sessions`` images a batch (at least 8: as many
    images in flight as one session at ``BATCH``); one session on CUDA. Embeddings do not depend on either."""

    def __init__(self, model: str | Path | bytes, device: str = "cpu", sessions: int = 1):
        self.device = device
        self.parallel = 1 if device == "cuda" else max(1, sessions)
        self.batch = max(8, BATCH // self.parallel)
        threads = None if self.parallel == 1 else max(1, (os.cpu_count() or 1) // self.parallel)
        sessions_made = [
            create_session(model, providers="cuda" if device == "cuda" else "cpu", threads=threads, name="extraction")
            for _ in range(self.parallel)
        ]
        if device == "cuda" and active_provider(sessions_made[0]) != "CUDAExecutionProvider":
            raise BadRequest(
                "--device cuda: ONNX Runtime has no CUDA provider here (onnxruntime-gpu and a CUDA "
                "driver are needed); use --engine torch or --device cpu"
            )
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for session in sessions_made:
            self._free.put(session)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        session = self._free.get()
        try:
            return session.run([EMBEDDING], {IMAGE: batch})[0]
        finally:
            self._free.put(session)

    def ident(self) -> dict:
        return {"engine": "onnxruntime", "device": self.device, "precision": "fp32"}


def resolve_device(requested: str = "auto") -> str:
    """``auto``: ``cuda`` where torch sees a CUDA device, else ``cpu``; ``cuda`` without one is a BadRequest."""
    if requested not in DEVICES:
        raise BadRequest(f"unknown device {requested!r}; use one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise BadRequest("--device cuda: torch sees no CUDA device here; use --device cpu (or auto)")
    return "cuda" if requested == "cuda" or (requested == "auto" and available) else "cpu"


def resolve_engine(requested: str, device: str) -> str:
    """``auto``: ONNX Runtime on the CPU, torch on CUDA."""
    if requested not in ENGINES:
        raise BadRequest(f"unknown extraction engine {requested!r}; use one of {', '.join(ENGINES)}")
    if requested != "auto":
        return requested
    return "torch" if device == "cuda" else "onnxruntime"


def _read_checked(path: ImagePath, preprocessing: Preprocessing) -> np.ndarray:
    """:func:`read_image`, with the file named when it no longer reads (it passed the scan, then changed)."""
    try:
        return read_image(path, preprocessing)
    except (ImageError, OSError) as exc:
        raise DataError(
            f"image {path} passed the scan but no longer reads ({exc}): it changed while the build ran; "
            "what was embedded before it is kept, run the build again to skip it"
        ) from None


def _decode_batch(paths: list[ImagePath], preprocessing: Preprocessing) -> np.ndarray:
    return np.stack([_read_checked(p, preprocessing) for p in paths])


class DecodedImages:
    """The images of ``paths`` decoded on demand: ``take(rows)`` decodes just those (on ``workers`` threads), so
    training on images (fine-tuning's stage 2) holds a batch, not the data set. Use it as a context manager."""

    def __init__(self, paths: list[ImagePath], preprocessing: Preprocessing, workers: int | None = None):
        self.paths, self.preprocessing = paths, preprocessing
        self._pool = ThreadPoolExecutor(workers or decode_workers(), thread_name_prefix="tl-models-decode")

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """uint8 len(rows)×3×H×W, in the order of ``rows``."""
        return np.stack(
            list(self._pool.map(lambda i: _read_checked(self.paths[i], self.preprocessing), np.asarray(rows).tolist()))
        )

    def __enter__(self) -> DecodedImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(cancel_futures=True)


def decoded_batches(
    paths: list[ImagePath],
    preprocessing: Preprocessing,
    ranges: list[tuple[int, int]],
    batch_size: int = BATCH,
    workers: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, uint8 B×3×H×W) for the images of ``paths`` in each ``(start, stop)`` range, in order; batches
    never cross a range's end. Decoded by ``workers`` threads, at most ``2 * workers`` batches ahead."""
    workers = workers or decode_workers()
    starts = ((s, min(s + batch_size, stop)) for start, stop in ranges for s in range(start, stop, batch_size))
    pending: deque[tuple[int, Future]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="tl-models-decode") as pool:
        try:
            for start, stop in starts:
                pending.append((start, pool.submit(_decode_batch, paths[start:stop], preprocessing)))
                if len(pending) >= 2 * workers:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def embed_stream(
    engine: Engine,
    paths: list[ImagePath],
    preprocessing: Preprocessing,
    ranges: list[tuple[int, int]],
    batch_size: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image indices, embeddings) for the images of ``paths`` in ``ranges``, in order: decoding threads feed
    ``engine`` in this process, ``engine.parallel`` batches at a time. An image that no longer reads ends the
    stream with its DataError after every batch before it."""
    pending: deque[tuple[int, Future]] = deque()

    def finished(keep: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while len(pending) > keep:
            first, future = pending.popleft()
            embeddings = future.result()
            yield np.arange(first, first + len(embeddings)), embeddings

    with ThreadPoolExecutor(engine.parallel, thread_name_prefix="tl-models-embed") as pool:
        try:
            for first, batch in decoded_batches(paths, preprocessing, ranges, batch_size or engine.batch):
                pending.append((first, pool.submit(engine, batch)))
                yield from finished(engine.parallel - 1)
        except DataError:
            yield from finished(0)
            raise
        yield from finished(0)
