"""Streaming feature extraction: background threads decode images into a bounded queue of batches, and the
backbone runs on each batch as it arrives, on one of two engines:

- ``onnxruntime``: the build's own ``backbone.onnx`` (heads then train on exactly the embeddings serving computes;
  the parity check bounds its difference to torch), on the CPU or, with ``--device cuda``, CUDA's provider;
- ``torch``: the frozen module in eval mode, on the CPU or a CUDA device (a copy moves there; the build's module
  stays on the CPU for export and parity).

``auto`` is ONNX Runtime on the CPU (4-6x torch eager for mobilenet_v2 here, ``tl-models bench build``) and torch
on CUDA where one is visible. Pixels never pile up: at most ``2 * workers`` decoded batches exist at once.
"""

from __future__ import annotations

import copy
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from ..core.errors import BadRequest
from ..core.names import EMBEDDING, IMAGE
from ..core.preprocess import Preprocessing
from ..core.runtime import active_provider, create_session
from .backbones import LoadedBackbone
from .config import DEVICES, ENGINES
from .data import ImagePath, decode_workers, read_image

BATCH = 32  # images per extraction batch


class Engine(Protocol):
    """A backbone that turns uint8 B×3×H×W batches into float32 B×D embeddings."""

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def ident(self) -> dict:
        """What the feature cache key and the manifest record: engine, device, precision."""
        ...


class TorchEngine:
    """The frozen module (eval mode, inference mode) on ``device``."""

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


class OrtEngine:
    """An ONNX Runtime session on a backbone graph (``image`` -> ``embedding``)."""

    def __init__(self, model: str | Path, device: str = "cpu"):
        self.device = device
        self.session = create_session(model, providers="cuda" if device == "cuda" else "cpu", name="extraction")
        if device == "cuda" and active_provider(self.session) != "CUDAExecutionProvider":
            raise BadRequest("--device cuda: ONNX Runtime has no CUDA provider here (onnxruntime-gpu and a CUDA "
                             "driver are needed); use --engine torch or --device cpu")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([EMBEDDING], {IMAGE: batch})[0]

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


def _decode_batch(paths: list[ImagePath], preprocessing: Preprocessing) -> np.ndarray:
    return np.stack([read_image(p, preprocessing) for p in paths])


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
        return np.stack(list(self._pool.map(lambda i: read_image(self.paths[i], self.preprocessing),
                                            np.asarray(rows).tolist())))

    def __enter__(self) -> "DecodedImages":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(cancel_futures=True)


def decoded_batches(paths: list[ImagePath], preprocessing: Preprocessing, ranges: list[tuple[int, int]],
                    batch_size: int = BATCH, workers: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
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
