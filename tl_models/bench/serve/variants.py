"""The cost of a fine-tuned version on the build's trunk (`bench serve --variant N`).

A copy of the build gets a head ``tuned`` whose last N stages are its own (`build --fine-tune N` into the build;
trained briefly: the part measures serving cost, not accuracy). Then BentoML services on the copy, measured in
turns at the top concurrency, each with its server CPU per request:

* ``frozen``: the build's first head alone (today's graph: the whole backbone);
* ``split``: that head and ``tuned`` 50/50 (a request takes one path: the backbone, or trunk + tail);
* ``shadow``: the first head answers, ``tuned`` shadowed on every request (trunk once, both tails);
* ``naive``: the way without shared trunks, two services each running its own whole model (the frozen head's,
  ``tuned``'s), the clients alternating between them.

Ratios against ``frozen``, and the memory a tuned version adds to a worker against its tail's weight bytes.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np

from ...bento import launcher as bento_launcher
from ...core import process
from ...core.heads import latest_frozen
from ...core.manifest import BuildDir
from ...core.names import BACKBONE_ONNX, ROUTE_FILE, TAIL_ONNX
from ..loadgen import BentoCaller, Caller
from .builds import head_into, weights_argument
from .loopback import bento_env, measure
from .options import BenchServeError, ServeBenchOptions

VARIANT_MODES = ("frozen", "split", "shadow", "naive")
TUNED_HEAD = "tuned"
# the fine-tuned variants issue's targets: the split's throughput over frozen-only (resnet50 --fine-tune 1: 0.85),
# a shadowed tuned version's server CPU per request over frozen-only, the memory a tuned version adds
VARIANT_TARGETS = {"split_ratio": 0.90, "split_ratio_resnet50": 0.85, "shadow_cpu_ratio": 1.2, "memory_tail": 1.5}


class Alternating:
    """A client that sends its requests to two services in turn (the naive split, done by the client)."""

    def __init__(self, first: Caller, second: Caller):
        self.callers = (first, second)
        self.sent = 0

    def __call__(self, image: bytes) -> object:
        self.sent += 1
        return self.callers[self.sent % 2](image)

    def close(self) -> None:
        for caller in self.callers:
            caller.close()


def tuned_build(
    build_dir: Path, data: Path, stages: int, workdir: Path, progress: Callable[[str], None]
) -> tuple[Path, tuple[str, int], tuple[str, int]]:
    """A copy of the build with head ``tuned`` fine-tuned on its trunk (last ``stages`` stages); the copy, the
    frozen head version to compare with (the first head's latest frozen one) and the tuned one."""
    from ...training.config import FineTune

    manifest = BuildDir(build_dir).manifest()
    if BACKBONE_ONNX not in manifest.top_files:
        raise BenchServeError(f"--variant serves a tuned version beside {build_dir}'s heads: export the build first")
    frozen = latest_frozen(manifest)[0]
    weights_argument(manifest.weights)  # a build whose weights cannot be loaded again: refused before the copy
    copy = workdir / "variant-build"
    shutil.copytree(build_dir, copy)
    progress(f"[bench serve] variant part: fine-tuning the last {stages} stage(s) of a head {TUNED_HEAD!r}")
    # a weak stage 1 and a quick stage 2 that beats it, so that the tail is kept (cost, not accuracy)
    tune = FineTune(stages=stages, lr=3e-5, epochs=2, augment=("crop",))
    report = head_into(copy, data, workdir, TUNED_HEAD, 1, tune)
    if report.head.tail is None:
        raise BenchServeError(
            f"fine-tuning {manifest.backbone}'s last {stages} stage(s) on {data} did not beat the frozen head, so "
            "there is no tuned version to serve: give other --data or another --variant"
        )
    return copy, (frozen.name, frozen.version), (report.head.name, report.head.version)


def variant_cost(
    build_dir: Path,
    data: Path,
    stages: int,
    images: list[bytes],
    options: ServeBenchOptions,
    workdir: Path,
    started: list[dict],
    rounds: int = 2,
) -> dict:
    """The services of the module docstring, measured in ``rounds`` turns at the top concurrency; the figures."""
    from ...core.routing import RoutingState

    copy, (frozen, fv), (tuned, tv) = tuned_build(build_dir, data, stages, workdir, options.progress)
    routes = {  # name -> (weights, versions, shadow)
        "frozen": ({frozen: 1.0}, {frozen: fv}, {}),
        "split": ({frozen: 1.0, tuned: 1.0}, {frozen: fv, tuned: tv}, {}),
        "shadow": ({frozen: 1.0}, {frozen: fv}, {f"{tuned}:{tv}": 1.0}),
        "tuned": ({tuned: 1.0}, {tuned: tv}, {}),  # the naive way's second service
    }
    clients = max(options.concurrency)
    pids, urls = {}, {}
    with ExitStack() as servers:
        for name, (weights, versions, shadow) in routes.items():
            state = workdir / f"state-variant-{name}"
            RoutingState(state / ROUTE_FILE).update(weights=weights, versions=versions, shadow=shadow)
            env = bento_env(copy, state, workdir, secrets.token_hex(8), workers=options.processes)
            env["BENTOML_HOME"] = str(workdir / f"bentoml-variant-{name}")
            options.progress(f"[bench serve] variant part: starting bentoml serve ({name})")
            server = bento_launcher.start(
                env, log_path=workdir / f"bento-variant-{name}.log", timeout=options.start_timeout
            )
            servers.callback(server.stop)
            started.append({"server": f"bentoml (variant {name})", "pid": server.pid})
            pids[name], urls[name] = server.pid, server.url
        points: dict[str, list[dict]] = {mode: [] for mode in VARIANT_MODES}
        for _ in range(rounds):
            for mode in VARIANT_MODES:
                points[mode].append(_point(mode, urls, pids, images, clients, options))
        rss = {name: process.tree_rss(pids[name]) for name in ("frozen", "split")}
    figures: dict = {
        "stages": stages,
        "concurrency": clients,
        "frozen_head": f"{frozen}:{fv}",
        "tuned_head": f"{tuned}:{tv}",
        "tail_bytes": (copy / BuildDir(copy).manifest().head(tuned, tv).rel(TAIL_ONNX)).stat().st_size,
        "rss_bytes": rss,
    }
    for mode, rows in points.items():
        cpu = [r["server_cpu_ms_per_request"] for r in rows if r["server_cpu_ms_per_request"] is not None]
        figures[mode] = {
            "throughput": float(np.median([r["throughput"] for r in rows])),
            "server_cpu_ms_per_request": float(np.median(cpu)) if cpu else None,
            "p50_ms": float(np.median([r["p50_ms"] for r in rows if r["p50_ms"] is not None] or [np.nan])),
            "errors": sum(r["errors"] for r in rows),
            "rounds": [r["throughput"] for r in rows],
        }
    base = figures["frozen"]
    for mode in ("split", "shadow", "naive"):
        figures[mode]["throughput_ratio"] = figures[mode]["throughput"] / base["throughput"]
        cpu, base_cpu = figures[mode]["server_cpu_ms_per_request"], base["server_cpu_ms_per_request"]
        figures[mode]["cpu_ratio"] = cpu / base_cpu if cpu and base_cpu else None
    figures["memory_over_tail"] = (rss["split"] - rss["frozen"]) / figures["tail_bytes"]
    return figures


def _point(
    mode: str, urls: dict[str, str], pids: dict[str, int], images: list[bytes], clients: int, options: ServeBenchOptions
) -> dict:
    """One measurement of ``mode`` (the naive way: both of its services, their CPU added up)."""
    if mode != "naive":
        connect: Callable[[], Caller] = partial(BentoCaller, urls[mode])
        return measure(
            f"bentoml-http variant {mode}",
            connect,
            images,
            (clients,),
            options.seconds,
            options.max_requests,
            options.progress,
            pids[mode],
        )[0]
    pair = (pids["frozen"], pids["tuned"])
    before = sum(process.tree_cpu_seconds(pid) for pid in pair)
    row = measure(
        "bentoml-http variant naive (two services)",
        lambda: Alternating(BentoCaller(urls["frozen"]), BentoCaller(urls["tuned"])),
        images,
        (clients,),
        options.seconds,
        options.max_requests,
        options.progress,
    )[0]
    spent = sum(process.tree_cpu_seconds(pid) for pid in pair) - before  # (the warm-up's share is small)
    row["server_cpu_ms_per_request"] = 1000.0 * spent / row["requests"] if row["requests"] else None
    return row


def variant_targets(figures: dict, backbone: str) -> list[dict]:
    """The variants issue's targets on the figures of :func:`variant_cost`."""
    split = VARIANT_TARGETS["split_ratio_resnet50" if backbone == "resnet50" else "split_ratio"]
    clean = all(figures[mode]["errors"] == 0 for mode in VARIANT_MODES)
    shadow_cpu = figures["shadow"]["cpu_ratio"]
    return [
        {
            "target": f"a 50/50 split frozen vs tuned (--fine-tune {figures['stages']}) >= {split}x the frozen-only "
            f"throughput at concurrency {figures['concurrency']}",
            "value": figures["split"]["throughput_ratio"],
            "met": clean and figures["split"]["throughput_ratio"] >= split,
        },
        {
            "target": f"the tuned version shadowed on every request: server CPU per request <= "
            f"{VARIANT_TARGETS['shadow_cpu_ratio']}x frozen-only",
            "value": shadow_cpu if shadow_cpu is not None else float("nan"),
            "met": clean and shadow_cpu is not None and shadow_cpu <= VARIANT_TARGETS["shadow_cpu_ratio"],
        },
        {
            "target": f"a worker with the tuned version <= frozen-only RSS + {VARIANT_TARGETS['memory_tail']}x its "
            "tail's weight bytes",
            "value": figures["memory_over_tail"],
            "met": figures["memory_over_tail"] <= VARIANT_TARGETS["memory_tail"],
        },
    ]


def variant_rows(figures: dict, fmt_ms: Callable[[float | None], str]) -> list[tuple[str, str]]:
    """The table's rows of the variant part: each service's throughput, CPU, errors; the memory."""
    rows = []
    for mode in VARIANT_MODES:
        point = figures[mode]
        cpu = point["server_cpu_ms_per_request"]
        ratio = f", x{point['throughput_ratio']:.2f} frozen" if "throughput_ratio" in point else ""
        rows.append(
            (
                f"bentoml variant {mode} ({figures['tuned_head']} beside {figures['frozen_head']}), concurrency "
                f"{figures['concurrency']}",
                f"{point['throughput']:.1f} req/s{ratio}, "
                + (f"{cpu:.1f} CPU-ms/req, " if cpu is not None else "")
                + f"p50 {fmt_ms(point['p50_ms'])}, {point['errors']} errors",
            )
        )
    rss = figures["rss_bytes"]
    rows.append(
        (
            "bentoml variant memory",
            f"frozen {rss['frozen'] / 2**20:.0f} MiB, split {rss['split'] / 2**20:.0f} MiB, tail.onnx "
            f"{figures['tail_bytes'] / 2**20:.1f} MiB ({figures['memory_over_tail']:.2f}x its bytes added)",
        )
    )
    return rows
