"""`tl-models bench train | build | runtime | serve`: the benchmarks behind the figures in the docs.

`bench train` and `bench runtime` import :mod:`tl_models.bench.offline` (torch) when they run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.build import bench_build
from ..bench.serve import STACKS, ServeBenchOptions, bench_serve
from ..training.quantize import TYPES
from .common import EXIT_OK, address


def cmd_bench_train(args: argparse.Namespace) -> int:
    from ..bench.offline import bench_train

    bench_train(args.data, args.backbone, args.weights, args.epochs, args.images, args.json)
    return EXIT_OK


def cmd_bench_build(args: argparse.Namespace) -> int:
    bench_build(
        args.images, tuple(args.stacks), args.work, args.backbone, args.weights, args.epochs, args.seconds, args.json
    )
    return EXIT_OK


def cmd_bench_runtime(args: argparse.Namespace) -> int:
    from ..bench.offline import bench_runtime

    bench_runtime(
        tuple(args.backbones),
        tuple(args.batch_sizes),
        args.seconds,
        args.providers,
        args.json,
        args.int8,
        tuple(args.int8_types),
    )
    return EXIT_OK


def cmd_bench_serve(args: argparse.Namespace) -> int:
    options = ServeBenchOptions(
        build_dir=args.build_dir,
        backbone=args.backbone,
        weights=args.weights,
        data=args.data,
        stacks=tuple(args.stacks),
        batches=tuple(args.batch_sizes),
        concurrency=tuple(args.concurrency),
        seconds=args.seconds,
        max_requests=args.max_requests,
        heads=args.heads,
        bento_url=args.bento_url and f"http://{address(args.bento_url, 'http')}",
        triton_http_url=address(args.triton_http_url, "http"),
        triton_grpc_url=address(args.triton_grpc_url, "grpc"),
        triton_model=args.triton_model,
        workdir=args.workdir,
        start_timeout=args.start_timeout,
        json_path=args.json,
        plot_path=args.plot,
        int8=args.int8,
        judging=args.judging,
        variant=args.variant,
        profile=args.profile,
        rounds=args.rounds,
        processes=args.processes,
    )
    bench_serve(options)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bench train | build | runtime | serve`."""
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="verb", required=True)
    p = bench.add_parser("train", help="head training with the feature cache vs running the backbone every epoch")
    p.add_argument("--data", type=Path, help="ImageFolder (default: the demo digits)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="IMAGENET1K_V1")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--images", type=int, default=300, help="images used (both runs use the same ones)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=cmd_bench_train)

    p = bench.add_parser(
        "build",
        help="whole builds of N synthetic images per extraction stack: images/s and peak "
        "memory against the raw backbone in ONNX Runtime",
    )
    p.add_argument("--images", type=int, default=8000, help="synthetic 256 px JPEGs (written once into --work)")
    p.add_argument(
        "--stacks",
        nargs="+",
        default=["torch-cpu", "ort-cpu", "cuda"],
        choices=["torch-cpu", "ort-cpu", "cuda"],
        metavar="STACK",
        help="torch-cpu, ort-cpu, cuda (skipped without a GPU); default all",
    )
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
    p.add_argument(
        "--int8",
        action="store_true",
        help="also the static int8 graphs of --int8-types (speed only: random calibration)",
    )
    p.add_argument(
        "--int8-types",
        nargs="+",
        choices=TYPES,
        default=list(TYPES),
        help="integer types timed with --int8 (default all three: the gate keeps the fastest that passes)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.set_defaults(func=cmd_bench_runtime)

    defaults = ServeBenchOptions()
    p = bench.add_parser(
        "serve",
        help="serving throughput/latency: ONNX Runtime and torch in process, BentoML and "
        "Triton (HTTP, gRPC) over loopback; cost of heads; live swap",
    )
    p.add_argument(
        "build_dir",
        type=Path,
        nargs="?",
        help="an exported build (default: build one on the demo digits with --backbone/--weights)",
    )
    p.add_argument("--backbone", default=defaults.backbone, help="backbone of the default build")
    p.add_argument("--weights", default=defaults.weights, help="weights of the default build (or none)")
    p.add_argument("--data", type=Path, help="ImageFolder: images sent and data of the extra heads (default: digits)")
    p.add_argument(
        "--stacks",
        nargs="+",
        default=list(STACKS),
        choices=STACKS,
        metavar="STACK",
        help=f"what to measure (default all: {' '.join(STACKS)})",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=list(defaults.batches), help="in-process batch sizes")
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=list(defaults.concurrency),
        help="client concurrency levels against the servers",
    )
    p.add_argument("--seconds", type=float, default=defaults.seconds, help="timed seconds per point")
    p.add_argument("--max-requests", type=int, default=defaults.max_requests, help="at most this many per point")
    p.add_argument(
        "--heads",
        type=int,
        default=defaults.heads,
        help="heads part: 1 head vs this many (memory, p50) and a live swap; 0 skips it",
    )
    p.add_argument("--bento-url", help="measure this BentoML service (http://HOST:PORT) instead of starting one")
    p.add_argument("--triton-http-url", help="Triton's HTTP URL (http://HOST:PORT) instead of starting tritonserver")
    p.add_argument("--triton-grpc-url", help="Triton's gRPC URL (grpc://HOST:PORT) instead of starting tritonserver")
    p.add_argument("--triton-model", help="Triton model to call (default: the build's router; or NAME_a, ...)")
    p.add_argument("--workdir", type=Path, help="keep builds, repositories and server logs here (default: temp)")
    p.add_argument(
        "--start-timeout", type=float, default=defaults.start_timeout, help="seconds to wait for a server to be ready"
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--plot", type=Path, help="PNG: throughput and p99 latency vs concurrency per stack")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also ONNX Runtime and the servers started here on the int8 backbone (the default build is "
        "quantized with the gate open: speed only; a given build must have passed `quantize`)",
    )
    p.add_argument(
        "--judging",
        action="store_true",
        help="also BentoML throughput at the top concurrency with the recorder off (TL_MODELS_RECORD=0), on (the "
        "default), and on with a shadow head and 10%% of requests in the embedding log (three services, measured "
        "in turns)",
    )
    p.add_argument(
        "--variant",
        type=int,
        default=0,
        metavar="N",
        help="also a head fine-tuned on the build's trunk (its last N stages its own) served beside the first head: "
        "frozen only, a 50/50 split, the tuned version shadowed on every request, and two services each with its "
        "own whole model (four BentoML services, measured in turns at the top concurrency)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample each server started here with py-spy at the top concurrency: the share of its CPU per part "
        "(ONNX Runtime, decode, HTTP, metrics, judging, ...) in the table, folded stacks in --workdir",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="measure the in-process and server points this many times in turn (servers restarted each round), "
        "each server point against its own round's ONNX Runtime; targets judged on the median of the rounds",
    )
    p.add_argument(
        "--processes",
        type=int,
        help="BentoML workers (TL_MODELS_WORKERS) and Triton router instances (triton package --instances) of the "
        "servers started here (default: the environment's workers, one instance)",
    )
    p.set_defaults(func=cmd_bench_serve)
