"""The cost of judging heads: throughput with the recorder off, on, and with a shadow head and the log."""

from __future__ import annotations

import secrets
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np

from ...bento import launcher as bento_launcher
from ...core.manifest import BuildDir
from ...core.names import ROUTE_FILE
from ..loadgen import BentoCaller
from .loopback import bento_env, measure
from .options import JUDGING_LOG_SHARE, MODES, BenchServeError, ServeBenchOptions


def judging_cost(
    build_dir: Path,
    images: list[bytes],
    options: ServeBenchOptions,
    workdir: Path,
    started: list[dict],
    rounds: int = 3,
) -> dict:
    """Throughput at the top concurrency of three BentoML services on the build: ``off`` (the recorder off,
    ``TL_MODELS_RECORD=0``), ``on`` (the default: every answer recorded, no shadow head, no log) and ``judged``
    (the second head shadowing the first on every request and :data:`JUDGING_LOG_SHARE` of requests in the embedding
    log); measured in turns (off, on, judged, off, ...) so that drift of the machine hits all alike. Ratios: on and
    judged over off."""
    from ...core.routing import RoutingState

    live = BuildDir(build_dir).manifest().latest_versions()
    if len(live) < 2:
        raise BenchServeError("--judging shadows the build's second head beside its first: the build needs two heads")
    (first, v1), (second, v2) = list(live.items())[:2]
    clients = max(options.concurrency)
    urls = {}
    with ExitStack() as servers:
        for mode in MODES:
            state = workdir / f"state-{mode}"
            RoutingState(state / ROUTE_FILE).update(
                weights={first: 1.0}, versions={first: v1}, shadow={f"{second}:{v2}": 1.0} if mode == "judged" else None
            )
            env = bento_env(build_dir, state, workdir, secrets.token_hex(8))
            env["TL_MODELS_LOG_SHARE"] = str(JUDGING_LOG_SHARE if mode == "judged" else 0)
            env["TL_MODELS_RECORD"] = "0" if mode == "off" else "1"
            env["BENTOML_HOME"] = str(workdir / f"bentoml-{mode}")  # a shared home: a start resets the other's metrics
            options.progress(f"[bench serve] judging part: starting bentoml serve ({mode})")
            server = bento_launcher.start(env, log_path=workdir / f"bento-{mode}.log", timeout=options.start_timeout)
            servers.callback(server.stop)
            started.append({"server": f"bentoml ({mode})", "pid": server.pid})
            urls[mode] = server.url
        points: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(rounds):
            for mode, url in urls.items():
                points[mode] += measure(
                    f"bentoml-http {mode}",
                    partial(BentoCaller, url),
                    images,
                    (clients,),
                    options.seconds,
                    options.max_requests,
                    options.progress,
                )
    figures: dict = {"concurrency": clients, "shadow": f"{second}:{v2}", "log_share": JUDGING_LOG_SHARE}
    for mode, rows in points.items():
        figures[mode] = {
            "throughput": float(np.mean([r["throughput"] for r in rows])),
            "p50_ms": float(np.mean([r["p50_ms"] for r in rows if r["p50_ms"] is not None] or [np.nan])),
            "errors": sum(r["errors"] for r in rows),
            "rounds": [r["throughput"] for r in rows],
        }
    figures["recording_ratio"] = figures["on"]["throughput"] / figures["off"]["throughput"]
    figures["ratio"] = figures["judged"]["throughput"] / figures["off"]["throughput"]
    return figures
