"""Closed-loop load over loopback: N client threads, each with its own connection, send images back to back.

A :class:`Caller` sends one image and returns the answer (or raises); :func:`drive` runs ``concurrency`` of
them for a bounded time or number of requests and records every request; :func:`summarize` turns the records
into throughput, latency percentiles and an error count. Callers exist for the BentoML service
(``POST /classify``) and for Triton over HTTP and gRPC (``tritonclient``).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from ..core.errors import BadRequest
from ..core.names import IMAGE_BYTES, LOGITS


class Caller(Protocol):
    """One client connection: ``caller(image_bytes)`` returns the answer or raises; ``close()`` ends it."""

    def __call__(self, image: bytes) -> object: ...

    def close(self) -> None: ...


class RequestFailed(RuntimeError):
    """The server answered, but not with success (HTTP status other than 200)."""


@dataclass
class Record:
    """One request: start and end (``time.perf_counter``), the error text (None on success) and the answer."""

    start: float
    end: float
    error: str | None
    answer: Any = None  # the caller's: BentoCaller's JSON answer, None from TritonCaller


class BentoCaller:
    """``POST /classify`` with a multipart image upload to the BentoML service (``body``: ``POST /classify/body``
    with the image as the whole body); returns the JSON answer. One keep-alive connection over the standard
    library's ``http.client``: the load generator shares the host's CPU with the server it measures, and httpx cost
    it 0.74-0.88 CPU-ms per request against 0.28-0.31 here (2-core AMX Xeon, concurrency 32)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 60.0, body: bool = False):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise BadRequest(f"a BentoML URL is http://host:port, got {url!r}")
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        self.headers = dict(headers or {})
        if body:
            self.path, self.prefix, self.suffix = "/classify/body", b"", b""
            self.headers["content-type"] = "image/png"
        else:
            boundary = secrets.token_hex(16)
            self.path = "/classify"
            self.headers["content-type"] = f"multipart/form-data; boundary={boundary}"
            self.prefix = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            self.suffix = f"\r\n--{boundary}--\r\n".encode()

    def __call__(self, image: bytes) -> dict:
        try:
            self.connection.request("POST", self.path, self.prefix + image + self.suffix, self.headers)
            response = self.connection.getresponse()
            text = response.read()
        except Exception:
            self.connection.close()  # the next request opens a new connection
            raise
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}: {text[:200].decode(errors='replace')}")
        answer: dict = json.loads(text)
        return answer

    def close(self) -> None:
        self.connection.close()


class TritonCaller:
    """One image as ``image_bytes`` [1, 1] BYTES to a Triton model (router or ensemble); asks for ``logits``."""

    def __init__(self, protocol: str, url: str, model: str, timeout: float = 60.0):
        if protocol == "http":
            import tritonclient.http as module

            self.client = module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        elif protocol == "grpc":
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(url)
        else:
            raise BadRequest(f"unknown Triton protocol {protocol!r}; use http or grpc")
        self.module, self.model, self.timeout = module, model, timeout
        self.outputs = [module.InferRequestedOutput(LOGITS)]

    def __call__(self, image: bytes) -> None:
        tensor = self.module.InferInput(IMAGE_BYTES, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        extra = {"client_timeout": self.timeout} if self.module.__name__.endswith("grpc") else {}
        self.client.infer(self.model, [tensor], outputs=self.outputs, **extra)

    def close(self) -> None:
        self.client.close()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def drive(
    connect: Callable[[], Caller],
    images: list[bytes],
    concurrency: int,
    seconds: float | None = None,
    max_requests: int | None = None,
    stop: threading.Event | None = None,
) -> tuple[list[Record], float, float]:
    """Run ``concurrency`` callers back to back until ``seconds`` pass, ``max_requests`` have been sent or
    ``stop`` is set (at least one bound is required). Returns every request's record and the wall seconds from
    the common start to the last answer, and the CPU seconds this process (the clients) used meanwhile. A failed
    request (or a caller that cannot connect) is an error record, never an exception here."""
    if concurrency < 1:
        raise BadRequest(f"concurrency must be at least 1, got {concurrency}")
    if seconds is None and max_requests is None and stop is None:
        raise BadRequest("give seconds, max_requests or a stop event: the load must end")
    if not images:
        raise BadRequest("no images to send")
    records: list[Record] = []
    sent = itertools.count()  # next() on it is atomic: the shared request budget
    start_line = threading.Barrier(concurrency + 1)
    window: dict[str, float] = {}

    def client(index: int) -> None:
        caller, error = None, None
        try:
            caller = connect()
        except Exception as exc:  # counted as an error record below
            error = _describe(exc)
        start_line.wait()
        if caller is None:
            now = time.perf_counter()
            records.append(Record(now, now, error))
            return
        try:
            for turn in itertools.count():
                if (
                    (stop is not None and stop.is_set())
                    or time.perf_counter() >= window["deadline"]
                    or (max_requests is not None and next(sent) >= max_requests)
                ):
                    break
                begin = time.perf_counter()
                try:
                    answer, error = caller(images[(index + turn * concurrency) % len(images)]), None
                except Exception as exc:  # the request failed: recorded, the load goes on
                    answer, error = None, _describe(exc)
                records.append(Record(begin, time.perf_counter(), error, answer))
        finally:
            caller.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    window["deadline"] = time.perf_counter() + (seconds if seconds is not None else float("inf"))
    start_line.wait()
    begin, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.join()
    return records, max(time.perf_counter() - begin, 1e-9), time.process_time() - cpu


def summarize(records: list[Record], elapsed: float, client_cpu: float) -> dict:
    """Requests, errors, successful answers per second, p50/p90/p99 latency (ms, successful requests) and the
    share of the machine's CPUs the clients themselves used (they compete with a server on the same host)."""
    latencies = np.array([1000.0 * (r.end - r.start) for r in records if r.error is None])
    errors = [r.error for r in records if r.error is not None]
    figures = {
        "requests": len(records),
        "errors": len(errors),
        "seconds": elapsed,
        "throughput": len(latencies) / elapsed,
        "first_error": errors[0] if errors else None,
        "client_cpu_share": client_cpu / elapsed / (os.cpu_count() or 1),
    }
    for q in (50, 90, 99):
        figures[f"p{q}_ms"] = float(np.percentile(latencies, q)) if len(latencies) else None
    return figures
