"""Over loopback: the servers started (or given), and one point per concurrency against each."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from ...bento import launcher as bento_launcher
from ...core import process
from ...core.manifest import BuildDir
from ...triton import launcher as triton_launcher
from .. import profile as profiler
from ..loadgen import BentoCaller, Caller, TritonCaller, drive, summarize
from .options import ServeBenchOptions


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
            "precision": stack_precision(stack),
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
            f"    {row['throughput']:.1f} req/s, p50 {fmt_ms(row['p50_ms'])}, p99 {fmt_ms(row['p99_ms'])}, "
            f"{row['errors']} errors of {row['requests']}, clients used {row['client_cpu_share']:.0%} CPU"
            + (f", server {server_cpu:.1f} CPU-ms per request" if server_cpu is not None else "")
            + (f" (first: {row['first_error']})" if row["first_error"] else "")
        )
        rows.append(row)
    return rows


def stack_label(stack: str, precision: str) -> str:
    """A stack's name in the figures: ``-int8`` appended for the int8 backbone."""
    return stack if precision == "fp32" else f"{stack}-{precision}"


def stack_precision(stack: str) -> str:
    return "int8" if stack.endswith("-int8") else "fp32"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def bento_env(
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
                bento_env(build_dir, state, workdir, secrets.token_hex(8), precision, options.processes),
                log_path=workdir / f"bento-main{suffix}.log",
                timeout=options.start_timeout,
            )
            stack.callback(server.stop)
            started.append({"server": "bentoml", "precision": precision, "pid": server.pid})
            url, pid = server.url, server.pid
        for way in bento:
            callers[stack_label(way, precision)] = partial(BentoCaller, url, body=way == "bentoml-body"), pid
    triton = [s for s in ("triton-http", "triton-grpc") if s in wanted]
    urls = {name: given[name] for name in ("triton-http", "triton-grpc")}
    pids: dict[str, int | None] = {name: None for name in triton}
    if any(urls[s] is None for s in triton):
        from ...triton.config import RepositoryOptions
        from ...triton.repository import write_repository

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
        callers[stack_label(name, precision)] = partial(TritonCaller, protocol, triton_url, model), pids[name]
    return callers


def serve_points(
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
