"""The ``gradscope`` command line: argument parsing and error formatting only; the library raises.

Every failure the user can cause prints one line on stderr and exits with status 2; a traceback
is a bug.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__
from .errors import GradscopeError

__all__ = ["main", "main_entry"]

DEMO_EPILOG = """examples:
  gradscope demo                      # train, watch and diagnose both models (about 10 s on a CPU)
  gradscope demo --out reports --steps 300 --seq-len 100
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradscope",
        description="Diagnose vanishing and exploding gradients in PyTorch sequence models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'gradscope <command> --help' for a command's options and examples.")
    p.add_argument("--version", action="version", version=f"gradscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="command")
    d = sub.add_parser("demo", help="train a vanilla RNN and an LSTM on the adding problem, watched, "
                                    "and compare their diagnoses",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DEMO_EPILOG,
                       description="Train a vanilla RNN and an LSTM on the adding problem (Hochreiter & "
                                   "Schmidhuber 1997) under gradscope.watch, probe both, print their "
                                   "diagnoses side by side and write the reports.")
    d.add_argument("--out", type=Path, default=Path("gradscope-demo"),
                   help="folder for the reports (default: ./gradscope-demo)")
    d.add_argument("--seq-len", type=int, default=50, help="sequence length (default 50)")
    d.add_argument("--steps", type=int, default=150, help="training steps per model (default 150)")
    d.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed one line)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from .demo import run_demo
            return run_demo(out=args.out, seq_len=args.seq_len, steps=args.steps, hidden=args.hidden,
                            seed=args.seed)
    except GradscopeError as e:
        print(f"gradscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradscope: interrupted", file=sys.stderr)
        return 130
    return 2


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
