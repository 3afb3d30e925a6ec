"""The `fmct` command line: demo, analyze (one CT or a batch), export, import, fetch, phantom, prepare, pretrain, embed, probe,
finetune, evaluate.

User mistakes (bad input, bad bundle, bad option, an unusable output folder) exit with code 2 and
one line saying what to do, before any model runs; --debug adds the traceback, and the exit code
stays 2.
"""
from __future__ import annotations

import logging
import sys
import traceback
from typing import Sequence

from fmct.cli.commands import PROGRESS_ENV  # noqa: F401 (re-exported: the Slicer training module reads it here)
from fmct.cli.parser import _settle_data, build_parser
from fmct.conventions.errors import Cancelled, FMCTError
from fmct.conventions.names import PrintableFormatter, printable
from fmct.conventions.runtime import passive_threads

__all__ = ["PROGRESS_ENV", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    passive_threads()  # before anything imports torch (fmct.conventions.runtime says why)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = args.debug or getattr(args, "debug_after", False)
    _settle_data(parser, args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(message)s"))  # names and paths never drive the terminal
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[handler])
    try:
        return args.func(args)
    except Cancelled as e:
        print(f"fmct: cancelled: {printable(e)}", file=sys.stderr)
        return 130
    except FMCTError as e:
        if args.debug:
            traceback.print_exc()  # --debug adds the traceback; a user error stays exit 2
        print(f"fmct: error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmct: interrupted", file=sys.stderr)
        return 130
