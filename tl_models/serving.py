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
import fcntl
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

import numpy as np

from .artifacts import BuildDir, BuildError, atomic_write_bytes, atomic_write_json, file_sha256
from .preprocess import ImageError, Preprocessing, preprocess_bytes
from .routing import Route, RoutingError, RoutingState
from .runtime import create_session

log = logging.getLogger(__name__)

# File names of tl_models.export (not imported here: it pulls in torch, which serving does without).
BACKBONE_ONNX, HEAD_ONNX = "backbone.onnx", "head.onnx"
MAX_TENSOR_BATCH = 256


class ServingError(Exception):
    """A request the service refuses; ``status`` is the HTTP status to answer with (4xx: the client's mistake)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone graph lives and what it expects."""

    path: str
    sha256: str
    preprocessing: dict
    labels: tuple[str, ...]
    build: str
    origin: str


@dataclass(frozen=True)
class HeadSource:
    """Where one head version's ``head.onnx`` lives, its sha256, labels and the backbone it was trained on."""

    name: str
    version: int
    path: str
    sha256: str
    labels: tuple[str, ...]
    backbone_sha256: str
    origin: str

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    def to_dict(self) -> dict:
        return {**asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict) -> "HeadSource":
        return cls(name=data["name"], version=int(data["version"]), path=data["path"], sha256=data["sha256"],
                   labels=tuple(data["labels"]), backbone_sha256=data["backbone_sha256"], origin=data["origin"])


# ---------------------------------------------------------------- build directories as a source

def sources_from_build(path: str | Path) -> tuple[BackboneSource, list[HeadSource]]:
    """The backbone and every exported head version of a build directory (as recorded in its manifest)."""
    build = BuildDir(path)
    manifest = build.manifest()
    if BACKBONE_ONNX not in manifest.get("files", {}):
        raise BuildError(f"{build.path} has no {BACKBONE_ONNX}; run `tl-models export {build.path}` first")
    backbone = BackboneSource(path=str(build.path / BACKBONE_ONNX), sha256=manifest["files"][BACKBONE_ONNX],
                              preprocessing=manifest["preprocessing"], labels=tuple(manifest["labels"]),
                              build=manifest["name"], origin=f"build:{build.path.resolve()}")
    heads = [_head_from_manifest(build, manifest, entry) for entry in manifest["heads"]
             if f"{entry['path']}/{HEAD_ONNX}" in manifest["files"]]
    return backbone, heads


def head_source_from_build(path: str | Path, name: str, version: int | None = None) -> HeadSource:
    """One head version of a build directory (the latest when ``version`` is None); ServingError 404 if absent."""
    build = BuildDir(path)
    try:
        manifest = build.manifest()
        entry = build.head(name, version, manifest)
    except BuildError as exc:
        raise ServingError(str(exc), 404) from None
    if f"{entry['path']}/{HEAD_ONNX}" not in manifest["files"]:
        raise ServingError(f"head {name}:{entry['version']} of {build.path} has no {HEAD_ONNX}; "
                           f"run `tl-models export {build.path}`", 404)
    return _head_from_manifest(build, manifest, entry)


def _head_from_manifest(build: BuildDir, manifest: dict, entry: dict) -> HeadSource:
    rel = f"{entry['path']}/{HEAD_ONNX}"
    return HeadSource(name=entry["name"], version=int(entry["version"]), path=str(build.path / rel),
                      sha256=manifest["files"][rel], labels=tuple(manifest["labels"]),
                      backbone_sha256=manifest["files"].get(BACKBONE_ONNX, ""),
                      origin=f"build:{build.path.resolve()}")


# ---------------------------------------------------------------- heads

@dataclass
class LoadedHead:
    """A validated head session: ``embedding (N×D) -> logits (N×C)``."""

    source: HeadSource
    session: object
    input_name: str
    output_name: str

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> int:
        return self.source.version

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: embeddings.astype(np.float32, copy=False)})[0]

    def answer(self, logits: np.ndarray, top_k: int) -> list[dict]:
        """Top-k labels with softmax scores per row, and which head answered."""
        scores = softmax(logits)
        k = max(1, min(top_k, scores.shape[1]))
        answers = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            answers.append({"head": self.name, "version": self.version,
                            "predictions": [{"label": self.source.labels[i], "score": float(row[i])} for i in order]})
        return answers


