"""`tl-models triton package | serve | swap | shadow | status`: a build's Triton model repository, tritonserver
on it, and live operations on running servers."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.process import url_address
from ..triton.config import RepositoryOptions
from ..triton.launcher import TritonServer, serve
from ..triton.repository import write_repository
from ..triton.swap import shadow, status, swap
from .common import EXIT_OK, EXIT_USER_ERROR, SPLIT_HELP, add_precision_arg, parse_split, show


def cmd_triton_package(args: argparse.Namespace) -> int:
    options = RepositoryOptions(
        flavour=args.flavour,
        gpu=args.gpu,
        tensorrt=args.tensorrt,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
        weights=parse_split(args.split),
        precision=args.precision,
    )
    repo = write_repository(args.build_dir, args.repo, options)
    print(
        f"Triton model repository {repo.path} ({args.flavour} flavour, {'GPU' if args.gpu else 'CPU'}, "
        f"{args.precision} backbone): "
        f"{', '.join(repo.models)}"
    )
    print(f"live heads: {', '.join(f'{h}:{v}' for h, v in sorted(repo.live.items()))}; router model: {repo.name}")
    return EXIT_OK


def cmd_triton_serve(args: argparse.Namespace) -> int:
    def announce(server: TritonServer) -> None:
        print(
            f"tritonserver pid {server.pid} ready: HTTP http://{server.http_url}  gRPC grpc://{server.grpc_url}  "
            f"metrics http://{server.metrics_url}  log {server.log_path}",
            flush=True,
        )

    return serve(
        args.repo,
        announce,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        tritonserver=args.tritonserver,
        workdir=args.workdir,
        timeout=args.timeout,
    )


def cmd_triton_swap(args: argparse.Namespace) -> int:
    result = swap(
        triton_urls(args.url), args.repo, args.build, args.head, args.version, parse_split(args.split), drain=args.drain
    )
    print(
        f"{args.build}: head {result.head} now serves version {result.new_version} "
        f"(was {result.old_version}); weights {result.route.weights}, route revision {result.route.revision}"
    )
    return EXIT_OK


def cmd_triton_shadow(args: argparse.Namespace) -> int:
    route = shadow(triton_urls(args.url), args.repo, args.build, args.head, args.version, args.share, drain=args.drain)
    print(f"{args.build}: shadow heads {route.shadow or 'none'}; route revision {route.revision}")
    return EXIT_OK


def cmd_triton_status(args: argparse.Namespace) -> int:
    report = status(triton_urls(args.url), args.repo, args.build)
    lines = [
        f"route: versions {report['route']['versions']}, weights {report['route']['weights']}, shadow "
        f"{report['route']['shadow'] or 'none'}; versions to load per head: {report['wanted']}"
    ]
    lines += [
        f"  {r['url']}: ready {r['ready']}, loaded {r['loaded']}"
        + ("" if r["agrees"] else "  <- DIFFERS")
        + (f" ({r['error']})" if r["error"] else "")
        for r in report["replicas"]
    ]
    lines.append("replicas agree with the route" if report["agree"] else "replicas DISAGREE")
    show(report, lines, args.json)
    return EXIT_OK if report["agree"] else EXIT_USER_ERROR


def triton_urls(text: str) -> list[str]:
    """``--url``: one Triton HTTP URL, or several (comma-separated) for replicas serving one shared repository."""
    return [url_address(part.strip(), ("http",)) for part in text.split(",") if part.strip()]


def _server_args(p: argparse.ArgumentParser) -> None:
    """The arguments that name running Tritons, their repository and a build (swap, shadow, status)."""
    p.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="Triton's HTTP URL; several, comma-separated, for replicas serving one shared repository",
    )
    p.add_argument("--repo", type=Path, default=Path("model_repository"), help="the repository the server serves")
    p.add_argument("--build", required=True, help="build name (its router model)")


def _head_args(p: argparse.ArgumentParser, version_help: str) -> None:
    """:func:`_server_args` and one head version (swap, shadow)."""
    _server_args(p)
    p.add_argument("--head", required=True, help="head name")
    p.add_argument("--version", type=int, help=version_help)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `triton package | serve | swap | shadow | status`."""
    verbs = sub.add_parser("triton", help="package, run and operate Triton").add_subparsers(
        dest="verb", required=True, metavar="{package,serve,swap,shadow,status}"
    )
    p = verbs.add_parser("package", help="write the build's Triton model repository entries")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--flavour",
        choices=["onnxruntime", "python"],
        default="python",
        help="ONNX steps on the onnxruntime backend (NGC container) or the python backend + ONNX Runtime",
    )
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true", help="instance_group KIND_GPU for the ONNX steps")
    device.add_argument("--cpu", dest="gpu", action="store_false", help="instance_group KIND_CPU (default)")
    p.add_argument("--tensorrt", action="store_true", help="TensorRT fp16 accelerator (onnxruntime flavour, --gpu)")
    add_precision_arg(p, "the backbone to package (int8: CPU only)")
    p.add_argument("--split", help=f"{SPLIT_HELP} (default: equal, or the live route's)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--instances", type=int, default=1, help="instances per model")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic batching: how long a request may wait for more to fill a batch (0: not at all)",
    )
    p.set_defaults(func=cmd_triton_package)

    p = verbs.add_parser("serve", help="start tritonserver (bundled in nvidia-pytriton) on a model repository")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tritonserver", type=Path, help="another tritonserver binary (default: the bundled one)")
    p.add_argument("--workdir", type=Path, help="where the bundled server is copied (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    p.set_defaults(func=cmd_triton_serve)

    p = verbs.add_parser("swap", help="make a head version live: load, repoint ensembles and route, unload the old")
    _head_args(p, "default: the highest version in the repository")
    p.add_argument("--split", help=f"new {SPLIT_HELP}")
    p.add_argument("--drain", type=float, default=2.0, help="seconds without traffic before the old version unloads")
    p.set_defaults(func=cmd_triton_swap)

    p = verbs.add_parser("shadow", help="score a head version beside every answer (never returned), or stop it")
    _head_args(p, "default: the highest version in the repository (with --share 0: all)")
    p.add_argument("--share", type=float, default=1.0, help="share of requests it is scored on, 0..1; 0 stops it")
    p.add_argument("--drain", type=float, default=2.0, help="with --share 0: seconds without traffic before unloading")
    p.set_defaults(func=cmd_triton_shadow)

    p = verbs.add_parser("status", help="every replica's readiness and loaded head versions against the route")
    _server_args(p)
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.set_defaults(func=cmd_triton_status)
