"""`tl-models bento package | serve`: a build in the BentoML model store, and `bentoml serve` on it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from ..bento.launcher import serve_command, service_environment
from ..bento.store import package_build
from .common import EXIT_OK, SPLIT_HELP, add_precision_arg, parse_split


def cmd_bento_package(args: argparse.Namespace) -> int:
    report = package_build(args.build_dir, args.precision)
    print(f"build {report.build!r} in the BentoML model store ({os.environ.get('BENTOML_HOME') or '~/bentoml'}):")
    for tag in report.created:
        print(f"  created {tag}")
    for tag in report.existing:
        print(f"  kept    {tag}")
    flag = " --precision int8" if args.precision == "int8" else ""
    print(f"serve it: tl-models bento serve --bento {report.build}{flag}  (or: bentoml serve service:Classifier)")
    return EXIT_OK


def cmd_bento_serve(args: argparse.Namespace) -> NoReturn:
    """Replace this process with `bentoml serve service:Classifier` for a build directory or a stored build."""
    parse_split(args.split)  # a bad split is refused here, not in the service's log
    env = service_environment(args.build_dir, args.bento, args.workers, args.split, args.state_dir, args.precision)
    command = serve_command(args.host, args.port)
    print(" ".join(command), flush=True)
    os.execve(sys.executable, command, env)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bento package` and `bento serve`."""
    verbs = sub.add_parser("bento", help="package and serve a build with BentoML").add_subparsers(
        dest="verb", required=True, metavar="{package,serve}"
    )
    p = verbs.add_parser("package", help="save the build's backbone and heads into the BentoML model store")
    p.add_argument("build_dir", type=Path)
    add_precision_arg(p, "the backbone to package")
    p.set_defaults(func=cmd_bento_package)

    p = verbs.add_parser("serve", help="run the BentoML service (`bentoml serve service:Classifier`) on a build")
    p.add_argument("build_dir", type=Path, nargs="?", help="a build directory (default: a build of the model store)")
    p.add_argument("--bento", help="build name in the BentoML model store (when it holds several)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--workers", type=int, help="worker processes (default 1)")
    p.add_argument("--split", help=f"initial {SPLIT_HELP} (when no route exists yet)")
    p.add_argument("--state-dir", type=Path, help="route and head catalog shared by the workers")
    add_precision_arg(p, "the backbone to serve")
    p.set_defaults(func=cmd_bento_serve)
