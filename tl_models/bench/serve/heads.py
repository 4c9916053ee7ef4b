"""The cost of heads: memory and latency of 1 against N heads, a live head swap under load."""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ...bento import launcher as bento_launcher
from ...core import process
from ...core.manifest import BuildDir, Manifest
from ...core.names import ROUTE_FILE
from ..loadgen import BentoCaller, drive
from .builds import head_into, weights_argument
from .loopback import bento_env, measure
from .options import BenchServeError, ServeBenchOptions


def check_heads_data(manifest: Manifest, data: Path) -> None:
    """The heads and variant parts add heads trained on ``data`` to a copy of the build: its classes must be the
    labels."""
    from ...training.data import load_image_folder

    weights_argument(manifest.weights)
    classes = load_image_folder(data).classes
    if classes != manifest.labels:
        raise BenchServeError(
            f"the heads part trains new heads on {data}, whose classes {classes} are not the "
            f"build's labels {manifest.labels}: pass --data with the build's data, or --heads 0 (and no --variant)"
        )


def _heads_build(
    build_dir: Path, data: Path, count: int, workdir: Path, progress: Callable[[str], None]
) -> tuple[Path, dict[str, int], tuple[str, int]]:
    """A copy of the build with at least ``count`` heads (new linear heads trained on ``data``'s cached
    features) and one new version of its first head. Returns the copy, the live version of each head before
    the swap, and the (head, version) to swap in."""

    copy = workdir / "heads-build"
    shutil.copytree(build_dir, copy)
    manifest = BuildDir(copy).manifest()
    live = manifest.latest_versions()

    def add(name: str, epochs: int) -> int:
        version: int = head_into(copy, data, workdir, name, epochs).head.version
        return version

    for index in range(len(live), count):
        progress(f"[bench serve] heads part: training head {index + 1} of {count}")
        live[f"bench-head-{index}"] = add(f"bench-head-{index}", 10)
    first = next(iter(live))
    progress(f"[bench serve] heads part: training a new version of head {first} (to swap in)")
    return copy, live, (first, add(first, 5))


def swap_under_load(
    url: str,
    token: str,
    build_dir: Path,
    head: str,
    version: int,
    images: list[bytes],
    clients: int = 8,
    before: float = 1.0,
    after: float = 1.0,
) -> dict:
    """``/admin/load`` of ``head:version`` from ``build_dir`` while ``clients`` threads send ``X-TL-Head: head``
    requests; the swap's wall time, failed requests (all, and while the swap ran) and who answered after it."""
    import httpx

    stop, result = threading.Event(), {}

    def load() -> None:
        result["records"] = drive(lambda: BentoCaller(url, {"X-TL-Head": head}), images, clients, stop=stop)[0]

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(before)
    begin = time.perf_counter()
    response = httpx.post(
        f"{url}/admin/load",
        json={"build_dir": str(build_dir), "head": head, "version": version},
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )
    end = time.perf_counter()
    time.sleep(after)
    stop.set()
    thread.join()
    records = result["records"]
    during = [r for r in records if r.end >= begin and r.start <= end]
    later = [r for r in records if r.start > end and r.error is None]
    return {
        "head": head,
        "version": version,
        "status": response.status_code,
        "swap_s": end - begin,
        "clients": clients,
        "requests": len(records),
        "failed": sum(r.error is not None for r in records),
        "requests_during_swap": len(during),
        "failed_during_swap": sum(r.error is not None for r in during),
        "new_version_share_after": (
            sum(r.answer.get("version") == version for r in later) / len(later) if later else None
        ),
    }


def heads_cost(
    build_dir: Path,
    data: Path,
    count: int,
    images: list[bytes],
    options: ServeBenchOptions,
    workdir: Path,
    started: list[dict],
) -> dict:
    """RSS and p50 (concurrency 1) of the BentoML service routing 1 head vs ``count`` heads of one build,
    and a live head swap under load on the ``count``-head service."""
    from ...core.routing import RoutingState

    copy, live, (swap_head, swap_version) = _heads_build(build_dir, data, count, workdir, options.progress)
    figures: dict = {"heads": {}}
    for served in (1, count):
        names = list(live)[:served]
        state = workdir / f"state-{served}-heads"
        state.mkdir(parents=True)
        RoutingState(state / ROUTE_FILE).update(weights={n: 1.0 for n in names}, versions={n: live[n] for n in names})
        token = secrets.token_hex(8)
        options.progress(f"[bench serve] heads part: bentoml serve with {served} head(s)")
        server = bento_launcher.start(
            bento_env(copy, state, workdir, token),
            log_path=workdir / f"bento-{served}.log",
            timeout=options.start_timeout,
        )
        started.append({"server": f"bentoml ({served} heads)", "pid": server.pid})
        try:
            point = measure(
                f"bentoml-http {served} head(s)",
                partial(BentoCaller, server.url),
                images,
                (1,),
                options.seconds,
                options.max_requests,
                options.progress,
            )[0]
            figures["heads"][str(served)] = {"rss_bytes": process.tree_rss(server.pid), **point}
            if served == count:
                options.progress(f"[bench serve] heads part: swapping in {swap_head}:{swap_version} under load")
                figures["swap"] = swap_under_load(server.url, token, copy, swap_head, swap_version, images)
        finally:
            server.stop()
    one, many = figures["heads"]["1"], figures["heads"][str(count)]
    figures["memory_ratio"] = many["rss_bytes"] / one["rss_bytes"]
    figures["p50_delta_ms"] = (many["p50_ms"] - one["p50_ms"]) if None not in (many["p50_ms"], one["p50_ms"]) else None
    return figures
