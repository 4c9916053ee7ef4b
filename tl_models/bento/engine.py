"""The request path of the BentoML service: the backbone's sessions, adaptive batching, routing to a head.

No BentoML in here: ``service.py`` maps HTTP onto :class:`ServingEngine`, which

* runs the backbone, loaded and warmed up once, in lanes (:func:`backbone_sessions`); concurrent requests share
  backbone passes through :class:`MicroBatcher` (whatever queued up while every lane was busy goes into the next
  free lane's pass);
* routes every request through :mod:`tl_models.core.routing` (weighted sticky split, ``X-TL-Head`` override)
  to a head of its :class:`HeadRegistry`, which admits heads and runs the admin operations;
* scores shadow heads on the same embedding and gives every answered image a request id for feedback
  (:class:`~tl_models.bento.judge.Judge`);
* in a fleet (``TL_MODELS_FLEET_ROUTE``), converges its route to the fleet's route file: at start (before it is
  ready), every ``TL_MODELS_FLEET_POLL`` seconds, and on ``POST /admin/sync``.

Errors are :mod:`tl_models.core.errors`: the service answers each with the status of that module's table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import BadRequest, NotFound, Refused, UserError
from ..core.feedback import request_ids
from ..core.heads import BackboneSource, HeadSource, LoadedHead, read_verified
from ..core.names import EMBEDDING, IMAGE, check_name
from ..core.plan import Planned, plan_request
from ..core.preprocess import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    Preprocessing,
    blank_image,
    preprocess_bytes,
    tensor_problem,
)
from ..core.routing import Route, parse_route, parse_weights, read_route
from ..core.runtime import CPU_RUN_ROWS, GPU_PROVIDERS, CoreLock, available_cores, lane_sessions, resolve_providers
from .batching import MicroBatcher, Prepare, Run
from .judge import Judge, JudgeConfig, Scored
from .metrics import Metrics
from .paths import FROZEN, TailPaths, graph_runner, run_graph
from .registry import HeadRegistry, check_state

log = logging.getLogger(__name__)


@dataclass
class ServingConfig:
    """Knobs of the engine, read from ``TL_MODELS_*`` environment variables by :meth:`from_env`."""

    state_dir: Path
    weights: dict[str, float] | None = None
    top_k: int = 5
    max_batch: int | None = None  # images per backbone pass; None: :func:`pass_size`'s default
    route_poll: float = 0.0
    providers: str | None = None
    threads: int | None = None
    spin: bool = True
    lanes: int | None = None  # backbone passes side by side on the CPU; None: one per core (:func:`backbone_sessions`)
    cores: int = 1  # this worker's share of the machine's cores
    warmup_batches: tuple[int, ...] = field(default=(1,))
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_tensor_batch: int = 256
    build_roots: tuple[Path, ...] = ()
    judge: JudgeConfig | None = None
    fleet_route: Path | None = None
    fleet_poll: float = 5.0

    @classmethod
    def from_env(cls, default_state_dir: Path) -> ServingConfig:
        env = os.environ
        roots = env.get("TL_MODELS_BUILD_ROOTS")
        workers = max(1, int(env.get("TL_MODELS_WORKERS", "1")))
        return cls(
            state_dir=Path(env.get("TL_MODELS_STATE_DIR") or default_state_dir),
            weights=parse_weights(env["TL_MODELS_WEIGHTS"]) if env.get("TL_MODELS_WEIGHTS") else None,
            top_k=int(env.get("TL_MODELS_TOP_K", "5")),
            max_batch=int(env["TL_MODELS_MAX_BATCH"]) if env.get("TL_MODELS_MAX_BATCH") else None,
            route_poll=float(env.get("TL_MODELS_ROUTE_POLL", "0")),
            providers=env.get("TL_MODELS_PROVIDERS"),
            threads=int(env["TL_MODELS_THREADS"]) if env.get("TL_MODELS_THREADS") else None,
            # the solo session's threads wait for work spinning (1.3 ms less per batch-1 pass here): its pass runs
            # alone on the machine (CoreLock), and they stop when it ends
            spin=env.get("TL_MODELS_SPIN", "1") == "1",
            lanes=int(env["TL_MODELS_LANES"]) if env.get("TL_MODELS_LANES") else None,
            cores=max(1, available_cores() // workers),
            max_pixels=int(env.get("TL_MODELS_MAX_PIXELS", DEFAULT_MAX_PIXELS)),
            max_tensor_batch=int(env.get("TL_MODELS_MAX_TENSOR_BATCH", "256")),
            build_roots=tuple(Path(r) for r in roots.split(os.pathsep) if r) if roots else (Path.cwd(),),
            judge=JudgeConfig.from_env(Path(env.get("TL_MODELS_STATE_DIR") or default_state_dir)),
            fleet_route=Path(env["TL_MODELS_FLEET_ROUTE"]) if env.get("TL_MODELS_FLEET_ROUTE") else None,
            fleet_poll=float(env.get("TL_MODELS_FLEET_POLL", "5")),
        )


def backbone_sessions(data: bytes, config: ServingConfig) -> tuple[list[Any], Any | None]:
    """The backbone's lanes and solo session (:func:`~tl_models.core.runtime.lane_sessions`): on a GPU one session;
    on the CPU ``config.lanes`` lanes (default: one per core of this worker) over ``config.threads`` threads
    (default: the worker's cores, so that several workers do not oversubscribe them under load), the solo session
    with every core of the machine, spinning when ``config.spin``."""
    if _on_gpu(config):
        return lane_sessions(data, 1, config.threads, config.providers, config.spin, "backbone")
    # ONNX Runtime's own thread count (None) where the worker has every core: it pins its threads to the cores, a lone
    # pass's tail latency here is lower than with the same count given (Triton p99 at concurrency 1: 14 vs 21 ms)
    shared = config.cores < available_cores()  # one worker of several
    threads = config.threads or (config.cores if shared else None)
    lanes = config.lanes or config.cores
    return lane_sessions(data, lanes, threads, config.providers, config.spin, "backbone", shared)


@dataclass
class Routed:
    """One request's plan with its head versions loaded: the one that answers and the shadows drawn for it."""

    planned: Planned
    answer: LoadedHead
    shadows: list[LoadedHead]


def pass_size(config: ServingConfig) -> int:
    """Most images in one backbone pass: ``config.max_batch``, else 16 on a GPU (one session: batching is its
    throughput) and :data:`~tl_models.core.runtime.CPU_RUN_ROWS` per lane on the CPU, where a larger pass costs more
    per image (a BentoML worker at concurrency 32 here: 0.5 CPU-ms less per request with 2 than with 16)."""
    if config.max_batch is not None:
        return config.max_batch
    return 16 if _on_gpu(config) else CPU_RUN_ROWS


def _on_gpu(config: ServingConfig) -> bool:
    return resolve_providers(config.providers)[0] in GPU_PROVIDERS


def preflight(backbone: BackboneSource, heads: Sequence[HeadSource], config: ServingConfig) -> None:
    """Refuse, one line naming the file, what would stop every worker's start, before BentoML starts one (its
    process manager restarts a worker whose start fails, forever): the CPU an int8 backbone was gated on, the
    backbone's sha256, the state directory (:func:`check_state`) and the fleet route file."""
    backbone.check_machine()
    read_verified(backbone.path, backbone.graph_sha256, f"{backbone.precision} backbone")
    check_state(config.state_dir, backbone, heads)
    if config.fleet_route is not None and config.fleet_route.exists():
        parse_route(config.fleet_route)


class ServingEngine:
    """The backbone's sessions, the worker's :class:`HeadRegistry` and the three request endpoints."""

    def __init__(
        self,
        backbone: BackboneSource,
        heads: Sequence[HeadSource],
        config: ServingConfig,
        find_head: Callable[[str, int], HeadSource] | None = None,
    ):
        self.ready = False
        self.config = config
        self.backbone_source = backbone
        backbone.check_machine()
        data = read_verified(backbone.path, backbone.graph_sha256, f"{backbone.precision} backbone")
        lanes, solo = backbone_sessions(data, config)
        self.backbone_sessions = lanes + ([solo] if solo is not None else [])
        self.spec = Preprocessing.from_dict(backbone.preprocessing)
        self.input_size = (3, self.spec.crop_size, self.spec.crop_size)
        self.embedding_dim = int(
            run_graph(lanes[0], IMAGE, EMBEDDING, np.zeros((1, *self.input_size), np.uint8)).shape[1]
        )
        self.metrics = Metrics.get()
        self.batcher = self._batcher(
            [graph_runner(lane, IMAGE, EMBEDDING) for lane in lanes],
            graph_runner(solo, IMAGE, EMBEDDING) if solo is not None else None,
        )
        tail_threads = None if _on_gpu(config) else 1  # a tail runs in a lane's pass, as the lane's session does
        self.paths = TailPaths(partial(backbone_sessions, config=config), self._batcher, config.providers, tail_threads)
        self.heads = HeadRegistry(
            config.state_dir,
            self.embedding_dim,
            backbone,
            config.providers,
            config.route_poll,
            on_tail=self.paths.admit,
            tail_threads=tail_threads,
        )
        route = self.heads.bootstrap(heads, config.weights, backbone.build)
        self.judge = Judge(
            config.state_dir,
            config.judge or JudgeConfig.from_env(config.state_dir),
            backbone,
            self.embedding_dim,
            config.top_k,
        )
        self.find_head = find_head or (lambda name, version: self._unknown(name, version))
        self.fleet: dict = {}
        self._route_damaged = False
        if config.fleet_route is not None:
            self.sync_fleet()
            threading.Thread(target=self._follow_fleet, name="tl-models-fleet", daemon=True).start()
        log.info(
            "serving %s (%s backbone): heads %s, weights %s",
            backbone.build,
            backbone.precision,
            route.versions,
            route.weights,
        )

    def _batcher(self, lanes: list[Run], solo: Run | None, parts: bool = False) -> MicroBatcher:
        """A batcher over passes (lanes, and a solo way or None), with the worker's pass size and locks."""
        return MicroBatcher(
            lanes,
            pass_size(self.config),
            self.metrics.batch.observe,
            solo=solo,
            core_lock=None if _on_gpu(self.config) else CoreLock,
            parts=parts,
        )

    @staticmethod
    def _unknown(name: str, version: int) -> HeadSource:
        raise NotFound(f"head {name}:{version} is not in this service's head catalog")

    # -- fleet: the route file every replica follows

    def sync_fleet(self, pushed: Route | None = None) -> dict:
        """Converge the route to the fleet's: ``pushed`` (phase 2 of a fleet swap sends it, so a replica need not
        wait for a ConfigMap mount to catch up) or the route file, whichever has the higher revision, admitting the
        versions it names first. The fleet state: the file, the revision followed, in sync or the last error."""
        path = self.config.fleet_route
        if path is None:
            raise BadRequest("this service is not in a fleet: start it with TL_MODELS_FLEET_ROUTE")
        state = {
            "route_file": str(path),
            "revision": self.fleet.get("revision"),  # the revision followed, until another is
            "in_sync": False,
            "error": None,
            "checked": time.time(),
        }
        try:
            target = read_route(path)
        except (UserError, OSError) as exc:  # not JSON, not a route, unreadable: keep serving the route followed
            if pushed is None:
                return self._fleet_error(state, exc.message if isinstance(exc, UserError) else f"{path}: {exc}")
            target = Route()  # the pushed route is followed; the next poll reports the file again
        if pushed is not None and pushed.revision >= target.revision:
            target = pushed.validate()
        followed = self.fleet.get("revision", -1) if self.fleet.get("in_sync") else -1
        if target.revision < followed:  # an older file (a ConfigMap not yet updated): keep the newer pushed route
            return self.fleet
        state["revision"] = target.revision
        try:
            if not target.versions:
                raise NotFound(f"the fleet route {path} is missing or names no head")
            self.heads.converge(target, self.find_head)
            state["in_sync"] = True
        except UserError as exc:
            return self._fleet_error(state, exc.message)
        self.fleet = state
        return state

    def _fleet_error(self, state: dict, message: str) -> dict:
        """The fleet state when the route cannot be followed: ``in_sync`` false and the error, in ``/heads`` and
        ``fleet status`` until a route that can be followed comes back (logged once per new error)."""
        if self.fleet.get("error") != message:
            log.error("cannot follow the fleet route: %s", message)
        self.fleet = {**state, "error": message}
        return self.fleet

    def _follow_fleet(self) -> None:
        while True:
            time.sleep(self.config.fleet_poll)
            try:
                self.sync_fleet()
            except Exception:  # keep following: the next poll may succeed (a file being replaced, a full disk)
                log.exception("fleet route sync failed")

    def close(self) -> None:
        """Stop the backbone's lanes (passes running end first) and record what the judge has queued."""
        self.batcher.close()
        self.paths.close()
        self.judge.close()

    def warm_up(self) -> None:
        """Run each backbone session at the warm-up batch sizes and every loaded head once; then the engine is ready."""
        for size in sorted({*self.config.warmup_batches, self.batcher.max_batch}):
            for session in self.backbone_sessions:
                run_graph(session, IMAGE, EMBEDDING, np.zeros((size, *self.input_size), np.uint8))
        for image_format in ("PNG", "JPEG"):  # loads PIL's decoders now rather than in the first request
            self.preprocess(blank_image(32, image_format))
        for head in self.heads.loaded():
            head.logits(np.zeros((1, self.embedding_dim), np.float32))
        self.ready = True

    async def route(self, key: str | None = None, head: str | None = None, endpoint: str = "") -> Routed:
        """One request's plan on the route read once (:func:`~tl_models.core.plan.plan_request`: the head version
        that answers, ``head`` if given, else the weighted split; the shadow heads drawn), with those head versions
        loaded before the backbone pass. A shadow head that cannot be loaded is dropped (and taken out of the
        route); the request goes on without it."""
        route = self.current_route()
        try:
            planned = plan_request(route, key, head, self.judge.dropped_keys)
        except UserError as exc:
            reason = "unknown_head" if isinstance(exc, NotFound) else "no_route"
            self.metrics.errors.labels("", "", endpoint, reason).inc()
            raise
        answer = await self.resolve(planned.head, planned.version)
        self.heads.follow(route)
        shadows = []
        for name, version in planned.shadows:
            try:
                shadows.append(await self.resolve(name, version))
            except UserError as exc:
                self.judge.drop(f"{name}:{version}", exc.message)
                self._unroute_shadow(f"{name}:{version}")
        return Routed(planned, answer, shadows)

    def current_route(self) -> Route:
        """The route in force; while the route file is damaged, the last good one (``route_error`` in ``/heads``,
        the ``tl_models_route_damaged`` gauge at 1)."""
        route = self.heads.routing.current()
        damaged = self.heads.routing.error is not None
        if damaged != self._route_damaged:
            self._route_damaged = damaged
            self.metrics.route_damaged.set(int(damaged))
        return route

    async def resolve(self, name: str, version: int) -> LoadedHead:
        """A head version this worker has loaded, else loaded now in a thread (off the event loop)."""
        loaded = self.heads.cached(name, version)
        if loaded is None:
            loaded = await asyncio.to_thread(self.heads.head, name, version)
        return loaded

    # -- requests

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> uint8 3×H×W; ImageError (400) with the reason for anything that is no image."""
        try:
            return preprocess_bytes(data, self.spec, self.config.max_pixels)
        except ImageError as exc:
            raise ImageError(f"bad image: {exc}") from None

    def preprocess_one(self, data: bytes) -> np.ndarray:
        """:meth:`preprocess` as a batch of one (what the batcher's lanes decode right before their pass)."""
        return self.preprocess(data)[None]

    def tensor_input(self, tensor: np.ndarray) -> np.ndarray:
        """A client tensor (N×3×H×W or 3×H×W; uint8, or integer/float pixel values 0..255) -> uint8 batch."""
        array = np.asarray(tensor)
        if array.ndim == 3:
            array = array[None]
        problem = tensor_problem(array, "tensor", self.input_size)
        if problem:
            raise BadRequest(problem)
        if not 1 <= len(array) <= self.config.max_tensor_batch:
            raise BadRequest(f"tensor batch must hold 1 to {self.config.max_tensor_batch} images, got {len(array)}")
        if array.dtype == np.uint8:
            return np.ascontiguousarray(array)
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise BadRequest(
                f"tensor values must be pixel values in 0..255 (normalisation happens in the model), got {low}..{high}"
            )
        return np.rint(array).astype(np.uint8) if array.dtype.kind == "f" else array.astype(np.uint8)

    @asynccontextmanager
    async def _observed(self, head: LoadedHead, endpoint: str) -> AsyncIterator[None]:
        labels = (head.name, str(head.version), endpoint)
        self.metrics.requests.labels(*labels).inc()
        start = time.perf_counter()
        try:
            yield
        except UserError:
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
            raise BadRequest(f"top_k must be at least 1, got {top_k}")
        return top_k

    async def classify(
        self, data: bytes, key: str | None = None, head: str | None = None, top_k: int | None = None
    ) -> dict:
        """One encoded image -> top-k labels and scores from the routed head."""
        k = self._top_k(top_k)
        routed = await self.route(key, head, "classify")
        chosen = routed.answer
        async with self._observed(chosen, "classify"):
            embeddings = await self._embeddings(routed, data, self.preprocess_one)
            logits = chosen.logits(embeddings[chosen.path])
            ids = self._judge(routed, embeddings, logits)
            return {**chosen.answer(logits, k)[0], "request_id": ids[0]}

    async def predict(
        self, tensor: np.ndarray, key: str | None = None, head: str | None = None, top_k: int | None = None
    ) -> dict:
        """A preprocessed tensor batch -> logits and top-k per image, all from one routed head."""
        k = self._top_k(top_k)
        routed = await self.route(key, head, "predict")
        chosen = routed.answer
        async with self._observed(chosen, "predict"):
            batch = self.tensor_input(tensor)
            embeddings = await self._embeddings(routed, batch, None)
            logits = chosen.logits(embeddings[chosen.path])
            answers = chosen.answer(logits, k)
            ids = self._judge(routed, embeddings, logits)
            return {
                "head": chosen.name,
                "version": chosen.version,
                "logits": logits.tolist(),
                "predictions": [a["predictions"] for a in answers],
                "request_id": ids[0].partition("-")[0],
                "request_ids": ids,
            }

    async def _embeddings(self, routed: Routed, item: Any, prepare: Prepare | None) -> dict[str, np.ndarray]:
        """``path -> embeddings`` of one request for the paths its head versions take: the whole backbone when they
        all take the frozen backbone's, else the trunk once and each tail it needs (:class:`TailPaths`)."""
        heads = [routed.answer, *routed.shadows]
        if all(head.tail is None for head in heads):
            return {FROZEN: await self.batcher.submit(item, prepare)}
        return await self.paths.embeddings(heads, item, prepare)

    def _judge(self, routed: Routed, embeddings: dict[str, np.ndarray], logits: np.ndarray) -> list[str]:
        """Score the request's shadow heads on their paths' embeddings, queue it for recording; its request ids."""
        answered = routed.answer
        ids = request_ids(len(logits))
        scored: list[tuple[LoadedHead, np.ndarray]] = []
        if routed.shadows:
            scored, failed = self.judge.shadow(routed.planned, answered, logits, embeddings, routed.shadows)
            for key in failed:
                self._unroute_shadow(key)
        self.judge.submit(Scored(ids, time.time(), embeddings[answered.path], answered, scored, logits, embeddings))
        return ids

    def _unroute_shadow(self, key: str) -> None:
        """Take a shadow head the judge dropped out of the route, off the request path (another worker may have
        already)."""
        name, _, version = key.partition(":")

        def unroute() -> None:
            with suppress(UserError):
                self.heads.unshadow(name, int(version))

        asyncio.get_running_loop().run_in_executor(None, unroute)

    async def embed(self, data: bytes) -> dict:
        """One encoded image -> its backbone embedding."""
        embedding = await self.batcher.submit(data, self.preprocess_one)
        return {"embedding": embedding[0].tolist(), "dim": self.embedding_dim}

    async def feedback(self, request_id: str, label: str) -> dict:
        """The true label of an answered image (``request_id`` from its answer): recorded for every head that
        was scored on it."""
        if not isinstance(label, str) or not label:
            raise BadRequest("give the true label, one of the heads' labels")
        known = {name for source in self.heads.catalog.entries().values() for name in source.labels}
        return await asyncio.to_thread(self.judge.feedback, request_id, label, known)

    # -- admin: the registry changes state; every answer is the new status

    def status(self) -> dict:
        """Live heads with versions, weights, traffic shares and request counts (all workers); shadow heads,
        feedback accuracy and drift (``judging``); ``route_error`` while the route file is damaged."""
        route = self.current_route()
        counts = Metrics.request_counts()
        total = sum(w for w in route.weights.values() if w > 0)
        catalog = self.heads.catalog.entries()
        heads = []
        for name in sorted(route.versions):
            version = route.versions[name]
            weight = route.weights.get(name, 0.0)
            by_version = counts.get(name, {})
            source = catalog.get(f"{name}:{version}")
            heads.append(
                {
                    "name": name,
                    "version": version,
                    "weight": weight,
                    "share": weight / total if total else 0.0,
                    "requests": sum(by_version.values()),
                    "requests_by_version": by_version,
                    "origin": source.origin if source else None,
                    "tail_stages": source.tail.stages if source and source.tail else None,  # a tuned version's
                }
            )
        return {
            "ready": self.ready,
            "build": self.backbone_source.build,
            "revision": route.revision,
            "backbone": {
                "origin": self.backbone_source.origin,
                "sha256": self.backbone_source.sha256,
                "precision": self.backbone_source.precision,
                "graph_sha256": self.backbone_source.graph_sha256,
                "embedding_dim": self.embedding_dim,
                "input_size": list(self.input_size),
            },
            "heads": heads,
            "available": sorted(catalog),
            "route_error": self.heads.routing.error,
            **self._judging(route, heads),
        }

    def _judging(self, route: Route, heads: list[dict]) -> dict:
        """Feedback accuracy and drift merged into each live head's entry; shadow heads, drift window, recorder."""
        live = [self.heads.head(name, version) for name, version in sorted(route.versions.items())]
        shadows = []
        for name, version, share in route.shadows():
            try:
                shadows.append((self.heads.head(name, version), share))
            except UserError as exc:  # a shadow head this worker cannot load is dropped on its next request
                log.warning("shadow head %s:%d cannot be loaded: %s", name, version, exc.message)
        judging = self.judge.status(live, shadows)
        for entry in heads:
            entry.update(judging["live"][f"{entry['name']}:{entry['version']}"])
        return {
            "shadow": judging["shadow"],
            "drift": judging["drift"],
            "recorder": judging["recorder"],
            "dropped_shadows": self.judge.dropped_shadows(),
            "fleet": self.fleet or None,
        }

    async def set_shadow(self, source: HeadSource | None, name: str, version: int | None, share: float) -> dict:
        """Shadow a head version on ``share`` of requests (``source`` given), or stop shadowing ``name``
        (``share`` 0: one version, or all of that name)."""
        if share == 0:
            await asyncio.to_thread(self.heads.unshadow, name, version)
        elif source is None:
            raise BadRequest(f"shadowing {name} on a share of {share} needs the head version to shadow")
        else:
            await asyncio.to_thread(self.heads.shadow, source, share)
        return self.status()

    async def set_weights(self, weights: dict[str, float]) -> dict:
        """Replace the traffic weights (every named head must be live)."""
        if not weights:
            raise BadRequest('give at least one weight, e.g. {"a": 90, "b": 10}')
        await asyncio.to_thread(self.heads.set_weights, weights)
        return self.status()

    async def load(self, source: HeadSource, live: bool = True, weight: float | None = None) -> dict:
        """Admit a head version and (``live``) route its name to it; see :meth:`HeadRegistry.load`."""
        await asyncio.to_thread(self.heads.load, source, live, weight)
        return self.status()

    async def unload(self, name: str, version: int) -> dict:
        """Forget a head version the route does not use; see :meth:`HeadRegistry.unload`."""
        await asyncio.to_thread(self.heads.unload, check_name(name), version)
        return self.status()

    async def sync(self, route: dict | None = None) -> dict:
        """Converge to the fleet route now (``POST /admin/sync``, optionally with the route itself); the status,
        with ``fleet``."""
        pushed = None
        if route is not None:
            try:
                missing = {"weights", "versions", "revision"} - set(route)
                if missing:
                    raise KeyError(", ".join(sorted(missing)))
                pushed = Route.from_dict(route)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise BadRequest(f'route must be {{"weights", "versions", "revision"[, "shadow"]}}: {exc}') from None
        state = await asyncio.to_thread(self.sync_fleet, pushed)
        if state["error"]:
            raise Refused(f"cannot follow the fleet route: {state['error']}")
        return self.status()

    async def retire(self, name: str) -> dict:
        """Take a head out of the route; its requests go to the other heads."""
        await asyncio.to_thread(self.heads.retire, name)
        return self.status()