def _blank_image(image_format: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format=image_format)
    return buffer.getvalue()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def read_verified(path: str | Path, sha256: str, what: str) -> bytes:
    """The bytes of a model file after checking its sha256 (ServingError 422 when missing or different)."""
    import hashlib

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ServingError(f"{what}: cannot read {path}: {exc.strerror}", 422) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ServingError(f"{what}: {path} fails its sha256 check (expected {sha256[:12]}…, got {actual[:12]}…)", 422)
    return data


def load_head(source: HeadSource, data: bytes, embedding_dim: int, backbone_sha256: str,
              providers: str | None = None) -> LoadedHead:
    """Create and validate a head session from verified bytes; ServingError (409/422) on any mismatch."""
    what = f"head {source.key}"
    if source.backbone_sha256 and source.backbone_sha256 != backbone_sha256:
        raise ServingError(f"{what} was trained on another backbone (sha256 {source.backbone_sha256[:12]}…, "
                           f"this service runs {backbone_sha256[:12]}…)", 409)
    try:
        session = create_session(data, providers=providers, name=f"head {source.key}")
    except Exception as exc:  # ORT raises its own exception types for malformed graphs
        raise ServingError(f"{what}: not a loadable ONNX model: {exc}", 422) from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ServingError(f"{what}: expected one input and one output, got {len(inputs)} and {len(outputs)}", 422)
    shape = inputs[0].shape
    if len(shape) != 2 or shape[1] != embedding_dim:
        raise ServingError(f"{what}: takes input of shape {shape}, the backbone produces embeddings of "
                           f"dimension {embedding_dim}", 422)
    head = LoadedHead(source, session, inputs[0].name, outputs[0].name)
    try:
        logits = head.logits(np.zeros((2, embedding_dim), dtype=np.float32))
    except Exception as exc:
        raise ServingError(f"{what}: test run failed: {exc}", 422) from None
    if logits.shape != (2, len(source.labels)) or not np.isfinite(logits).all():
        raise ServingError(f"{what}: produced logits of shape {logits.shape} for {len(source.labels)} labels", 422)
    return head


