"""`tl-models export` and `tl-models parity`: ONNX graphs of a build again, and their parity with PyTorch.

Both import :mod:`tl_models.training.pipeline` (torch) when they run."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_OK, EXIT_PARITY, add_tolerance_args, tolerance


def cmd_export(args: argparse.Namespace) -> int:
    from ..training.pipeline import reexport

    reexport(args.build_dir, tolerance(args), fp16=args.fp16, fused=args.fused)
    print(f"exported {args.build_dir}: parity passed")
    return EXIT_OK


def cmd_parity(args: argparse.Namespace) -> int:
    from ..training.pipeline import check_parity

    report = check_parity(args.build_dir, tolerance(args), tuple(args.batch_sizes))
    print(report.table())
    print(f"report: {args.build_dir / 'parity.json'}")
    report.raise_on_failure()
    print("parity passed")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `export` and `parity`."""
    p = sub.add_parser("export", help="export a build's backbone and heads to ONNX again (+ parity)")
    p.add_argument("build_dir", type=Path)
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also write backbone.fp16.onnx for GPU serving (parity checked where a GPU is present)",
    )
    p.add_argument("--fused", action="store_true", help="also write fused.onnx per head version")
    add_tolerance_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("parity", help=f"PyTorch vs ONNX Runtime parity of a build; exits {EXIT_PARITY} past tolerance")
    p.add_argument("build_dir", type=Path)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 7, 32])
    add_tolerance_args(p)
    p.set_defaults(func=cmd_parity)
