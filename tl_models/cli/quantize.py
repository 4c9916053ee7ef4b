"""`tl-models quantize`: an int8 backbone behind an accuracy and a speed gate, or `--verify` on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.names import BACKBONE_INT8
from ..training.quantize import METHODS, TYPES, Calibration, Gate, quantize, verify
from .common import EXIT_GATE, EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.verify:
        report = verify(args.build_dir)
        chosen = report.chosen
        assert chosen is not None  # verify refuses otherwise
        print(report.table())
        print(
            f"verified {args.build_dir / BACKBONE_INT8} on this machine ({report.machine['isa']}, ONNX Runtime "
            f"{report.machine['onnxruntime']}): {chosen.speedup:.2f}x fp32; the record is updated"
        )
        return EXIT_OK
    calibration = Calibration(args.method, args.per_channel, args.calibration_images, args.types, args.reduce_range)
    report = quantize(
        args.build_dir,
        calibration,
        Gate(args.min_agreement, args.max_drop, args.min_speedup),
        search="none" if args.no_search else args.search,
    )
    chosen = report.chosen
    assert chosen is not None  # quantize refuses otherwise
    print(report.table())
    print(f"wrote {args.build_dir / BACKBONE_INT8} ({chosen.calibration.label()}: {chosen.speedup:.2f}x fp32 here)")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `quantize`."""
    p = sub.add_parser(
        "quantize",
        help=f"int8 backbone for CPU serving, behind an accuracy and a speed gate; exits "
        f"{EXIT_GATE} when the gate refuses (the build unchanged)",
    )
    p.add_argument("build_dir", type=Path)
    p.add_argument("--method", choices=METHODS, default="minmax", help="calibration")
    p.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-channel weight scales (default on)",
    )
    p.add_argument("--calibration-images", type=int, default=64, help="training images used to calibrate")
    p.add_argument(
        "--types",
        choices=TYPES,
        default="u8s8",
        help="activation/weight integer types tried first: u8s8 is what VNNI and AMX run natively",
    )
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights (ONNX Runtime's remedy for u8s8 saturation without VNNI; searched there)",
    )
    p.add_argument("--min-agreement", type=float, default=0.99, help="gate: top-1 agreement with fp32, per head")
    p.add_argument("--max-drop", type=float, default=0.01, help="gate: val accuracy drop, per head (0.01 = 1 point)")
    p.add_argument(
        "--min-speedup",
        type=float,
        default=1.0,
        help="gate: int8 img/s over fp32 at batch 32 on this CPU (default 1: never slower than fp32)",
    )
    p.add_argument(
        "--search",
        choices=["all", "types", "none"],
        default="all",
        help="settings tried besides the given one: all (types x methods x per-channel), types (each "
        "integer type with the given method), none; the fastest that passes accuracy is chosen",
    )
    p.add_argument("--no-search", action="store_true", help="the same as --search none")
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-measure the build's int8 backbone on this machine (accuracy with its recorded gate, then "
        "speed) and update its record, or refuse (exit 4) and leave the build as it is; it uses the "
        "recorded setting and gate, not the options above",
    )
    p.set_defaults(func=cmd_quantize)
