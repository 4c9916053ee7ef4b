"""Triton python-backend model ``NAME``: the A/B router (BLS) over backbone -> head.

Copied as ``model.py`` by ``tl-models triton package``. Per request it picks a head with ``tl_models.core.routing``
(explicit ``route_head``, else the weighted split, sticky on ``route_key``), preprocesses the request's images
itself (``tl_models.core.preprocess`` in a thread: one hop fewer than calling the ``preprocess`` model, which the
ensembles use), runs the backbone once for the whole batch, then each chosen head version on its rows, and
answers ``logits``, ``head`` ("name:version") and ``request_id`` (one per image). The route file is re-read every
``poll`` seconds, so ``tl-models triton swap`` repoints live traffic; a head call that fails because its version was
just unloaded is retried once on the route in force. Bad requests get their own error response; the rest of the
batch is answered.

Shadow heads named in the route (``tl-models triton shadow``) run on the same embeddings, concurrently with the
answering heads, on each request drawn by their share; their top-1 agreement with the answering head is counted in
Triton's custom metrics (``tl_models_shadow_scored`` / ``_agreed`` / ``_errors``, labels head and version, on the
metrics port). A shadow head that fails is counted, dropped from this router's shadowing and from the route; the
request is answered.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tl_models.core.errors import BadRequest, ModelFault, UserError
from tl_models.core.feedback import request_ids
from tl_models.core.names import EMBEDDING, HEAD, IMAGE, IMAGE_BYTES, LOGITS, REQUEST_ID, ROUTE_HEAD, ROUTE_KEY
from tl_models.core.preprocess import DEFAULT_MAX_PIXELS, Preprocessing, preprocess_many
from tl_models.core.routing import Route, RoutingState
from tl_models.triton.models.common import error_response, model_parameters


class StepError(ModelFault):
    """A BLS call that returned an error."""


def _first_string(request: "pb_utils.InferenceRequest", name: str) -> str | None:
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
        self.families = {
            "scored": pb_utils.MetricFamily("tl_models_shadow_scored", "Images a shadow head was scored on", kind),
            "agreed": pb_utils.MetricFamily("tl_models_shadow_agreed",
                                            "Images where a shadow head's top-1 equals the answering head's", kind),
            "errors": pb_utils.MetricFamily("tl_models_shadow_errors", "Shadow scorings that failed (the head is "
                                            "dropped from shadowing; the request is answered)", kind)}
        self.metrics: dict[tuple[str, str, int], object] = {}
        self.dropped: set[str] = set()

    async def _infer(self, model: str, version: int, inputs: list, output: str) -> np.ndarray:
        request = pb_utils.InferenceRequest(model_name=model, model_version=version, inputs=inputs,
                                            requested_output_names=[output])
        response = await request.async_exec()
        if response.has_error():
            raise StepError(f"{model}" + (f" version {version}" if version > 0 else "") +
                            f": {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()

    async def _batched(self, model: str, version: int, name: str, array: np.ndarray, output: str) -> np.ndarray:
        """One BLS call per ``max_batch_size`` rows, concurrently; the rows' outputs in order."""
        chunks = [array[i:i + self.chunk] for i in range(0, len(array), self.chunk)]
        parts = await asyncio.gather(*(self._infer(model, version, [pb_utils.Tensor(name, c)], output)
                                       for c in chunks))
        return np.concatenate(parts)

    async def _prepare(self, request: "pb_utils.InferenceRequest") -> tuple[str, int, np.ndarray]:
        """Route one request and preprocess its images; a UserError (its code from the table) for a bad request."""
        head, version = self.routing.current().choose(_first_string(request, ROUTE_KEY),
                                                      _first_string(request, ROUTE_HEAD))
        data = pb_utils.get_input_tensor_by_name(request, IMAGE_BYTES).as_numpy()
        images = await asyncio.to_thread(preprocess_many, data.reshape(-1), self.spec, self.max_pixels)
        return head, version, images  # in a thread: PIL releases the GIL while it decodes and resizes

    async def _head(self, head: str, version: int, embeddings: np.ndarray) -> tuple[int, np.ndarray]:
        try:
            return version, await self._batched(self.head_prefix + head, version, EMBEDDING, embeddings, LOGITS)
        except StepError:
            live = RoutingState(self.route_file, poll=0).current().versions.get(head)
            if live is None or live == version:
                raise
            return live, await self._batched(self.head_prefix + head, live, EMBEDDING, embeddings, LOGITS)

    def _count(self, family: str, head: str, version: int, value: float) -> None:
        metric = self.metrics.get((family, head, version))
        if metric is None:
            metric = self.metrics[(family, head, version)] = self.families[family].Metric(
                labels={"head": head, "version": str(version)})
        metric.increment(value)

    def _shadow_rows(self, route: Route, good: list, starts: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
        """Per shadow head of the route, the embedding rows it scores: the requests drawn by its share, except
        those its own version answers."""
        chosen = {}
        for name, version, share in route.shadows():
            if f"{name}:{version}" in self.dropped:
                continue
            picked = [np.arange(starts[p], starts[p + 1]) for p, (_, head, answered, _) in enumerate(good)
                      if (head, answered) != (name, version) and (share >= 1 or random.random() < share)]
            if picked:
                chosen[(name, version)] = np.concatenate(picked)
        return chosen

    def _judge_shadows(self, shadows: dict, results: list, answers: np.ndarray, answered: np.ndarray) -> None:
        """Count agreement of each shadow head with the answering heads (rows whose head answered)."""
        for (name, version), result in zip(shadows, results):
            rows = shadows[(name, version)]
            if isinstance(result, BaseException):
                self._count("errors", name, version, 1)
                self._drop(name, version)
                continue
            keep = answered[rows]
            if keep.any():
                agreed = result.argmax(axis=1)[keep] == answers[rows[keep]].argmax(axis=1)
                self._count("scored", name, version, int(keep.sum()))
                self._count("agreed", name, version, int(agreed.sum()))

    def _drop(self, name: str, version: int) -> None:
        """Stop shadowing a failing head here at once, and in the route (off the request path)."""
        key = f"{name}:{version}"
        self.dropped.add(key)

        def unroute() -> None:
            try:
                RoutingState(self.route_file, poll=0).update(shadow={key: 0})
            except (UserError, OSError):
                pass

        threading.Thread(target=unroute, daemon=True).start()

    async def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        prepared = await asyncio.gather(*(self._prepare(r) for r in requests), return_exceptions=True)
        good = []
        for index, item in enumerate(prepared):
            if isinstance(item, BaseException):
                responses[index] = error_response(item)
            else:
                good.append((index, *item))
        if not good:
            return responses
        sizes = [len(images) for *_, images in good]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        try:
            embeddings = await self._batched(self.backbone, -1, IMAGE, np.concatenate([g[3] for g in good]), EMBEDDING)
        except StepError as exc:
            for index, *_ in good:
                responses[index] = error_response(exc)
            return responses
        groups: dict[tuple[str, int], list[int]] = {}
        for position, (_, head, version, _) in enumerate(good):
            groups.setdefault((head, version), []).append(position)
        rows = {key: np.concatenate([np.arange(starts[p], starts[p + 1]) for p in members])
                for key, members in groups.items()}
        shadows = self._shadow_rows(self.routing.current(), good, starts)
        results = await asyncio.gather(*(self._head(head, version, embeddings[rows[(head, version)]])
                                          for head, version in groups),
                                        *(self._batched(self.head_prefix + name, version, EMBEDDING, embeddings[r],
                                                        LOGITS) for (name, version), r in shadows.items()),
                                        return_exceptions=True)
        answers, answered_rows = None, np.zeros(len(embeddings), dtype=bool)
        for (head, version), result in zip(groups, results):
            members = groups[(head, version)]
            if isinstance(result, BaseException):
                for position in members:
                    responses[good[position][0]] = error_response(result)
                continue
            answered, logits = result
            if shadows:
                if answers is None:
                    answers = np.zeros((len(embeddings), logits.shape[1]), logits.dtype)
                answers[rows[(head, version)]] = logits
                answered_rows[rows[(head, version)]] = True
            offset = 0
            for position in members:
                size = sizes[position]
                label = np.array([[f"{head}:{answered}".encode()]] * size, dtype=np.object_)
                ids = np.array([[rid.encode()] for rid in request_ids(size)], dtype=np.object_)
                responses[good[position][0]] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(LOGITS, logits[offset:offset + size]), pb_utils.Tensor(HEAD, label),
                    pb_utils.Tensor(REQUEST_ID, ids)])
                offset += size
        if shadows and answers is not None:
            self._judge_shadows(shadows, results[len(groups):], answers, answered_rows)
        return responses

    def finalize(self) -> None:
        self.routing = None
