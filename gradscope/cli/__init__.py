"""The ``gradscope`` command line: argument parsing and error formatting only; the library raises.

Every failure the user can cause prints one line on stderr and exits with status 2; a traceback
is a bug. :mod:`~gradscope.cli.args` parses and checks the options, :mod:`~gradscope.cli.commands`
runs a subcommand, :mod:`~gradscope.cli.messages` turns a library error into the line printed,
adding the flag that addresses it: library messages name keyword arguments, never flags.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from ..errors import GradscopeError
from .args import build_parser
from .commands import COMMANDS
from .messages import format_error, one_line

__all__ = ["main", "main_entry"]


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed one line)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except GradscopeError as e:
        print(f"gradscope: error: {format_error(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI never prints a traceback
        if os.environ.get("GRADSCOPE_DEBUG"):
            raise
        print(f"gradscope: error: unexpected {type(e).__name__}: {one_line(str(e))} "
              f"(set GRADSCOPE_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradscope: interrupted", file=sys.stderr)
        return 130


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
