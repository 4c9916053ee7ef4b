"""BentoML service `Classifier`: HTTP over tl_models.bento (backbone + heads, A/B split, live head swap).

Serve a packaged build (`tl-models bento package BUILD_DIR`) or a build directory (TL_MODELS_BUILD=DIR):

    bentoml serve service:Classifier

Environment: TL_MODELS_BENTO (build in the store), TL_MODELS_BUILD (build directory), TL_MODELS_PRECISION (fp32, or
int8: the backbone `tl-models quantize` wrote past its gate), TL_MODELS_STATE_DIR
(route + head catalog shared by the workers), TL_MODELS_WEIGHTS (initial split, e.g. a=90,b=10),
TL_MODELS_ADMIN_TOKEN (admin endpoints), TL_MODELS_FEEDBACK_TOKEN (POST /feedback; the admin token works too),
TL_MODELS_LOG_SHARE (share of requests in the embedding log; README "Judging heads" lists the other judging knobs),
TL_MODELS_FLEET_ROUTE (the fleet's route file this replica follows), TL_MODELS_FLEET_POLL, TL_MODELS_WORKERS,
TL_MODELS_MAX_BATCH, TL_MODELS_TOP_K, TL_MODELS_ACCESS_LOG (0: no log line per request; /metrics still counts every
request), TL_MODELS_TRACING (1: BentoML's OpenTelemetry spans on), TL_MODELS_PREFLIGHT (0: no start check); limits
(README, "Limits"): TL_MODELS_MAX_REQUEST_BYTES, TL_MODELS_TIMEOUT, TL_MODELS_MAX_PIXELS, TL_MODELS_MAX_TENSOR_BATCH,
TL_MODELS_BUILD_ROOTS.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable, Callable
from typing import cast

import bentoml
import numpy as np
from bentoml._internal.container import BentoMLContainer
from bentoml._internal.context import server_context
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tl_models.bento import limits, store
from tl_models.bento.engine import ServingConfig, ServingEngine, preflight
from tl_models.core.errors import BadRequest, UserError, http_status
from tl_models.core.heads import HeadSource, confined, head_source_from_build
from tl_models.core.names import check_name
from tl_models.core.runtime import gpu_count

# BentoML passes each endpoint its request context as ``ctx``, found by the annotation ``bentoml.Context`` (exactly
# that type: Optional would make ctx a request field); the default only lets ctx follow parameters that have one
NO_CONTEXT = cast("bentoml.Context", None)


def _error_body(status: int, message: str) -> dict:
    """The body of every refused request: ``{"error", "status"}``."""
    return {"error": message, "status": status}


def _error(ctx: bentoml.Context, status: int, message: str) -> dict:
    ctx.response.status_code = status
    return _error_body(status, message)


async def _answer(ctx: bentoml.Context, call: Awaitable[dict]) -> dict:
    """Await an engine call; a user error becomes the answer its class maps to (tl_models.core.errors)."""
    try:
        return await call
    except UserError as exc:
        return _error(ctx, http_status(exc), exc.message)


def _admin_denied(ctx: bentoml.Context) -> dict | None:
    """None when the request carries the admin token (``Authorization: Bearer`` or ``X-TL-Admin-Token``)."""
    return _token_denied(ctx, ("TL_MODELS_ADMIN_TOKEN",), "admin endpoints")


def _feedback_denied(ctx: bentoml.Context) -> dict | None:
    """None when the request carries the feedback token or the admin token."""
    return _token_denied(ctx, ("TL_MODELS_FEEDBACK_TOKEN", "TL_MODELS_ADMIN_TOKEN"), "feedback")


def _token_denied(ctx: bentoml.Context, variables: tuple[str, ...], what: str) -> dict | None:
    """None when the request carries the token of one of ``variables``; else a 401 saying which to send."""
    tokens = [os.environ[v] for v in variables if os.environ.get(v)]
    if not tokens:
        return _error(ctx, 401, f"{what} disabled: start the service with {' or '.join(variables)} set")
    headers = ctx.request.headers
    given = headers.get("x-tl-admin-token") or headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not any(hmac.compare_digest(given.encode(), token.encode()) for token in tokens):
        return _error(ctx, 401, f"token missing or wrong: send 'Authorization: Bearer <{' or '.join(variables)}>'")
    return None


async def _heads(_: Request) -> JSONResponse:
    return JSONResponse(await asyncio.to_thread(_engine().status))


async def _reply(call: Callable[[], Awaitable[dict]]) -> JSONResponse:
    """The JSON answer of an engine call; a user error becomes the answer its class maps to."""
    try:
        return JSONResponse(await call())
    except UserError as exc:
        status = http_status(exc)
        return JSONResponse(_error_body(status, exc.message), status_code=status)


def _top_k(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip().lstrip("-").isdigit():
        raise BadRequest(f"top_k must be a valid integer, got {value!r}")
    return int(value)


FORM_URLENCODED = "application/x-www-form-urlencoded"  # a form without files: refused below, with what to send


async def _upload(request: Request) -> tuple[bytes, int | None]:
    """The image file part ``image`` and the field ``top_k`` of a multipart/form-data request."""
    if not request.headers.get("content-type", "").startswith(("multipart/form-data", FORM_URLENCODED)):
        raise BadRequest(
            "send the image as a file upload: multipart/form-data with a file part 'image' (or the image as the "
            "whole body to /classify/body)"
        )
    try:
        async with request.form(max_files=4, max_fields=16) as form:
            image = form.get("image")
            if image is None:
                raise BadRequest("field required: the file part 'image'")
            if not isinstance(image, UploadFile):  # a URL or text: never fetched
                raise BadRequest("send the image as a file upload (a file part, not text); URLs are not fetched")
            return await image.read(), _top_k(form.get("top_k"))
    except MultiPartException as exc:
        raise BadRequest(f"bad multipart body: {exc.message}") from None


async def _classify(request: Request) -> JSONResponse:
    """``POST /classify``: an image upload (multipart file part ``image``, optional field ``top_k``) -> top-k labels
    with scores, the head (name, version) that answered and the request id; ``X-TL-Key`` / ``X-TL-Head`` route it.
    A plain route, not a ``@bentoml.api``: no request model, no temporary file per upload, no response model."""

    async def call() -> dict:
        image, top_k = await _upload(request)
        return await _engine().classify(image, top_k=top_k, **_headers(request))

    return await _reply(call)


async def _classify_body(request: Request) -> JSONResponse:
    """``POST /classify/body``: ``/classify`` with the image as the whole request body (any Content-Type): no
    multipart to parse, the cheapest path for clients that can send raw bytes; ``top_k`` as a query parameter."""

    async def call() -> dict:
        top_k = _top_k(request.query_params.get("top_k"))
        return await _engine().classify(await request.body(), top_k=top_k, **_headers(request))

    return await _reply(call)


async def _embed(request: Request) -> JSONResponse:
    """``POST /embed``: an image upload (multipart file part ``image``) -> the backbone embedding."""

    async def call() -> dict:
        image, _ = await _upload(request)
        return await _engine().embed(image)

    return await _reply(call)


async def _metrics(_: Request) -> Response:
    """``GET /metrics``: every worker's Prometheus families (BentoML's multiprocess registry; its per-request
    middleware is off, see ``metrics`` below)."""
    client = BentoMLContainer.metrics_client.get()
    return Response(await asyncio.to_thread(client.generate_latest), media_type=client.CONTENT_TYPE_LATEST)


def _engine() -> ServingEngine:
    return bentoml.get_current_service().engine


def _headers(request: Request) -> dict[str, str | None]:
    return {"key": request.headers.get("x-tl-key"), "head": request.headers.get("x-tl-head")}


read_routes = Starlette(
    routes=[
        Route("/heads", _heads, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/classify", _classify, methods=["POST"]),
        Route("/classify/body", _classify_body, methods=["POST"]),
        Route("/embed", _embed, methods=["POST"]),
    ]
)


def _preflight() -> None:
    """Exit with one line when the service cannot start (runs where `bentoml serve` imports this module, before any
    worker starts: a worker whose start fails is restarted by BentoML forever). Not again in the workers (BentoML
    sets their index before importing this module): their engine reads and checks the same files.
    TL_MODELS_PREFLIGHT=0 skips it, for tools that import this module without serving it."""
    if os.environ.get("TL_MODELS_PREFLIGHT") == "0" or server_context.worker_index is not None:
        return
    try:
        backbone, heads = store.serving_sources()
        preflight(backbone, heads, ServingConfig.from_env(store.default_state_dir(backbone)))
    except UserError as exc:
        raise SystemExit(f"tl-models: the service cannot start: {exc.message}") from None


_preflight()


@bentoml.service(
    workers=int(os.environ.get("TL_MODELS_WORKERS", "1")),
    traffic={"timeout": float(os.environ.get("TL_MODELS_TIMEOUT", "60"))},
    logging={"access": {"enabled": os.environ.get("TL_MODELS_ACCESS_LOG", "1") != "0"}},
    # per-request work nothing here reads: BentoML's traffic metrics middleware (our /metrics serves the registry)
    # and OpenTelemetry spans (sampled at rate 0 unless configured; TL_MODELS_TRACING=1 keeps them)
    metrics={"enabled": False},
    **({} if os.environ.get("TL_MODELS_TRACING") == "1" else {"tracing": {"excluded_urls": ["/"]}}),
    labels={"project": "tl-models"},
    **({"resources": {"gpu": 1}} if gpu_count() else {}),
)
@bentoml.asgi_app(read_routes, path="/")
class Classifier:
    """Image classification: one shared backbone, heads chosen per request by weight, key or X-TL-Head."""

    def __init__(self) -> None:
        backbone, heads = store.serving_sources()
        self.engine = ServingEngine(
            backbone,
            heads,
            ServingConfig.from_env(store.default_state_dir(backbone)),
            find_head=lambda name, version: store.find_head(backbone.build, name, version),
        )
        self.engine.warm_up()

    def __is_ready__(self) -> bool:
        return self.engine.ready

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.engine.close()  # the judge records what is queued, writes the embedding log's last shard

    @bentoml.api(route="/predict")
    async def predict(self, tensor: np.ndarray, top_k: int | None = None, ctx: bentoml.Context = NO_CONTEXT) -> dict:
        """A preprocessed tensor (N×3×H×W pixel values 0..255) -> logits and top-k per image, from one head."""
        return await _answer(ctx, self.engine.predict(tensor, top_k=top_k, **_headers(ctx.request)))

    @bentoml.api(route="/feedback")
    async def feedback(self, request_id: str, label: str, ctx: bentoml.Context = NO_CONTEXT) -> dict:
        """The true label of an answered image: ``request_id`` from its answer (feedback token or admin token)."""
        return _feedback_denied(ctx) or await _answer(ctx, self.engine.feedback(request_id, label))

    @bentoml.api(route="/admin/weights")
    async def admin_weights(self, weights: dict[str, float], ctx: bentoml.Context = NO_CONTEXT) -> dict:
        """Set the traffic split, e.g. {"weights": {"a": 90, "b": 10}} (admin token required)."""
        return _admin_denied(ctx) or await _answer(ctx, self.engine.set_weights(weights))

    @bentoml.api(route="/admin/load")
    async def admin_load(
        self,
        head: str = "",
        version: int | None = None,
        tag: str | None = None,
        build_dir: str | None = None,
        live: bool = True,
        weight: float | None = None,
        ctx: bentoml.Context = NO_CONTEXT,
    ) -> dict:
        """Load a head version from the store (``tag``, or ``head`` + ``version`` of the served build) or from
        a build directory (``build_dir`` + ``head`` [+ ``version``]) and, if ``live``, route its name to it."""
        return _admin_denied(ctx) or await _answer(ctx, self._load(head, version, tag, build_dir, live, weight))

    @bentoml.api(route="/admin/shadow")
    async def admin_shadow(
        self,
        head: str = "",
        version: int | None = None,
        share: float = 1.0,
        tag: str | None = None,
        build_dir: str | None = None,
        ctx: bentoml.Context = NO_CONTEXT,
    ) -> dict:
        """Score a head version beside every answer on ``share`` (0..1) of requests, never returned; found like
        /admin/load. ``share`` 0 stops shadowing ``head`` (``version``, or every version)."""
        return _admin_denied(ctx) or await _answer(ctx, self._shadow(head, version, share, tag, build_dir))

    async def _shadow(
        self, head: str, version: int | None, share: float, tag: str | None, build_dir: str | None
    ) -> dict:
        source = None if share == 0 else await asyncio.to_thread(self._find, head, version, tag, build_dir)
        return await self.engine.set_shadow(source, check_name(head) if source is None else source.name, version, share)

    async def _load(
        self, head: str, version: int | None, tag: str | None, build_dir: str | None, live: bool, weight: float | None
    ) -> dict:
        source = await asyncio.to_thread(self._find, head, version, tag, build_dir)
        return await self.engine.load(source, live=live, weight=weight)

    def _find(self, head: str, version: int | None, tag: str | None, build_dir: str | None) -> HeadSource:
        """The head version named by a request: a build directory inside the build roots, or the store."""
        if build_dir:
            source = head_source_from_build(confined(build_dir, self.engine.config.build_roots), head, version)
        elif tag:
            source = store.stored_head(tag)
        elif head and version is not None:
            source = store.find_head(self.engine.backbone_source.build, head, version)
        else:
            raise BadRequest(
                'name a head: {"tag": ...}, {"head": ..., "version": ...} or {"build_dir": ..., "head": ...}'
            )
        return source

    @bentoml.api(route="/admin/unload")
    async def admin_unload(self, head: str, version: int, ctx: bentoml.Context = NO_CONTEXT) -> dict:
        """Forget a head version the route does not use (e.g. after a fleet swap's phase 1 failed elsewhere)."""
        return _admin_denied(ctx) or await _answer(ctx, self.engine.unload(head, version))

    @bentoml.api(route="/admin/sync")
    async def admin_sync(self, route: dict | None = None, ctx: bentoml.Context = NO_CONTEXT) -> dict:
        """Converge to the fleet route now: ``route`` if given and newer, else the route file (TL_MODELS_FLEET_ROUTE);
        422 with the reason when it cannot."""
        return _admin_denied(ctx) or await _answer(ctx, self.engine.sync(route))

    @bentoml.api(route="/admin/retire")
    async def admin_retire(self, head: str, ctx: bentoml.Context = NO_CONTEXT) -> dict:
        """Take a head out of the route; its share of traffic goes to the remaining heads."""
        return _admin_denied(ctx) or await _answer(ctx, self.engine.retire(head))


# mypy keeps a class's own type whatever its decorator returns: Classifier is the bentoml.Service made of it
_service = cast("bentoml.Service[Classifier]", Classifier)
_service.add_asgi_middleware(limits.BodyLimit, max_bytes=limits.max_request_bytes())
_service.models.extend(store.declared_models())  # the build's backbone and heads: `bentoml build` bundles them
for _api in _service.apis.values():  # every answer is a JSON object: spares BentoML a JSON-schema build per response
    _api.output_spec.media_type = "application/json"
