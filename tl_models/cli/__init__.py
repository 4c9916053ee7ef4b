"""The `tl-models` command: a noun, then a verb.

  tl-models build | export | parity | quantize | report | backbones | demo | demo-data | install-weights
  tl-models bento package | serve
  tl-models triton package | serve | swap | shadow | status
  tl-models fleet init | status | swap | split
  tl-models deploy render
  tl-models bench train | build | runtime | serve

Exit codes: 0 done; 1 a user error (one line on stderr says what and how to fix it); 2 bad usage (argparse);
3 parity failed (ONNX Runtime disagrees with PyTorch past tolerance); 4 the int8 gate refused: no setting passed
accuracy, or the fastest that did is slower here than it asks (`quantize`; the build is unchanged). Anything else
is a bug: its traceback is shown.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from ..core.errors import UserError
from ..training.parity import ParityError
from ..training.quantize import QuantizeRefused
from . import bench, bento, build, deploy, export, fleet, quantize, report, triton
from .common import EXIT_GATE, EXIT_PARITY, EXIT_USER_ERROR

NOUNS = (build, export, quantize, report, bento, triton, fleet, deploy, bench)


def make_parser() -> argparse.ArgumentParser:
    """The whole command line: each noun module adds its own subcommands."""
    parser = argparse.ArgumentParser(
        prog="tl-models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for noun in NOUNS:
        noun.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tl-models` console script; see the module docstring for the exit codes."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("onnx_ir", "onnxscript", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PARITY
    except QuantizeRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_GATE
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    return code


def console() -> None:
    """The console script: ``main``, then an exit that skips the interpreter's last collection over every object
    torch and its kin created (1.3-1.5 s of a 2-core machine's time per command, with nothing left to finalise:
    every command has committed its files by the time it returns)."""
    code = main()
    gc.freeze()
    sys.exit(code)
