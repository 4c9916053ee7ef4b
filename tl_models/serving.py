"""The classifier core behind the BentoML service: one backbone session, a registry of heads, routing, batching.

No BentoML in here: ``service.py`` maps HTTP onto :class:`Classifier`, which

* runs one backbone session, loaded and warmed up once; concurrent requests share backbone passes through
  :class:`MicroBatcher` (adaptive: whatever queued up while a pass ran goes into the next one);
* keeps a registry of head sessions ``(name, version) -> LoadedHead``; a head enters it only after it passed
  every check (sha256, ONNX Runtime load, embedding dim = backbone output, a test run), so a bad head never
  disturbs the live ones and no request ever meets a half-loaded head;
* routes every request through :mod:`tl_models.routing` (weighted sticky split, ``X-TL-Head`` override). The
  route file and a head catalog (``name:version -> where its head.onnx lives``) sit in a state directory
  shared by all workers: a swap done by one worker is seen by the others on their next request, and a worker
  routed to a version it has not loaded loads it from the catalog before answering.

Client mistakes raise :class:`ServingError` with a 4xx status; the service turns it into the HTTP answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import numpy as np

from .artifacts import BuildError, atomic_write_bytes, file_sha256
from .batching import MicroBatcher
from .metrics import Metrics
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, Preprocessing, preprocess_bytes
from .routing import Route, RoutingError, RoutingState, parse_weights
from .runtime import create_session
from .serving_heads import (HEAD_ONNX, BackboneSource, HeadCatalog, HeadSource, LoadedHead, ServingError,
                            check_head_name, load_head, read_verified)

log = logging.getLogger(__name__)


def _blank_image(image_format: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format=image_format)
    return buffer.getvalue()


@dataclass
class ServingConfig:
    """Knobs of the core, read from ``TL_MODELS_*`` environment variables by :meth:`from_env`."""

    state_dir: Path
    weights: dict[str, float] | None = None
    top_k: int = 5
    max_batch: int = 16
    route_poll: float = 0.0
    providers: str | None = None
    threads: int | None = None
    warmup_batches: tuple[int, ...] = field(default=(1,))
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_tensor_batch: int = 256
    build_roots: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, default_state_dir: Path) -> "ServingConfig":
        env = os.environ
        roots = env.get("TL_MODELS_BUILD_ROOTS")
        return cls(state_dir=Path(env.get("TL_MODELS_STATE_DIR") or default_state_dir),
                   weights=parse_weights(env["TL_MODELS_WEIGHTS"]) if env.get("TL_MODELS_WEIGHTS") else None,
                   top_k=int(env.get("TL_MODELS_TOP_K", "5")), max_batch=int(env.get("TL_MODELS_MAX_BATCH", "16")),
                   route_poll=float(env.get("TL_MODELS_ROUTE_POLL", "0")), providers=env.get("TL_MODELS_PROVIDERS"),
                   threads=int(env["TL_MODELS_THREADS"]) if env.get("TL_MODELS_THREADS") else None,
                   max_pixels=int(env.get("TL_MODELS_MAX_PIXELS", DEFAULT_MAX_PIXELS)),
                   max_tensor_batch=int(env.get("TL_MODELS_MAX_TENSOR_BATCH", "256")),
                   build_roots=tuple(Path(r) for r in roots.split(os.pathsep) if r) if roots else (Path.cwd(),))



class Classifier:
    """One backbone session, a head registry and the shared route; see the module docstring."""

    def __init__(self, backbone: BackboneSource, heads: Sequence[HeadSource], config: ServingConfig):
        self.ready = False
        self.config = config
        self.backbone_source = backbone
        data = read_verified(backbone.path, backbone.sha256, "backbone")
        self.backbone = create_session(data, providers=config.providers, threads=config.threads, name="backbone",
                                       spin=False)
        self._input = self.backbone.get_inputs()[0]
        self._output = self.backbone.get_outputs()[0]
        self.spec = Preprocessing.from_dict(backbone.preprocessing)
        self.input_size = (3, self.spec.crop_size, self.spec.crop_size)
        self.embedding_dim = int(self._run_backbone(np.zeros((1, *self.input_size), np.uint8)).shape[1])
        self.metrics = Metrics.get()
        self.batcher = MicroBatcher(self._run_backbone, config.max_batch, self.metrics.batch.observe)
        self.catalog = HeadCatalog(config.state_dir / "heads.json")
        self.routing = RoutingState(config.state_dir / "route.json", poll=config.route_poll)
        self._heads: dict[tuple[str, int], LoadedHead] = {}
        self._load_lock = threading.Lock()
        self._revision = -1
        self._bootstrap(heads)

    # -- startup

    def _bootstrap(self, heads: Sequence[HeadSource]) -> None:
        """Register the declared heads; create the route (latest version of each head) if none exists yet."""
        if not heads and not self.routing.path.exists():
            raise BuildError(f"no heads to serve for build {self.backbone_source.build!r}")
        with self.catalog.locked():
            self.catalog.put(heads, overwrite=True)
            if not self.routing.path.exists():
                latest: dict[str, int] = {}
                for head in heads:
                    latest[head.name] = max(latest.get(head.name, 0), head.version)
                weights = self.config.weights or {name: 1.0 for name in latest}
                self.routing.update(weights=weights, versions=latest)
        route = self.routing.current()
        try:
            for name, version in route.versions.items():
                self._head(name, version)
        except ServingError as exc:
            raise BuildError(f"cannot load the routed heads from {self.config.state_dir}: {exc.message} "
                             "(remove that state directory or point TL_MODELS_STATE_DIR elsewhere)") from None
        self._revision = route.revision
        log.info("serving %s: heads %s, weights %s", self.backbone_source.build, route.versions, route.weights)

    def warm_up(self) -> None:
        """Run the backbone at the warm-up batch sizes and every loaded head once; then the service is ready."""
        for size in sorted({*self.config.warmup_batches, self.config.max_batch}):
            self._run_backbone(np.zeros((size, *self.input_size), np.uint8))
        for image_format in ("PNG", "JPEG"):  # loads PIL's decoders now rather than in the first request
            self.preprocess(_blank_image(image_format))
        for head in list(self._heads.values()):
            head.logits(np.zeros((1, self.embedding_dim), np.float32))
        self.ready = True

    def _run_backbone(self, images: np.ndarray) -> np.ndarray:
        return self.backbone.run([self._output.name], {self._input.name: images})[0]

    # -- heads

    def _head(self, name: str, version: int) -> LoadedHead:
        """The loaded head version, loading it from the catalog first if this worker has not yet (blocking)."""
        head = self._heads.get((name, version))
        if head is not None:
            return head
        with self._load_lock:
            head = self._heads.get((name, version))
            if head is None:
                source = self.catalog.get(name, version)
                if source is None:
                    raise ServingError(f"head {name}:{version} is routed but missing from the head catalog "
                                       f"{self.catalog.path}", 503)
                head = self._validated(source)[0]
                self._heads[(name, version)] = head
                log.info("loaded head %s from %s", source.key, source.origin)
        return head

    def _validated(self, source: HeadSource) -> tuple[LoadedHead, bytes]:
        data = read_verified(source.path, source.sha256, f"head {source.key}")
        head = load_head(source, data, self.embedding_dim, self.backbone_source.sha256, self.config.providers)
        return head, data

    def _forget_unrouted(self, route: Route) -> None:
        """Drop head versions the route no longer names (requests in flight keep their reference)."""
        with self._load_lock:
            for key in [k for k in self._heads if route.versions.get(k[0]) != k[1]]:
                del self._heads[key]
            self._revision = route.revision

    async def resolve(self, key: str | None = None, head: str | None = None, endpoint: str = "") -> LoadedHead:
        """The head (and version) that answers one request: ``head`` if given, else the weighted split."""
        route = self.routing.current()
        try:
            name, version = route.choose(key=key or None, head=head or None)
        except RoutingError as exc:
            self.metrics.errors.labels("", "", endpoint, "unknown_head" if head else "no_route").inc()
            raise ServingError(str(exc), 404 if head else 503) from None
        loaded = self._heads.get((name, version)) or await asyncio.to_thread(self._head, name, version)
        if route.revision != self._revision:
            self._forget_unrouted(route)
        return loaded

    # -- requests

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> uint8 3×H×W; ServingError 400 with the reason for anything that is no image."""
        try:
            return preprocess_bytes(data, self.spec, self.config.max_pixels)
        except ImageError as exc:
            raise ServingError(f"bad image: {exc}") from None

    def tensor_input(self, tensor: np.ndarray) -> np.ndarray:
        """A client tensor (N×3×H×W or 3×H×W; uint8, or integer/float pixel values 0..255) -> uint8 batch."""
        array = np.asarray(tensor)
        expected = "×".join(map(str, self.input_size))
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != self.input_size:
            raise ServingError(f"tensor must have shape N×{expected} (or {expected}), got {tuple(array.shape)}")
        if not 1 <= len(array) <= self.config.max_tensor_batch:
            raise ServingError(f"tensor batch must hold 1 to {self.config.max_tensor_batch} images, got {len(array)}")
        if array.dtype == np.uint8:
            return np.ascontiguousarray(array)
        if array.dtype.kind not in "iuf":
            raise ServingError(f"tensor must hold numbers (pixel values 0..255), got dtype {array.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ServingError("tensor holds NaN or infinite values")
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise ServingError(f"tensor values must be pixel values in 0..255 (normalisation happens in the "
                               f"model), got {low}..{high}")
        return np.rint(array).astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)

    @asynccontextmanager
    async def _observed(self, head: LoadedHead, endpoint: str) -> AsyncIterator[None]:
        labels = (head.name, str(head.version), endpoint)
        self.metrics.requests.labels(*labels).inc()
        start = time.perf_counter()
        try:
            yield
        except ServingError:
            self.metrics.errors.labels(*labels, "bad_input").inc()
            raise
        except Exception:
            self.metrics.errors.labels(*labels, "internal").inc()
            raise
        finally:
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)

    def _top_k(self, top_k: int | None) -> int:
        top_k = self.config.top_k if top_k is None else top_k
        if top_k < 1:
            raise ServingError(f"top_k must be at least 1, got {top_k}")
        return top_k

    async def classify(self, data: bytes, key: str | None = None, head: str | None = None,
                       top_k: int | None = None) -> dict:
        """One encoded image -> top-k labels and scores from the routed head."""
        k = self._top_k(top_k)
        chosen = await self.resolve(key, head, "classify")
        async with self._observed(chosen, "classify"):
            image = await asyncio.to_thread(self.preprocess, data)
            embedding = await self.batcher.submit(image[None])
            return chosen.answer(chosen.logits(embedding), k)[0]

    async def predict(self, tensor: np.ndarray, key: str | None = None, head: str | None = None,
                      top_k: int | None = None) -> dict:
        """A preprocessed tensor batch -> logits and top-k per image, all from one routed head."""
        k = self._top_k(top_k)
        chosen = await self.resolve(key, head, "predict")
        async with self._observed(chosen, "predict"):
            batch = self.tensor_input(tensor)
            logits = chosen.logits(await self.batcher.submit(batch))
            answers = chosen.answer(logits, k)
            return {"head": chosen.name, "version": chosen.version, "logits": logits.tolist(),
                    "predictions": [a["predictions"] for a in answers]}

    async def embed(self, data: bytes) -> dict:
        """One encoded image -> its backbone embedding."""
        image = await asyncio.to_thread(self.preprocess, data)
        embedding = await self.batcher.submit(image[None])
        return {"embedding": embedding[0].tolist(), "dim": self.embedding_dim}

    # -- admin

    def status(self) -> dict:
        """Live heads with versions, weights, traffic shares and request counts (all workers)."""
        route = self.routing.current()
        counts = Metrics.request_counts()
        total = sum(w for w in route.weights.values() if w > 0)
        catalog = self.catalog.entries()
        heads = []
        for name in sorted(route.versions):
            version = route.versions[name]
            weight = route.weights.get(name, 0.0)
            by_version = counts.get(name, {})
            source = catalog.get(f"{name}:{version}")
            heads.append({"name": name, "version": version, "weight": weight,
                          "share": weight / total if total else 0.0, "requests": sum(by_version.values()),
                          "requests_by_version": by_version, "origin": source.origin if source else None})
        return {"ready": self.ready, "build": self.backbone_source.build, "revision": route.revision,
                "backbone": {"origin": self.backbone_source.origin, "sha256": self.backbone_source.sha256,
                             "embedding_dim": self.embedding_dim, "input_size": list(self.input_size)},
                "heads": heads, "available": sorted(catalog)}

    def _update_route(self, **changes) -> Route:
        try:
            route = self.routing.update(**changes)
        except RoutingError as exc:
            raise ServingError(str(exc), 404 if "unknown head" in str(exc) else 400) from None
        self._forget_unrouted(route)
        return route

    async def set_weights(self, weights: dict[str, float]) -> dict:
        """Replace the traffic weights (every named head must be live)."""
        if not weights:
            raise ServingError("give at least one weight, e.g. {\"a\": 90, \"b\": 10}")
        await asyncio.to_thread(self._admin, lambda: self._update_route(weights=weights))
        return self.status()

    async def load(self, source: HeadSource, live: bool = True, weight: float | None = None) -> dict:
        """Validate and load a head version, record it in the catalog and (``live``) route its name to it.

        The old version of that name is dropped only after the route points at the new one."""
        await asyncio.to_thread(self._admin, lambda: self._load(source, live, weight))
        return self.status()

    def _load(self, source: HeadSource, live: bool, weight: float | None) -> None:
        check_head_name(source.name)  # it becomes a directory name in the state directory
        head, data = self._validated(source)  # raises before anything changed
        known = self.catalog.get(source.name, source.version)
        if known is not None and known.sha256 != source.sha256:
            raise ServingError(f"head {source.key} is already known with another head.onnx (from {known.origin}); "
                               "give the new head a new version", 409)
        if source.origin.startswith("build:"):
            source = self._stash(source, data)
            head.source = source
        self.catalog.put([source])
        with self._load_lock:
            self._heads[(source.name, source.version)] = head
        if live:
            route = RoutingState(self.routing.path, poll=0).current()  # fresh read: no cached weights
            weights = None
            if weight is not None or source.name not in route.weights:
                default = 0.0 if any(w > 0 for w in route.weights.values()) else 1.0
                weights = {**route.weights, source.name: default if weight is None else weight}
            self._update_route(versions={source.name: source.version}, weights=weights)
        log.info("head %s loaded from %s%s", source.key, source.origin, " and live" if live else "")

    def _stash(self, source: HeadSource, data: bytes) -> HeadSource:
        """Copy a build directory's head.onnx into the state directory, so every worker loads the same bytes
        even if the build directory changes later."""
        target = self.config.state_dir / "heads" / source.name / str(source.version) / HEAD_ONNX
        if not target.is_file() or file_sha256(target) != source.sha256:
            atomic_write_bytes(target, data)
        return HeadSource(**{**source.to_dict(), "labels": source.labels, "path": str(target)})

    async def retire(self, name: str) -> dict:
        """Take a head out of the route (weights and live version); its requests go to the other heads."""
        await asyncio.to_thread(self._admin, lambda: self._retire(name))
        return self.status()

    def _retire(self, name: str) -> None:
        route = RoutingState(self.routing.path, poll=0).current()
        if name in route.versions and not any(w > 0 for n, w in route.weights.items() if n != name):
            raise ServingError(f"retiring {name!r} would leave no head with traffic weight: "
                               "give another head a weight first", 409)
        self._update_route(retire=(name,))

    def _admin(self, change: Callable[[], object]) -> None:
        with self.catalog.locked():  # admin changes from all workers are serialised
            change()
