"""`tl-models report`: how heads did on served traffic, from an embedding log or a running BentoML service."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.report import write_json
from ..core.embedding_log import read_log
from ..core.errors import BadRequest
from ..report import log_report, plot, read_service, table
from .common import EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    if bool(args.log) == bool(args.url):
        raise BadRequest("give one source: --log LOG (an embedding log) or --url URL (a running BentoML service)")
    report = log_report(read_log(args.log), args.build, args.slices) if args.log else read_service(args.url)
    print(table(report))
    write_json(args.json, report)
    plot(report, args.plot)
    print(f"plot: {args.plot}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `report`."""
    p = sub.add_parser("report", help="how heads did on served traffic: agreement, accuracy with feedback, drift")
    p.add_argument("--log", type=Path, help="an embedding log folder (TL_MODELS_LOG_SHARE > 0)")
    p.add_argument("--url", help="a running BentoML service (reads GET /heads)")
    p.add_argument("--build", type=Path, help="with --log: the build, for each head's drift reference")
    p.add_argument("--slices", type=int, default=10, help="with --log: time slices of equal record counts")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    p.add_argument("--plot", type=Path, default=Path("report.png"), help="PNG (default: report.png)")
    p.set_defaults(func=cmd_report)
