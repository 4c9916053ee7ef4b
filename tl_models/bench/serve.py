"""`tl-models bench serve`: what serving costs on top of the model, for one build, every stack in one run.

In process (the ceiling): ONNX Runtime on the build's fused graph (backbone + head, the nodes the servers run)
and PyTorch eager, at batch 1, 8 and 32. Over loopback (:mod:`tl_models.bench.loadgen`): the BentoML service
(``POST /classify``) and the Triton router over HTTP and gRPC, at client concurrency 1, 8 and 32. Then the
cost of heads: RSS of the BentoML server's process tree and its p50 with 1 head and with N heads on one
backbone, and a live head swap (``/admin/load``) under load. Servers are started and stopped here unless
their URLs are given. With ``int8``, ONNX Runtime and the servers started here run again on the build's int8
backbone (stacks suffixed ``-int8``; each compared with int8 ONNX Runtime). With ``judging``, the cost of judging
heads: BentoML throughput at the top concurrency without and with one shadow head and 10 % of requests in the
embedding log (two services, measured in turns). With ``processes``, the BentoML service and Triton's router
started here run that many workers / instances. With ``rounds`` above 1, the in-process points and the servers'
points are measured that many times in turn (the servers restarted each round) and each server point is compared
with its own round's ONNX Runtime: on a shared host whose speed drifts by a fifth within minutes, a target is
judged on the median of the rounds' ratios, not on one point. Figures: a table, JSON (``json_path``) and a PNG
(``plot_path``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

from ..bento import launcher as bento_launcher
from ..core import process
from ..core.errors import UserError
from ..core.manifest import BuildDir, HeadEntry, Manifest
from ..core.names import ROUTE_FILE
from ..core.preprocess import Preprocessing, preprocess_bytes
from ..triton import launcher as triton_launcher
from . import profile as profiler
from .loadgen import BentoCaller, Caller, TritonCaller, drive, summarize
from .report import format_table, side_by_side_images_per_second, write_json

IN_PROCESS = ("onnxruntime", "torch")
SERVERS = ("bentoml-http", "bentoml-body", "triton-http", "triton-grpc")  # bentoml-body: POST /classify/body
STACKS = IN_PROCESS + SERVERS
TARGETS = {  # the serving overhead issue's: throughput and overhead against raw ONNX Runtime, CPU above it
    "throughput_ratio": 0.75,
    "overhead_ms": 4.0,
    "cpu_over_ort_ms": 3.0,
    "heads_memory": 1.10,
    "swap_s": 1.0,
    "recording_ratio": 0.97,
    "judging_ratio": 0.95,
}
JUDGING_LOG_SHARE = 0.1
MODES = ("off", "on", "judged")  # of the judging part: recorder off, on (default), shadow head + log


class BenchServeError(UserError):
    """A setting that cannot be benchmarked (bad option, build unusable for the heads part)."""


@dataclass
class ServeBenchOptions:
    """What `tl-models bench serve` takes; :meth:`check` rejects bad values with a clear message."""

    build_dir: Path | None = None
    backbone: str = "mobilenet_v2"
    weights: str = "IMAGENET1K_V1"
    data: Path | None = None
    stacks: tuple[str, ...] = STACKS
    batches: tuple[int, ...] = (1, 8, 32)
    concurrency: tuple[int, ...] = (1, 8, 32)
    seconds: float = 5.0
    max_requests: int = 5000
    heads: int = 10
    bento_url: str | None = None
    triton_http_url: str | None = None
    triton_grpc_url: str | None = None
    triton_model: str | None = None
    workdir: Path | None = None
    start_timeout: float = 600.0
    json_path: Path | None = None
    plot_path: Path | None = None
    int8: bool = False
    judging: bool = False
    profile: bool = False  # py-spy samples each server started here at the top concurrency (first round)
    rounds: int = 1  # in-process and server points measured this many times in turn; targets on the median
    processes: int | None = None  # BentoML workers and Triton router instances of the servers started here
    progress: Callable[[str], None] = field(default=lambda line: print(line, flush=True), repr=False)

    def check(self) -> ServeBenchOptions:
        unknown = [s for s in self.stacks if s not in STACKS]
        if unknown or not self.stacks:
            raise BenchServeError(f"unknown stack(s) {unknown or '(none given)'}; choose from {', '.join(STACKS)}")
        for what, values in (("batch", self.batches), ("concurrency", self.concurrency)):
            if not values or min(values) < 1:
                raise BenchServeError(f"every {what} must be at least 1, got {list(values)}")
        if self.seconds <= 0 or self.max_requests < 1:
            raise BenchServeError(f"seconds must be > 0 and max requests >= 1, got {self.seconds}, {self.max_requests}")
        if self.rounds < 1 or (self.processes is not None and self.processes < 1):
            raise BenchServeError(f"rounds and processes must be at least 1, got {self.rounds}, {self.processes}")
        if self.heads == 1 or self.heads < 0:
            raise BenchServeError(f"heads must be 0 (skip the heads part) or at least 2, got {self.heads}")
        if self.build_dir is not None and not BuildDir(self.build_dir).exists():
            raise BenchServeError(f"{self.build_dir} is not a build directory (no manifest.json)")
        if self.profile and profiler.available() is None:
            raise BenchServeError("--profile samples the servers with py-spy: pip install py-spy")
        return self


# ---------------------------------------------------------------- the build and the images


def _default_build(options: ServeBenchOptions, data: Path, workdir: Path) -> Path:
    """Heads ``a`` (linear) and ``b`` (mlp) on ``data``, exported with parity checked (like the tests' build)."""
    from ..training.config import TrainConfig
    from ..training.options import BuildOptions
    from ..training.pipeline import build

    out = workdir / "build"
    for name, kind in (("a", "linear"), ("b", "mlp")):
        options.progress(f"[bench serve] building head {name} ({kind}) on {options.backbone} [{options.weights}]")
        build(
            BuildOptions(
                data=data,
                out=out,
                backbone=options.backbone,
                weights=options.weights,
                kind=kind,
                head=name,
                hidden=256,
                train=TrainConfig(epochs=15),
                cache_dir=workdir / "cache",
                progress=False,
            )
        )
    return out


def _images(data: Path, count: int = 20) -> list[bytes]:
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise BenchServeError(f"no PNG/JPEG images under {data}")
    return [p.read_bytes() for p in paths[:: max(1, len(paths) // count)][:count]]


def _first_head(manifest: Manifest) -> HeadEntry:
    """The latest version of the build's first head (what the in-process stacks run)."""
    return manifest.head(manifest.heads[0].name)


def _int8_backbone(build_dir: Path, own: bool, progress: Callable[[str], None]) -> None:
    """Make sure the build has an int8 backbone that may serve on this CPU: quantize the benchmark's own build with
    the accuracy gate open (a speed figure, not an accuracy one), each integer type tried and the fastest here
    chosen, as the gate chooses; a user's build must have passed `tl-models quantize` (or `--verify`) here."""
    from ..core.heads import backbone_from_build

    build = BuildDir(build_dir)
    try:
        backbone_from_build(build, build.manifest(), "int8").check_machine()
        return
    except UserError as exc:
        if not own:
            raise BenchServeError(f"--int8: {exc.message}") from None
    from ..training.quantize import Calibration, Gate, quantize

    progress(
        "[bench serve] quantizing the benchmark's build to int8 (accuracy gate open: a speed figure, not an "
        "accuracy one; the fastest integer type here)"
    )
    report = quantize(
        build_dir,
        Calibration(images=16),
        Gate(min_agreement=0.0, max_accuracy_drop=1.0, min_speedup=0.0),
        search="types",
    )
    chosen = report.chosen
    assert chosen is not None  # quantize refuses when no setting passed
    progress(f"[bench serve] int8: {chosen.calibration.label()}, {chosen.speedup:.2f}x fp32 at batch 32")


# ---------------------------------------------------------------- in process


def in_process(
    build_dir: Path,
    batches: tuple[int, ...],
    seconds: float,
    stacks: tuple[str, ...],
    progress: Callable[[str], None],
    precisions: tuple[str, ...] = ("fp32",),
    images: Sequence[bytes] = (),
) -> list[dict]:
    """Images/s and ms per batch of ONNX Runtime (the fused graph: backbone + head composed in memory, the nodes the
    servers run; once per precision) and PyTorch eager (backbone + head) per batch. ONNX Runtime twice: one session
    with ONNX Runtime's threads, and (on a machine with several cores) one single-threaded session per core side by
    side, as the BentoML service's lanes run: the best of both is the ceiling the servers are compared with. With
    ``images``, fp32 ONNX Runtime once more each way at batch 1 decoding each image first (rows with ``decode``):
    what a program of its own over ONNX Runtime does per encoded image, as the servers do."""
    import torch

    from ..core.names import BACKBONE_FILES, HEAD_ONNX
    from ..core.runtime import active_provider, available_cores, create_session
    from ..training.build_backbone import load_build_backbone
    from ..training.export import fuse
    from ..training.pipeline import load_head_module

    build = BuildDir(build_dir)
    manifest = build.manifest()
    head = _first_head(manifest)
    size = tuple(manifest.input_size)
    cores = available_cores()
    runners: dict[tuple[str, int], list[Any]] = {}  # (stack, sessions) -> sessions, or the torch model
    for precision in precisions if "onnxruntime" in stacks else ():
        graph = fuse(build.file(BACKBONE_FILES[precision]), build.file(head.rel(HEAD_ONNX)), {})
        stack = _stack("onnxruntime", precision)
        runners[(stack, 1)] = [create_session(graph)]
        if cores > 1:
            runners[(stack, cores)] = [create_session(graph, threads=1) for _ in range(cores)]
    if "torch" in stacks:
        model = torch.nn.Sequential(load_build_backbone(build, manifest).module, load_head_module(build, head)).eval()
        runners[("torch", 1)] = [model]
    spec = Preprocessing.from_dict(manifest.preprocessing)
    points = [(key, batch, False) for key in runners for batch in batches]
    if images:
        points += [(key, 1, True) for key in runners if key[0] == "onnxruntime"]
    rows = []
    for (stack, count), batch, decode in points:
        engines = runners[(stack, count)]
        way = f"{count} single-threaded sessions side by side, " if count > 1 else ""
        progress(f"[bench serve] {stack} in process: {way}{'decode + pass, ' if decode else ''}batch {batch}")
        if decode:
            # each session starts at its own image and takes them in turn
            calls = [
                partial(_decode_forward, engine, islice(cycle(images), i, None), spec)
                for i, engine in enumerate(engines)
            ]
        else:
            pixels = np.random.default_rng(batch).integers(0, 256, (batch, *size), dtype=np.uint8)
            calls = [partial(_forward, engine, pixels) for engine in engines]
        cpu, wall = time.process_time(), time.perf_counter()
        ips, ms = side_by_side_images_per_second(calls, batch, seconds)
        busy = (time.process_time() - cpu) / (time.perf_counter() - wall)  # cores kept busy
        rows.append(
            {
                "stack": stack,
                "precision": _precision(stack),
                "batch": batch,
                "sessions": count,
                "decode": decode,
                "throughput": ips,
                "ms_per_batch": ms,
                "cpu_ms_per_image": 1000.0 * busy / ips,
                "threads": torch.get_num_threads() if stack == "torch" else (1 if count > 1 else None),
                "provider": "torch eager" if stack == "torch" else active_provider(engines[0]),
            }
        )
    return rows


def _decode_forward(session: Any, images: Iterator[bytes], spec: Preprocessing) -> object:
    """Decode the next of ``images`` with the build's preprocessing, then one batch-1 pass."""
    return _forward(session, preprocess_bytes(next(images), spec)[None])


def _forward(engine: Any, pixels: np.ndarray) -> object:
    """One pass of an ONNX Runtime session or a torch module (PyTorch eager) over ``pixels``."""
    if hasattr(engine, "get_inputs"):
        return engine.run(None, {engine.get_inputs()[0].name: pixels})
    import torch

    with torch.inference_mode():
        return engine(torch.from_numpy(pixels))


# ---------------------------------------------------------------- over loopback


def measure(
    stack: str,
    connect: Callable[[], Caller],
    images: list[bytes],
    concurrency: tuple[int, ...],
    seconds: float,
    max_requests: int,
    progress: Callable[[str], None],
    server_pid: int | None = None,
    profile_to: Path | None = None,
) -> list[dict]:
    """One point per concurrency (after a short warm-up at that concurrency): throughput, latency, errors, and
    for a server started here (``server_pid``) the CPU its process tree spent per request; with ``profile_to``,
    a py-spy profile of that tree during the top concurrency's point (:mod:`tl_models.bench.profile`)."""
    rows = []
    for clients in concurrency:
        progress(f"[bench serve] {stack}: concurrency {clients}, {seconds:g} s or {max_requests} requests")
        drive(connect, images, clients, max_requests=2 * clients)  # warm-up: connections, batch sizes
        cpu = process.tree_cpu_seconds(server_pid) if server_pid else None
        sampler = None
        if profile_to is not None and server_pid is not None and clients == max(concurrency):
            sampler = profiler.record(server_pid, seconds, profile_to)
        row = {
            "stack": stack,
            "precision": _precision(stack),
            "concurrency": clients,
            **summarize(*drive(connect, images, clients, seconds, max_requests)),
        }
        server_cpu = None
        if cpu is not None and row["requests"]:
            assert server_pid  # cpu is only read for a server started here
            server_cpu = 1000.0 * (process.tree_cpu_seconds(server_pid) - cpu) / row["requests"]
        row["server_cpu_ms_per_request"] = server_cpu
        if sampler is not None and profile_to is not None:
            row["profile"] = profiler.finish(sampler, profile_to, timeout=seconds + 60)
        progress(
            f"    {row['throughput']:.1f} req/s, p50 {_ms(row['p50_ms'])}, p99 {_ms(row['p99_ms'])}, "
            f"{row['errors']} errors of {row['requests']}, clients used {row['client_cpu_share']:.0%} CPU"
            + (f", server {server_cpu:.1f} CPU-ms per request" if server_cpu is not None else "")
            + (f" (first: {row['first_error']})" if row["first_error"] else "")
        )
        rows.append(row)
    return rows


def _stack(stack: str, precision: str) -> str:
    """A stack's name in the figures: ``-int8`` appended for the int8 backbone."""
    return stack if precision == "fp32" else f"{stack}-{precision}"


def _precision(stack: str) -> str:
    return "int8" if stack.endswith("-int8") else "fp32"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _bento_env(
    build_dir: Path, state_dir: Path, workdir: Path, token: str, precision: str = "fp32", workers: int | None = None
) -> dict[str, str]:
    """The service on ``build_dir`` as deployed for throughput (no access log line per request);
    ``/admin/load`` may load builds under ``workdir`` (the heads build); ``workers`` (None: the environment's)."""
    return bento_launcher.service_environment(
        build_dir=build_dir,
        state_dir=state_dir,
        precision=precision,
        workers=workers,
        extra={
            "BENTOML_HOME": str(workdir / "bentoml"),
            "TL_MODELS_ADMIN_TOKEN": token,
            "TL_MODELS_BUILD_ROOTS": str(workdir.resolve()),
            "TL_MODELS_ACCESS_LOG": "0",
        },
    )


def _servers(
    options: ServeBenchOptions,
    wanted: tuple[str, ...],
    build_dir: Path,
    workdir: Path,
    stack: ExitStack,
    started: list[dict],
    precision: str = "fp32",
) -> dict[str, tuple[Callable[[], Caller], int | None]]:
    """A caller factory per ``wanted`` server stack, with the PID of the server if started here; starts (and
    registers the stop of) the servers whose URL is not given. For int8 only servers started here are measured
    (the precision of a server given by URL is not this command's to choose)."""
    manifest = BuildDir(build_dir).manifest()
    callers: dict[str, tuple[Callable[[], Caller], int | None]] = {}
    given = {
        "bentoml-http": options.bento_url,
        "bentoml-body": options.bento_url,
        "triton-http": options.triton_http_url,
        "triton-grpc": options.triton_grpc_url,
    }
    if precision != "fp32":
        wanted = tuple(s for s in wanted if given[s] is None)
        given = {name: None for name in given}
    suffix = "" if precision == "fp32" else f"-{precision}"
    bento = [s for s in ("bentoml-http", "bentoml-body") if s in wanted]
    if bento:
        url, pid = given["bentoml-http"], None
        if url is None:
            options.progress(f"[bench serve] starting bentoml serve ({precision} backbone)")
            state = workdir / f"state-main{suffix}"
            server = bento_launcher.start(
                _bento_env(build_dir, state, workdir, secrets.token_hex(8), precision, options.processes),
                log_path=workdir / f"bento-main{suffix}.log",
                timeout=options.start_timeout,
            )
            stack.callback(server.stop)
            started.append({"server": "bentoml", "precision": precision, "pid": server.pid})
            url, pid = server.url, server.pid
        for way in bento:
            callers[_stack(way, precision)] = partial(BentoCaller, url, body=way == "bentoml-body"), pid
    triton = [s for s in ("triton-http", "triton-grpc") if s in wanted]
    urls = {name: given[name] for name in ("triton-http", "triton-grpc")}
    pids: dict[str, int | None] = {name: None for name in triton}
    if any(urls[s] is None for s in triton):
        from ..triton.config import RepositoryOptions
        from ..triton.repository import write_repository

        options.progress(
            f"[bench serve] writing the Triton model repository and starting tritonserver ({precision} backbone)"
        )
        repo = write_repository(
            build_dir,
            workdir / f"model_repository{suffix}",
            RepositoryOptions(flavour="python", precision=precision, instances=options.processes or 1),
        )
        tritonserver = triton_launcher.start(
            repo.path, workdir=workdir / f"tritonserver{suffix}", timeout=options.start_timeout
        )
        stack.callback(tritonserver.stop)
        started.append({"server": "tritonserver", "precision": precision, "pid": tritonserver.pid})
        pids = {name: None if urls[name] else tritonserver.pid for name in triton}
        urls = {
            "triton-http": urls["triton-http"] or tritonserver.http_url,
            "triton-grpc": urls["triton-grpc"] or tritonserver.grpc_url,
        }
    model = options.triton_model or manifest.name
    for name in triton:
        protocol, triton_url = name.split("-")[1], urls[name]
        assert triton_url is not None  # given, or the tritonserver started above
        callers[_stack(name, precision)] = partial(TritonCaller, protocol, triton_url, model), pids[name]
    return callers


# ---------------------------------------------------------------- heads: memory, latency, live swap


def _weights_argument(weights_id: str) -> tuple[str, int]:
    """The ``--weights`` value and seed that reproduce a manifest's weights id (new heads must match it)."""
    if weights_id.startswith("none:seed="):
        return "none", int(weights_id.split("=", 1)[1])
    if weights_id.startswith("torchvision:"):
        return weights_id.rsplit(".", 1)[-1], 0
    raise BenchServeError(
        f"the heads part adds heads to a copy of the build, which needs its weights again; "
        f"{weights_id!r} cannot be reloaded by name: use --heads 0"
    )


def _check_heads_data(manifest: Manifest, data: Path) -> None:
    """The heads part adds heads trained on ``data`` to a copy of the build: its classes must be the labels."""
    from ..training.data import load_image_folder

    _weights_argument(manifest.weights)
    classes = load_image_folder(data).classes
    if classes != manifest.labels:
        raise BenchServeError(
            f"the heads part trains new heads on {data}, whose classes {classes} are not the "
            f"build's labels {manifest.labels}: pass --data with the build's data, or --heads 0"
        )


def _heads_build(
    build_dir: Path, data: Path, count: int, workdir: Path, progress: Callable[[str], None]
) -> tuple[Path, dict[str, int], tuple[str, int]]:
    """A copy of the build with at least ``count`` heads (new linear heads trained on ``data``'s cached
    features) and one new version of its first head. Returns the copy, the live version of each head before
    the swap, and the (head, version) to swap in."""
    from ..training.config import TrainConfig
    from ..training.options import BuildOptions
    from ..training.pipeline import build

    copy = workdir / "heads-build"
    shutil.copytree(build_dir, copy)
    manifest = BuildDir(copy).manifest()
    weights, seed = _weights_argument(manifest.weights)
    live = manifest.latest_versions()

    def add(name: str, epochs: int) -> int:
        report = build(
            BuildOptions(
                data=data,
                out=copy,
                backbone=manifest.backbone,
                weights=weights,
                kind="linear",
                head=name,
                train=TrainConfig(epochs=epochs, seed=seed),
                cache_dir=workdir / "cache",
                progress=False,
            )
        )
        return report.head.version

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
    from ..core.routing import RoutingState

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
            _bento_env(copy, state, workdir, token),
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


# ---------------------------------------------------------------- judging: shadow head and embedding log


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
    from ..core.routing import RoutingState

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
            env = _bento_env(build_dir, state, workdir, secrets.token_hex(8))
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


# ---------------------------------------------------------------- ratios, targets, output


def _ratios(figures: dict) -> None:
    """Server throughput / raw ORT best, p50 at concurrency 1 minus raw ORT batch-1 ms, server CPU per request minus
    raw ORT's least CPU per image and, at concurrency 1, minus one session's CPU per image at batch 1 (the pass a lone
    request gets: ``cpu_over_pass_ms``), on each server row (against ONNX Runtime of the same precision, in the same
    round). The references (``ort_best``, ``ort_decode_best``, ``ort_best_int8``): the median of the rounds', with
    each round's in ``rounds``."""
    references: dict[str, list[dict]] = {}
    for index in sorted({row["round"] for row in figures["in_process"]}):
        in_round = [r for r in figures["in_process"] if r["round"] == index]
        servers = [r for r in figures["servers"] if r["round"] == index]
        for name, reference in _round_ratios(in_round, servers).items():
            references.setdefault(name, []).append(reference)
    for name, per_round in references.items():
        each = [r["throughput"] for r in per_round]
        figures[name] = {**per_round[0], "throughput": _median(each), "rounds": each}


def _round_ratios(in_process_rows: list[dict], servers: list[dict]) -> dict[str, dict]:
    """:func:`_ratios` for one round's rows; returns that round's references."""
    references: dict[str, dict] = {}
    decoding = [r for r in in_process_rows if r["decode"]]
    if decoding:
        references["ort_decode_best"] = {"throughput": max(r["throughput"] for r in decoding)}
    for precision in ("fp32", "int8"):
        ort = [r for r in in_process_rows if r["stack"] == _stack("onnxruntime", precision) and not r["decode"]]
        if not ort:
            continue
        best = max(ort, key=lambda r: r["throughput"])
        references["ort_best" if precision == "fp32" else f"ort_best_{precision}"] = {
            "batch": best["batch"],
            "throughput": best["throughput"],
        }
        single = next((r for r in ort if r["batch"] == 1 and r.get("sessions", 1) == 1), None)
        leanest = min(r["cpu_ms_per_image"] for r in ort)
        for row in (r for r in servers if r["precision"] == precision):
            row["vs_ort_best"] = row["throughput"] / best["throughput"]
            if decoding and precision == "fp32":
                row["vs_ort_decode_best"] = row["throughput"] / references["ort_decode_best"]["throughput"]
            cpu = row.get("server_cpu_ms_per_request")
            if cpu is not None:
                row["cpu_over_ort_ms"] = cpu - leanest
            if row["concurrency"] == 1 and single is not None:  # against the pass a lone request gets
                if row["p50_ms"] is not None:
                    row["overhead_ms"] = row["p50_ms"] - single["ms_per_batch"]
                if cpu is not None:
                    row["cpu_over_pass_ms"] = cpu - single["cpu_ms_per_image"]
    return references


def _median(values: list[float]) -> float:
    return float(np.median(values))


def targets(figures: dict) -> list[dict]:
    """The issue's CPU targets, each with the measured value and whether it was met."""
    out = []
    top = max((r["concurrency"] for r in figures["servers"]), default=None)
    points: dict[tuple[str, int], list[dict]] = {}
    for row in figures["servers"]:
        points.setdefault((row["stack"], row["concurrency"]), []).append(row)
    for (stack, clients), rows in points.items():
        if clients == top and all("vs_ort_best" in r for r in rows):
            out.append(
                _target(
                    f"{stack}: throughput at concurrency {top} >= {TARGETS['throughput_ratio']}x raw ORT best",
                    [r["vs_ort_best"] for r in rows],
                    at_least=TARGETS["throughput_ratio"],
                    clean=all(r["errors"] == 0 for r in rows),
                )
            )
        if all("overhead_ms" in r for r in rows):
            out.append(
                _target(
                    f"{stack}: serving overhead at concurrency 1 <= {TARGETS['overhead_ms']} ms p50",
                    [r["overhead_ms"] for r in rows],
                    at_most=TARGETS["overhead_ms"],
                )
            )
        if all("cpu_over_ort_ms" in r for r in rows):
            out.append(
                _target(
                    f"{stack}: server CPU per request at concurrency {clients} <= raw ORT's least CPU per image + "
                    f"{TARGETS['cpu_over_ort_ms']} ms",
                    [r["cpu_over_ort_ms"] for r in rows],
                    at_most=TARGETS["cpu_over_ort_ms"],
                )
            )
    heads = figures.get("heads_cost")
    if heads:
        out.append(
            {
                "target": f"{figures['heads_count']} heads cost <= 10% more memory than 1 head",
                "value": heads["memory_ratio"],
                "met": heads["memory_ratio"] <= TARGETS["heads_memory"],
            }
        )
        swap = heads["swap"]
        out.append(
            {
                "target": "head swap under load < 1 s with zero failed requests",
                "value": swap["swap_s"],
                "met": swap["status"] == 200 and swap["swap_s"] < TARGETS["swap_s"] and swap["failed"] == 0,
            }
        )
    judging = figures.get("judging_cost")
    if judging:
        out.append(
            {
                "target": f"recording every answer keeps >= {TARGETS['recording_ratio']}x the throughput with the "
                f"recorder off at concurrency {judging['concurrency']}",
                "value": judging["recording_ratio"],
                "met": judging["recording_ratio"] >= TARGETS["recording_ratio"] and judging["on"]["errors"] == 0,
            }
        )
        out.append(
            {
                "target": f"one shadow head and {JUDGING_LOG_SHARE:.0%} logging keep >= "
                f"{TARGETS['judging_ratio']}x the recorder-off throughput at concurrency {judging['concurrency']}",
                "value": judging["ratio"],
                "met": judging["ratio"] >= TARGETS["judging_ratio"] and judging["judged"]["errors"] == 0,
            }
        )
    return out


def _target(
    text: str, values: list[float], at_least: float | None = None, at_most: float | None = None, clean: bool = True
) -> dict:
    """A target judged on the median of its rounds' values (each round's in ``rounds``); ``clean``: no errors."""
    value = _median(values)
    met = clean and (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
    return {"target": text, "value": value, "rounds": values, "met": met}


def _table(figures: dict) -> str:
    round_count = len({r["round"] for r in figures["in_process"] + figures["servers"]})

    def round_of(row: dict) -> str:
        return f", round {row['round'] + 1}" if round_count > 1 else ""

    rows = [
        (
            f"{r['stack']} in process, "
            + (f"{r['sessions']} sessions side by side, " if r.get("sessions", 1) > 1 else "")
            + ("decode + pass, " if r["decode"] else "")
            + f"batch {r['batch']}{round_of(r)}",
            f"{r['throughput']:.1f} img/s, {r['ms_per_batch']:.1f} ms/batch, {r['cpu_ms_per_image']:.1f} CPU-ms/img",
        )
        for r in figures["in_process"]
    ]
    for r in figures["servers"]:
        extra = (
            f", server {r['server_cpu_ms_per_request']:.1f} CPU-ms/req" if r.get("server_cpu_ms_per_request") else ""
        )
        extra += f", x{r['vs_ort_best']:.2f} ORT" if "vs_ort_best" in r else ""
        extra += f" (x{r['vs_ort_decode_best']:.2f} decoding too)" if "vs_ort_decode_best" in r else ""
        extra += f", overhead {r['overhead_ms']:+.1f} ms" if "overhead_ms" in r else ""
        extra += f", CPU {r['cpu_over_ort_ms']:+.1f} ms over ORT's least" if "cpu_over_ort_ms" in r else ""
        extra += f" ({r['cpu_over_pass_ms']:+.1f} over its batch-1 pass)" if "cpu_over_pass_ms" in r else ""
        rows.append(
            (
                f"{r['stack']}, concurrency {r['concurrency']}{round_of(r)}",
                f"{r['throughput']:.1f} req/s, p50/p90/p99 {_ms(r['p50_ms'])}/{_ms(r['p90_ms'])}/"
                f"{_ms(r['p99_ms'])}, {r['errors']} errors / {r['requests']}, clients "
                f"{r['client_cpu_share']:.0%} CPU{extra}",
            )
        )
    for r in (r for r in figures["servers"] if r.get("profile")):
        shares = r["profile"].get("categories")
        text = (
            ", ".join(f"{name} {share:.0%}" for name, share in list(shares.items())[:7])
            + f" ({r['profile']['samples']} samples; {r['profile']['raw']})"
            if shares
            else r["profile"].get("error", "no samples")
        )
        rows.append((f"profile of {r['stack']}, concurrency {r['concurrency']}", text))
    heads = figures.get("heads_cost")
    if heads:
        for count, point in heads["heads"].items():
            rows.append(
                (f"bentoml, {count} head(s)", f"RSS {point['rss_bytes'] / 2**20:.0f} MiB, p50 {_ms(point['p50_ms'])}")
            )
        swap = heads["swap"]
        rows.append(
            (
                f"live swap of {swap['head']}:{swap['version']} under {swap['clients']} clients",
                f"{swap['swap_s'] * 1000:.0f} ms (HTTP {swap['status']}), {swap['failed']} failed of "
                f"{swap['requests']} ({swap['failed_during_swap']} of {swap['requests_during_swap']} during it)",
            )
        )
    judging = figures.get("judging_cost")
    if judging:
        for mode in MODES:
            rounds = ", ".join(f"{t:.1f}" for t in judging[mode]["rounds"])
            rows.append(
                (
                    f"bentoml {mode}, concurrency {judging['concurrency']}",
                    f"{judging[mode]['throughput']:.1f} req/s (rounds {rounds}), p50 "
                    f"{_ms(judging[mode]['p50_ms'])}, {judging[mode]['errors']} errors",
                )
            )
    for target in figures["targets"]:
        each = target.get("rounds", [])
        spread = f"; median of {', '.join(f'{v:.2f}' for v in each)}" if len(each) > 1 else ""
        verdict = f"{'met' if target['met'] else 'MISSED'} ({target['value']:.2f}{spread})"
        rows.append((f"target: {target['target']}", verdict))
    title = (
        f"bench serve: {figures['backbone']} [{figures['weights']}], {figures['cpu_count']} CPU cores, "
        f"{figures['seconds']:g} s or {figures['max_requests']} requests per point"
        + (f", {figures['processes']} server processes (workers / instances)" if figures.get("processes") else "")
    )
    return format_table(title, rows)


def _serve_points(
    options: ServeBenchOptions,
    build_dir: Path,
    workdir: Path,
    images: list[bytes],
    started: list[dict],
    precisions: tuple[str, ...],
    profile: bool,
) -> list[dict]:
    """One round of the servers' points: each server started here (one at a time), measured, stopped."""
    rows: list[dict] = []
    for precision in precisions:
        for group in (("bentoml-http", "bentoml-body"), ("triton-http", "triton-grpc")):  # one server at a time
            wanted = tuple(s for s in group if s in options.stacks)
            with ExitStack() as servers:
                for stack, (connect, pid) in _servers(
                    options, wanted, build_dir, workdir, servers, started, precision
                ).items():
                    rows += measure(
                        stack,
                        connect,
                        images,
                        options.concurrency,
                        options.seconds,
                        options.max_requests,
                        options.progress,
                        pid,
                        workdir / f"profile-{stack}.txt" if profile else None,
                    )
    return rows


def bench_serve(options: ServeBenchOptions) -> dict:
    """Run every selected stack on one build (see the module docstring); returns the figures (also printed,
    written as JSON and plotted when asked). Servers started here are stopped before it returns."""
    options.check()
    with ExitStack() as cleanup:
        if options.workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tl-models-bench-serve-")))
        else:
            workdir = Path(options.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        data = options.data
        if data is None:
            from ..training.data import write_demo_dataset

            data = write_demo_dataset(workdir / "data", per_class=20)
        build_dir = Path(options.build_dir) if options.build_dir else _default_build(options, data, workdir)
        manifest = BuildDir(build_dir).manifest()
        precisions = ("fp32", "int8") if options.int8 else ("fp32",)
        if options.int8:
            _int8_backbone(build_dir, own=options.build_dir is None, progress=options.progress)
        images = _images(data)
        if options.heads:
            _check_heads_data(manifest, data)  # before minutes of measurements, not after
        started: list[dict] = []
        figures: dict = {
            "benchmark": "serve",
            "build": str(build_dir),
            "backbone": manifest.backbone,
            "weights": manifest.weights,
            "head": _first_head(manifest).name,
            "cpu_count": os.cpu_count(),
            "seconds": options.seconds,
            "max_requests": options.max_requests,
            "images": {"count": len(images), "mean_bytes": float(np.mean([len(i) for i in images]))},
            "heads_count": options.heads,
            "processes": options.processes,
            "servers_started": started,
        }
        figures["in_process"], figures["servers"] = [], []
        for index in range(options.rounds):
            if options.rounds > 1:
                options.progress(f"[bench serve] round {index + 1} of {options.rounds}")
            figures["in_process"] += [
                {**row, "round": index}
                for row in in_process(
                    build_dir, options.batches, options.seconds, options.stacks, options.progress, precisions, images
                )
            ]
            profile = options.profile and index == 0
            figures["servers"] += [
                {**row, "round": index}
                for row in _serve_points(options, build_dir, workdir, images, started, precisions, profile)
            ]
        if options.heads:
            figures["heads_cost"] = heads_cost(build_dir, data, options.heads, images, options, workdir, started)
        if options.judging:
            figures["judging_cost"] = judging_cost(build_dir, images, options, workdir, started)
        _ratios(figures)
        figures["targets"] = targets(figures)
    print(_table(figures))
    write_json(options.json_path, figures)
    if options.plot_path is not None:
        from .report import plot_serving

        plot_serving(figures, options.plot_path)
        print(f"plot written to {options.plot_path}")
    return figures
