"""HTTP-level bounds of the BentoML service: request body size (uploads are never fetched from a URL: ``/classify``
and ``/embed`` take file parts only, see service.py).

* :class:`BodyLimit` (ASGI middleware) answers 413 with a JSON error when a request body is larger than
  ``TL_MODELS_MAX_REQUEST_BYTES`` (default 16 MiB): at once when ``Content-Length`` says so, or as soon as a
  streamed (chunked) body passes the bound. BentoML 1.4 has no request-size setting of its own.

The request timeout is BentoML's ``traffic.timeout`` (answer 504), set from ``TL_MODELS_TIMEOUT`` in service.py.
"""

from __future__ import annotations

import json
import os

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024


def max_request_bytes() -> int:
    """The body-size bound in bytes from ``TL_MODELS_MAX_REQUEST_BYTES`` (default 16 MiB)."""
    return int(os.environ.get("TL_MODELS_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES))


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes``."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send, size: str) -> None:
        body = json.dumps(
            {
                "error": f"request body too large: {size}, the limit is {self.max_bytes} bytes "
                "(TL_MODELS_MAX_REQUEST_BYTES)",
                "status": 413,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:  # the HTTP server holds the body to its declared length
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._refuse(send, f"{int(declared)} bytes")
            return await self.app(scope, receive, send)
        chunks, size = [], 0  # no length declared (chunked): read within the bound, then hand the body on
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, f"more than {self.max_bytes} bytes")
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)
