"""Triton python-backend model ``NAME``: the A/B router over backbone -> head.

Copied as ``model.py`` by ``tl-models triton package``. Each batch follows the serving plan BentoML's engine follows
too (``tl_models.core.plan``): on the route read once per batch, each request gets its head version (explicit
``route_head``, else the weighted split, sticky on ``route_key``) and its shadow heads drawn by their share, before the
backbone pass. The router preprocesses the request's images
itself (``tl_models.core.preprocess`` in a thread: one hop fewer than calling the ``preprocess`` model, which the
ensembles use), runs the backbone once for the whole batch, then each chosen head version on its rows, and
answers ``logits``, ``head`` ("name:version") and ``request_id`` (one per image). The route file is re-read every
``poll`` seconds, so ``tl-models triton swap`` repoints live traffic; a head call that fails because its version was
just unloaded is retried once on the route in force. Bad requests get their own error response; the rest of the
batch is answered.

Shadow heads named in the route (``tl-models triton shadow``) run on the same embeddings, concurrently with the
answering heads, on the requests that drew them; their top-1 agreement with the answering head (by label,
``BatchPlan.agreement``, the rule BentoML's judge uses) is counted in
Triton's custom metrics (``tl_models_shadow_scored`` / ``_agreed`` / ``_errors``, labels head and version, on the
metrics port). A shadow head that fails is counted, dropped from this router's shadowing and from the route; the
request is answered.

With parameter ``in_process`` (the python flavour on the CPU) the router runs the graphs itself instead of BLS calls
to the backbone and head models, each a round trip between processes through ``tritonserver``: the backbone's
(checked against ``backbone_sha256``) in an ONNX Runtime session with every core's threads, spinning during a run,
one pass at a time on a thread of its own, in runs of at most ``backbone_rows`` images (one router instance of
several, ``--instances``: a session with its share of the cores, and for a lone image with nothing waiting a session
with every core, spinning during a run; the solo pass only with no pass running on the machine, and alone:
``CoreLock``); each head version's (checked against the sha256 recorded when it was packaged) loaded on first use,
run on the event loop (a D×C product), forgotten once the route no longer names it. The backbone and head models
stay for the ensembles; Triton's statistics of those models count the ensembles' requests, not the router's.
Otherwise (a GPU, the onnxruntime flavour) the router makes BLS calls: one backbone call per batch, one per head
version.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tl_models.core.errors import BadRequest, ModelFault, UserError
from tl_models.core.feedback import request_ids
from tl_models.core.names import (
    EMBEDDING,
    HEAD,
    IMAGE,
    IMAGE_BYTES,
    LOGITS,
    REQUEST_ID,
    ROUTE_HEAD,
    ROUTE_KEY,
    VERSION_HEAD,
)
from tl_models.core.plan import BatchPlan, HeadKey, Planned, plan_request
from tl_models.core.preprocess import DEFAULT_MAX_PIXELS, Preprocessing, preprocess_many
from tl_models.core.routing import Route, RoutingState, read_route
from tl_models.core.runtime import CoreLock, available_cores, lane_sessions
from tl_models.triton.models.common import OnnxGraph, error_response, model_parameters, read_graph


class StepError(ModelFault):
    """A backbone or head step that failed: a BLS call that returned an error, or a graph run in this process."""


@dataclass
class Routed:
    """One request of a batch, planned and preprocessed: its place in the batch, its plan (the head version that
    answers, the shadows drawn) and its images."""

    index: int
    planned: Planned
    images: np.ndarray


def _first_string(request: pb_utils.InferenceRequest, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if not len(values):
        return None
    value = values[0]
    try:
        return (value.decode() if isinstance(value, bytes) else str(value)) or None
    except UnicodeDecodeError:
        raise BadRequest(f"{name} must be UTF-8 text, got {value[:32]!r}") from None


class TritonPythonModel:
    """Weighted, sticky A/B routing of whole requests to head versions, one backbone pass per batch."""

    def initialize(self, args: dict) -> None:
        config, params = model_parameters(args)
        route_file = Path(params["route_file"])
        self.route_file = route_file if route_file.is_absolute() else Path(args["model_repository"]) / route_file
        self.routing = RoutingState(self.route_file, poll=float(params.get("poll", "0.2")))
        self.spec = Preprocessing.from_dict(json.loads(params["preprocessing"]))
        self.max_pixels = int(params.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.backbone = params["backbone_model"]
        self.head_prefix = params["head_prefix"]
        self.chunk = max(1, int(config.get("max_batch_size", 0)) or 1)
        kind = pb_utils.MetricFamily.COUNTER
        self.families: dict[str, Any] = {
            "scored": pb_utils.MetricFamily("tl_models_shadow_scored", "Images a shadow head was scored on", kind),
            "agreed": pb_utils.MetricFamily(
                "tl_models_shadow_agreed", "Images where a shadow head's top-1 equals the answering head's", kind
            ),
            "errors": pb_utils.MetricFamily(
                "tl_models_shadow_errors",
                "Shadow scorings that failed (the head is dropped from shadowing; the request is answered)",
                kind,
            ),
        }
        self.metrics: dict[tuple[str, str, int], Any] = {}  # pb_utils.Metric objects (untyped module)
        self.dropped: set[str] = set()
        self.repository = Path(args["model_repository"]).parent
        self._labels: dict[tuple[str, int], tuple[str, ...]] = {}
        self.decode = partial(preprocess_many, spec=self.spec, max_pixels=self.max_pixels)
        self.backbone_graph: OnnxGraph | None = None
        self.head_graphs: dict[tuple[str, int], OnnxGraph] = {}
        self._route: Route | None = None  # the route the head graphs were last pruned to
        self.solo_graph: OnnxGraph | None = None  # one router instance of several: a lone image's pass
        self.cores: CoreLock | None = None  # one router instance of several: the machine's cores between passes
        self.passes = 0  # backbone passes of this instance waiting or running
        if params.get("in_process") == "1":
            version_dir = self.repository / self.backbone / "1"
            graph = read_graph(version_dir, params["backbone_sha256"])
            rows = int(params["backbone_rows"])
            label = f"{self.backbone}:1 in the router"
            instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
            if instances == 1:  # every core's threads, spinning during a run
                self.backbone_graph = OnnxGraph(version_dir, label, spin=True, rows=rows, graph=graph)
            else:  # one instance of several, as one BentoML worker of several: a lane of its share, a solo session
                share = max(1, available_cores() // instances)
                (lane,), solo = lane_sessions(graph, 1, share, spin=True, name=label, shared=True)
                self.backbone_graph = OnnxGraph(version_dir, label, rows=rows, session=lane)
                if solo is not None:
                    self.solo_graph = OnnxGraph(version_dir, f"{label} (solo)", rows=rows, session=solo)
                self.cores = CoreLock()
            self.runner = ThreadPoolExecutor(1, thread_name_prefix="backbone")

    async def _infer(self, model: str, version: int, inputs: list, output: str) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=model, model_version=version, inputs=inputs, requested_output_names=[output]
        )
        response = await request.async_exec()
        if response.has_error():
            raise StepError(
                f"{model}" + (f" version {version}" if version > 0 else "") + f": {response.error().message()}"
            )
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()

    async def _batched(self, model: str, version: int, name: str, array: np.ndarray, output: str) -> np.ndarray:
        """One BLS call per ``max_batch_size`` rows, concurrently; the rows' outputs in order."""
        chunks = [array[i : i + self.chunk] for i in range(0, len(array), self.chunk)]
        parts = await asyncio.gather(*(self._infer(model, version, [pb_utils.Tensor(name, c)], output) for c in chunks))
        return np.concatenate(parts)

    async def _prepare(self, route: Route, index: int, request: pb_utils.InferenceRequest) -> Routed:
        """Plan one request on ``route`` (:func:`~tl_models.core.plan.plan_request`) and preprocess its images; a
        UserError (its code from the table) for a bad request."""
        key, head = _first_string(request, ROUTE_KEY), _first_string(request, ROUTE_HEAD)
        planned = plan_request(route, key, head, self.dropped)
        data = pb_utils.get_input_tensor_by_name(request, IMAGE_BYTES).as_numpy().reshape(-1)
        images = await asyncio.to_thread(self.decode, data)
        return Routed(index, planned, images)  # in a thread: PIL releases the GIL while it decodes and resizes

    async def _embed(self, images: np.ndarray) -> np.ndarray:
        """The backbone's embeddings of ``images``: a pass in this process, or BLS calls to the backbone model."""
        if self.backbone_graph is None:
            return await self._batched(self.backbone, -1, IMAGE, images, EMBEDDING)
        self.passes += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.runner, self._pass, images)
        except Exception as exc:
            raise StepError(f"{self.backbone} in the router: ONNX Runtime: {exc}") from None
        finally:
            self.passes -= 1

    def _pass(self, images: np.ndarray) -> np.ndarray:
        """The backbone's pass over ``images`` (on the runner's thread). One instance of several: on the solo graph
        for a lone image with no other pass waiting in this instance nor running on the machine, else on the
        instance's own graph once no solo pass runs (:class:`~tl_models.core.runtime.CoreLock`)."""
        assert self.backbone_graph is not None  # a pass in this process: the router runs the graphs
        if self.cores is None:  # the one instance: its graph has every core
            return self.backbone_graph.run(images)
        if self.solo_graph is not None and len(images) == 1 and self.passes == 1 and self.cores.solo():
            try:
                return self.solo_graph.run(images)
            finally:
                self.cores.release()
        with self.cores.lane():
            return self.backbone_graph.run(images)

    async def _logits(self, head: str, version: int, embeddings: np.ndarray) -> np.ndarray:
        """A head version's logits for ``embeddings``: its graph in this process, or BLS calls to its model."""
        model = self.head_prefix + head
        if self.backbone_graph is None:
            return await self._batched(model, version, EMBEDDING, embeddings, LOGITS)
        try:
            graph = self.head_graphs.get((head, version))
            if graph is None:
                version_dir = self.repository / model / str(version)
                graph = OnnxGraph(
                    version_dir, f"{model}:{version} in the router", threads=1, graph=read_graph(version_dir)
                )
                self.head_graphs[(head, version)] = graph
            return graph.run(embeddings)
        except Exception as exc:  # a missing or damaged file, a graph ONNX Runtime refuses
            raise StepError(f"{model} version {version} in the router: {exc}") from None

    def _prune(self, route: Route) -> None:
        """Forget the head graphs ``route`` no longer names (a swapped-out version), once per route change."""
        if route is not self._route:
            self._route = route
            named = set(route.versions.items()) | {(name, version) for name, version, _ in route.shadows()}
            self.head_graphs = {key: graph for key, graph in self.head_graphs.items() if key in named}

    def labels(self, head: str, version: int) -> tuple[str, ...]:
        """The labels of a head version, from its ``head.json`` in the repository (read once)."""
        labels = self._labels.get((head, version))
        if labels is None:
            facts = json.loads(
                (self.repository / f"{self.head_prefix}{head}" / str(version) / VERSION_HEAD).read_text()
            )
            labels = self._labels[(head, version)] = tuple(facts["labels"])
        return labels

    async def _head(self, head: str, version: int, embeddings: np.ndarray) -> tuple[int, np.ndarray]:
        try:
            return version, await self._logits(head, version, embeddings)
        except StepError:
            live = read_route(self.route_file).versions.get(head)
            if live is None or live == version:
                raise
            return live, await self._logits(head, live, embeddings)

    def _count(self, family: str, head: str, version: int, value: float) -> None:
        metric = self.metrics.get((family, head, version))
        if metric is None:
            metric = self.metrics[(family, head, version)] = self.families[family].Metric(
                labels={"head": head, "version": str(version)}
            )
        metric.increment(value)

    def _judge_shadows(
        self, plan: BatchPlan, results: list, answers: dict[HeadKey, tuple[tuple[str, ...], np.ndarray]]
    ) -> None:
        """Count each shadow head's agreement with the heads that answered its rows (:meth:`BatchPlan.agreement`,
        the rule BentoML's judge counts with); ``answers``: per answering head version as planned, the labels of the
        version that answered and its top-1 on the version's rows. A shadow head that failed is counted and
        dropped."""
        for (name, version), result in zip(plan.shadowing, results):
            if isinstance(result, BaseException):
                self._count("errors", name, version, 1)
                self._drop(name, version)
                continue
            scored, same = plan.agreement((name, version), self.labels(name, version), result.argmax(axis=1), answers)
            if scored:
                self._count("scored", name, version, scored)
                self._count("agreed", name, version, same)

    def _drop(self, name: str, version: int) -> None:
        """Stop shadowing a failing head here at once, and in the route (off the request path)."""
        key = f"{name}:{version}"
        self.dropped.add(key)

        def unroute() -> None:
            with suppress(UserError, OSError):
                RoutingState(self.route_file, poll=0).update(shadow={key: 0})

        threading.Thread(target=unroute, daemon=True).start()

    async def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        route = self.routing.current()  # one read for the whole batch: answers and shadows follow the same route
        self._prune(route)
        prepared = await asyncio.gather(
            *(self._prepare(route, i, r) for i, r in enumerate(requests)), return_exceptions=True
        )
        routed: list[Routed] = []
        for index, item in enumerate(prepared):
            if isinstance(item, BaseException):
                responses[index] = error_response(item)
            else:
                routed.append(item)
        if not routed:
            return responses
        plan = BatchPlan([r.planned for r in routed], [len(r.images) for r in routed])
        try:
            embeddings = await self._embed(np.concatenate([r.images for r in routed]))
        except StepError as exc:
            for r in routed:
                responses[r.index] = error_response(exc)
            return responses
        results = await asyncio.gather(
            *(self._head(head, version, embeddings[rows]) for (head, version), rows in plan.answering.items()),
            *(self._logits(name, version, embeddings[rows]) for (name, version), rows in plan.shadowing.items()),
            return_exceptions=True,
        )
        answers: dict[HeadKey, tuple[tuple[str, ...], np.ndarray]] = {}
        for (head, version), result in zip(plan.answering, results):
            members = plan.members[(head, version)]
            if isinstance(result, BaseException):
                for member in members:
                    responses[routed[member].index] = error_response(result)
                continue
            answered, logits = result
            if plan.shadowing:
                answers[(head, version)] = (self.labels(head, answered), logits.argmax(axis=1))
            offset = 0
            for member in members:
                size = len(routed[member].images)
                label = np.array([[f"{head}:{answered}".encode()]] * size, dtype=np.object_)
                ids = np.array([[rid.encode()] for rid in request_ids(size)], dtype=np.object_)
                responses[routed[member].index] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(LOGITS, logits[offset : offset + size]),
                        pb_utils.Tensor(HEAD, label),
                        pb_utils.Tensor(REQUEST_ID, ids),
                    ]
                )
                offset += size
        if plan.shadowing:
            self._judge_shadows(plan, results[len(plan.answering) :], answers)
        return responses

    def finalize(self) -> None:
        del self.routing
        if self.backbone_graph is not None:
            self.runner.shutdown()