class HeadCatalog:
    """``name:version -> HeadSource`` in a JSON file of the state directory, shared by every worker."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._cache: dict[str, HeadSource] = {}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()

    def entries(self) -> dict[str, HeadSource]:
        """All entries (re-read when the file changed)."""
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                return {}
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                data = json.loads(self.path.read_text())
                self._cache = {key: HeadSource.from_dict(value) for key, value in data.items()}
                self._stamp = stamp
            return dict(self._cache)

    def get(self, name: str, version: int) -> HeadSource | None:
        return self.entries().get(f"{name}:{version}")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock across processes (state changes by admin calls and startup are serialised)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put(self, sources: Sequence[HeadSource], overwrite: bool = False) -> None:
        """Add entries (call under :meth:`locked`); ServingError 409 for a known version with other bytes."""
        entries = self.entries()
        for source in sources:
            known = entries.get(source.key)
            if known is not None and known.sha256 != source.sha256 and not overwrite:
                raise ServingError(f"head {source.key} is already known with another head.onnx "
                                   f"(sha256 {known.sha256[:12]}…, from {known.origin}); "
                                   "give the new head a new version", 409)
            entries[source.key] = source
        atomic_write_json(self.path, {key: value.to_dict() for key, value in sorted(entries.items())})


# ---------------------------------------------------------------- adaptive batching

class MicroBatcher:
    """Adaptive batching of backbone passes inside one worker.

    Requests that arrive while a pass runs wait and go together into the next pass (up to ``max_batch``
    images), so a lone request never waits and a busy worker runs full batches. Inputs are validated before
    they are queued; if a pass fails anyway, its requests are re-run one by one so that only the culprit fails.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int = 16,
                 on_batch: Callable[[int], None] | None = None):
        self._run = run
        self.max_batch = max_batch
        self._on_batch = on_batch
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` (N×...) through ``run`` together with whatever else is queued; returns its N outputs."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((batch, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        jobs, size = [], 0
        while self._pending:
            batch, future = self._pending[0]
            if future.done():  # the client went away
                self._pending.pop(0)
                continue
            if jobs and size + len(batch) > self.max_batch:
                break
            jobs.append(self._pending.pop(0))
            size += len(batch)
        return jobs

    async def _drain(self) -> None:
        while self._pending:
            jobs = self._take()
            if not jobs:
                continue
            try:
                outputs = await asyncio.to_thread(self._run_jobs, [batch for batch, _ in jobs])
            except Exception as exc:
                if len(jobs) == 1:
                    _settle(jobs[0][1], error=exc)
                    continue
                for batch, future in jobs:  # isolate the failure: neighbours still get answers
                    try:
                        _settle(future, await asyncio.to_thread(self._run_jobs, [batch]))
                    except Exception as single:
                        _settle(future, error=single)
                continue
            start = 0
            for batch, future in jobs:
                _settle(future, outputs[start:start + len(batch)])
                start += len(batch)

    def _run_jobs(self, batches: list[np.ndarray]) -> np.ndarray:
        batch = batches[0] if len(batches) == 1 else np.concatenate(batches)
        if self._on_batch is not None:
            self._on_batch(len(batch))
        return self._run(batch)


def _settle(future: asyncio.Future, result: object = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# ---------------------------------------------------------------- metrics

class Metrics:
    """Per-head Prometheus metrics. prometheus_client is imported on first use: BentoML sets
    PROMETHEUS_MULTIPROC_DIR in its workers, and the client must see it to aggregate across workers."""

    _instance: "Metrics | None" = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        labels = ["head", "version", "endpoint"]
        self.requests = Counter("tl_models_head_requests", "Requests routed to a head", labels)
        self.errors = Counter("tl_models_head_errors", "Requests routed to a head that failed",
                              labels + ["reason"])
        self.latency = Histogram("tl_models_head_request_duration_seconds",
                                 "Time from routing to answer, per head", labels,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("tl_models_backbone_batch_size", "Images per backbone pass (adaptive batching)",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

    @classmethod
    def get(cls) -> "Metrics":
        """The process-wide instance (metrics can be registered only once per process)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @staticmethod
    def request_counts() -> dict[str, dict[str, float]]:
        """``head -> version -> requests``, summed over every worker of the server."""
        from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

        registry = REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        counts: dict[str, dict[str, float]] = {}
        for family in registry.collect():
            if family.name != "tl_models_head_requests":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    by_version = counts.setdefault(sample.labels["head"], {})
                    version = sample.labels["version"]
                    by_version[version] = by_version.get(version, 0.0) + sample.value
        return counts


# ---------------------------------------------------------------- the classifier

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

    @classmethod
    def from_env(cls, default_state_dir: Path) -> "ServingConfig":
        env = os.environ
        return cls(state_dir=Path(env.get("TL_MODELS_STATE_DIR") or default_state_dir),
                   weights=parse_weights(env["TL_MODELS_WEIGHTS"]) if env.get("TL_MODELS_WEIGHTS") else None,
                   top_k=int(env.get("TL_MODELS_TOP_K", "5")), max_batch=int(env.get("TL_MODELS_MAX_BATCH", "16")),
                   route_poll=float(env.get("TL_MODELS_ROUTE_POLL", "0")), providers=env.get("TL_MODELS_PROVIDERS"),
                   threads=int(env["TL_MODELS_THREADS"]) if env.get("TL_MODELS_THREADS") else None)


def parse_weights(text: str) -> dict[str, float]:
    """``"a=90,b=10"`` -> ``{"a": 90.0, "b": 10.0}``."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"bad weights {text!r}: use name=weight pairs, e.g. a=90,b=10")
    return weights


class Classifier:
    """One backbone session, a head registry and the shared route; see the module docstring."""

    def __init__(self, backbone: BackboneSource, heads: Sequence[HeadSource], config: ServingConfig):
        self.ready = False
        self.config = config
        self.backbone_source = backbone
        data = read_verified(backbone.path, backbone.sha256, "backbone")
        self.backbone = create_session(data, providers=config.providers, threads=config.threads, name="backbone")
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
            return preprocess_bytes(data, self.spec)
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
        if not 1 <= len(array) <= MAX_TENSOR_BATCH:
            raise ServingError(f"tensor batch must hold 1 to {MAX_TENSOR_BATCH} images, got {len(array)}")
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
