"""What several `tl-models` nouns share: exit codes, tolerance and precision arguments, split and URL parsing,
printing a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.report import write_json
from ..core.process import url_address
from ..core.routing import parse_weights
from ..training.parity import FP32, Tolerance

EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE, EXIT_PARITY, EXIT_GATE = 0, 1, 2, 3, 4
SPLIT_HELP = "traffic split, e.g. a=90,b=10"


def add_tolerance_args(parser: argparse.ArgumentParser) -> None:
    """``--atol``, ``--rtol``, ``--min-agreement``: the parity tolerance (fp32 defaults)."""
    parser.add_argument("--atol", type=float, default=FP32["atol"], help="parity: absolute tolerance")
    parser.add_argument("--rtol", type=float, default=FP32["rtol"], help="parity: relative tolerance")
    parser.add_argument(
        "--min-agreement", type=float, default=FP32["min_agreement"], help="parity: minimum top-1 agreement"
    )


def tolerance(args: argparse.Namespace) -> Tolerance:
    """The parity tolerance the arguments of :func:`add_tolerance_args` give."""
    return Tolerance(atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement)


def add_precision_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--precision fp32|int8`` of the backbone ``what`` names."""
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        default="fp32",
        help=f"{what}: int8 is the backbone `tl-models quantize` wrote past its accuracy gate",
    )


def parse_split(text: str | None) -> dict[str, float] | None:
    """``--split a=90,b=10`` as weights, or None when not given."""
    return parse_weights(text) if text else None


def address(url: str | None, *schemes: str) -> str | None:
    """``HOST:PORT`` of a URL with one of ``schemes``, or None when not given."""
    return url_address(url, schemes) if url else None


def show(report: dict, lines: list[str], json_path: Path | None) -> None:
    """Print a report's lines; also write it as JSON when asked."""
    print("\n".join(lines))
    write_json(json_path, report)
