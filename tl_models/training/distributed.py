"""Feature extraction on a Ray cluster (`tl-models build --ray ADDRESS`), with Ray Data: image paths -> decode
tasks -> ``map_batches`` on an actor pool of ONNX Runtime sessions on the build's own ``backbone.onnx`` (one GPU
per actor where the build runs with ``--device cuda``) -> the same shards the local path writes, committed by the
driver as they fill. Ray retries the tasks of a worker that dies and restarts its actors; an image that arrives
twice is kept once, and a shard is committed only when every one of its images has arrived.

Needs ``pip install 'tl-models[scale]'``; ray is imported only on this path. Workers read the images at the paths
the driver sees: a shared file system, or fsspec URLs in a listing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..core.errors import BadRequest
from ..core.preprocess import Preprocessing

log = logging.getLogger(__name__)

ACTOR_RESTARTS = 4  # a killed actor comes back this many times before the build fails
DECODE_CPUS = 0.5  # logical CPUs a decode task asks for (an actor asks for 1)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BadRequest(f"--ray {address!r}: give the cluster's GCS address as HOST:PORT (e.g. 127.0.0.1:6379)")
    return host, int(port)


def connect(address: str, timeout: float = 5.0) -> None:
    """Join the Ray cluster at ``address`` (HOST:PORT of its head); BadRequest in one line, before anything is
    written, when nothing answers there or ray is not installed."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise BadRequest(
            f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
            f"`ray start --head --node-ip-address {host} --port {port}`"
        ) from None
    try:
        import ray
    except ImportError:
        raise BadRequest("--ray needs Ray: pip install 'tl-models[scale]'") from None
    if ray.is_initialized():
        return
    ray.init(address=f"{host}:{port}", logging_level=logging.ERROR, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    log.info("joined Ray cluster %s: %s", address, ray.cluster_resources())


def _decode(batch: dict, preprocessing: dict) -> dict:
    """Ray Data batch function: paths -> uint8 images, preprocessed as serving preprocesses them."""
    from .data import read_image

    spec = Preprocessing.from_dict(preprocessing)
    images = [read_image(p if "://" in p else Path(p), spec) for p in batch["path"]]
    return {"index": batch["index"], "image": np.stack(images)}


class _Embed:
    """Ray Data actor: one ONNX Runtime session on the backbone graph, images -> embeddings."""

    def __init__(self, model: bytes, device: str):
        from .extract import OrtEngine

        self.engine = OrtEngine(model, device)

    def __call__(self, batch: dict) -> dict:
        return {"index": batch["index"], "embedding": self.engine(np.ascontiguousarray(batch["image"]))}


class RayEngine:
    """Extraction on the joined Ray cluster: ONNX Runtime on ``model`` in ``actors`` actors. Its embeddings are the
    local ONNX Runtime engine's, so it shares that engine's feature cache entries."""

    def __init__(self, model: Path, device: str = "cpu", actors: int = 2):
        import ray

        if actors < 1:
            raise BadRequest(f"--ray-actors must be at least 1, got {actors}")
        resources = ray.cluster_resources()
        if resources.get("CPU", 0) < actors + DECODE_CPUS:
            raise BadRequest(
                f"the Ray cluster has {resources.get('CPU', 0):g} CPUs: {actors} actor(s) take one each "
                f"and decoding needs {DECODE_CPUS:g} more; use --ray-actors "
                f"{max(1, int(resources.get('CPU', 0) - DECODE_CPUS))} or a larger cluster"
            )
        if device == "cuda" and resources.get("GPU", 0) < actors:
            raise BadRequest(f"the Ray cluster has {resources.get('GPU', 0):g} GPUs for {actors} actor(s) on cuda")
        self.model, self.device, self.actors = Path(model), device, actors
        self.where = f"Ray ({actors} actors)"

    def ident(self) -> dict:
        return {"engine": "onnxruntime", "device": self.device, "precision": "fp32"}

    def stream(
        self, paths: list, preprocessing: Preprocessing, ranges: list[tuple[int, int]], batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image indices, embeddings) batches for the images of ``paths`` in ``ranges``, in any order."""
        import ray

        items = [{"index": i, "path": str(paths[i])} for start, stop in ranges for i in range(start, stop)]
        dataset: ray.data.Dataset = ray.data.from_items(
            items, override_num_blocks=max(1, len(items) // (4 * batch_size))
        )
        dataset = dataset.map_batches(
            _decode,  # type: ignore[arg-type]  # ray's typing of fn has no room for its fn_kwargs
            fn_kwargs={"preprocessing": preprocessing.to_dict()},
            batch_size=batch_size,
            num_cpus=DECODE_CPUS,
            max_retries=-1,
        )
        dataset = dataset.map_batches(
            _Embed,
            fn_constructor_args=(self.model.read_bytes(), self.device),
            batch_size=batch_size,
            concurrency=self.actors,
            num_gpus=1 if self.device == "cuda" else 0,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=-1,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield batch["index"], batch["embedding"]
