"""The ``gradscope`` command line's arguments: the parser, and checks of every option before any work.

Usage errors are one line on stderr with exit status 2, like every other error (argparse's own included).
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Optional, Set

from .. import __version__
from ..errors import GradscopeError, did_you_mean
from .messages import one_line

__all__ = ["build_parser", "check_numbers", "fail_kinds", "check_format", "parse_size", "FINDING_KINDS", "FORMATS"]

FINDING_KINDS = ("vanishing", "exploding", "short_memory", "saturated_gates", "dead_units", "nonfinite",
                 "precision_underflow", "attention_entropy_collapse", "rank_collapse", "postln_instability")
FORMATS = ("text", "markdown", "json", "html")
DEFAULT_MAX_PROBE_SECONDS = 300.0

REPORT_EPILOG = """examples:
  gradscope report model.pt                          # text report on stdout
  gradscope report model.pt --format html -o report.html
  gradscope report ckpt.pth --seq-len 500 --fail-on vanishing,exploding   # CI gate: exit 1 on findings
  gradscope report ckpt.pt --model mypkg.models:build --model-args '{"hidden": 256}'
  gradscope report model.safetensors --rnn-nonlinearity relu

exit status: 0 report written, 1 a finding of a --fail-on kind, 2 bad input (one line on stderr).
--unsafe-load runs code stored in the file (pickled classes); use it only for files you trust.
"""

SHOW_EPILOG = """examples:
  gradscope show run.npz                   # a Recording saved with rec.save(...)
  gradscope show run.npz --format markdown -o run.md
"""

DEMO_EPILOG = """examples:
  gradscope demo                      # about a minute on 2 CPU threads
  gradscope demo --out reports --seed 1
"""



class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``gradscope`` parser with its three subcommands: demo, report, show."""
    p = _OneLineParser(
        prog="gradscope",
        description="Diagnose vanishing and exploding gradients in PyTorch sequence models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'gradscope <command> --help' for a command's options and examples.")
    p.add_argument("--version", action="version", version=f"gradscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="command")
    d = sub.add_parser("demo", help="gradscope's call before training beside what training did, and a "
                                    "remedy proven by training",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DEMO_EPILOG,
                       description="The recall task (report the first of T tokens): probe an Elman RNN "
                                   "and an LSTM before training, train both (watched) under the "
                                   "trainability benchmark's protocol, then rank remedies for the RNN "
                                   "by training copies and train the top one. Writes report.html and "
                                   "dashboard.png.")
    d.add_argument("--out", type=Path, default=Path("gradscope-demo"),
                   help="folder for the report and the dashboard (default: ./gradscope-demo)")
    d.add_argument("--seq-len", type=int, default=20, help="sequence length (default 20)")
    d.add_argument("--steps", type=int, default=1500, help="most training steps per model (default 1500)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    r = sub.add_parser("report", help="analyse a saved checkpoint (static + probe) and report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=REPORT_EPILOG,
                       description="Load a checkpoint safely (weights only), rebuild its recurrent and "
                                   "attention modules from keys and shapes (or build your model with "
                                   "--model), analyse the recurrent weights, probe on synthetic or given "
                                   "inputs and diagnose.")
    r.add_argument("path", type=Path, help=".pt/.pth/.bin/.ckpt or .safetensors file")
    _output_args(r)
    r.add_argument("--unsafe-load", action="store_true",
                   help="allow the file to run code while loading (pickled classes); only for trusted files")
    r.add_argument("--model", metavar="PKG.MODULE:FACTORY", help="build this model and load the state dict into it")
    r.add_argument("--model-args", metavar="JSON", help="keyword arguments for --model, as a JSON object")
    r.add_argument("--rnn-nonlinearity", choices=("tanh", "relu"), default="tanh",
                   help="nn.RNN nonlinearity (cannot be read from weights; default tanh)")
    r.add_argument("--num-heads", type=int, help="heads of nn.MultiheadAttention (cannot be read from weights)")
    r.add_argument("--seq-len", type=int, default=100, help="synthetic sequence length (default 100)")
    r.add_argument("--batch", type=int, default=8, help="synthetic batch size (default 8)")
    r.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (default 0)")
    r.add_argument("--input-scale", type=float, default=1.0, help="std of the synthetic inputs (default 1)")
    r.add_argument("--inputs", type=Path, help="a torch.save'd tensor (or tuple/dict) to feed --model")
    r.add_argument("--no-probe", action="store_true", help="static analysis only")
    r.add_argument("--train-mode", action="store_true",
                   help="probe in train mode (dropout on, batch-norm batch statistics); default: eval mode")
    r.add_argument("--k", type=int, help="Lyapunov exponents per site (default min(state, 16))")
    r.add_argument("--fail-on", metavar="KINDS", default="",
                   help=f"comma-separated finding kinds that make the exit status 1 ({', '.join(FINDING_KINDS)})")
    r.add_argument("--require-sites", action="store_true",
                   help="exit 2 when the checkpoint holds no recurrent or attention weights")
    r.add_argument("--max-probe-seconds", type=float, default=DEFAULT_MAX_PROBE_SECONDS, metavar="S",
                   help="skip probing modules whose estimated probe time is beyond this, with a note "
                        f"(static analysis still runs; default {DEFAULT_MAX_PROBE_SECONDS:g}; 0: no limit)")
    _limit_arg(r)

    sh = sub.add_parser("show", help="diagnose a saved Recording and render it",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SHOW_EPILOG,
                        description="Read a Recording written by rec.save(path), diagnose it and render.")
    sh.add_argument("path", type=Path, help="a .npz file written by Recording.save")
    _output_args(sh)
    sh.add_argument("--fail-on", metavar="KINDS", default="", help="as for report")
    _limit_arg(sh)
    return p


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="text", help=f"one of {', '.join(FORMATS)} (default text)")
    p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    p.add_argument("--threshold", type=float, default=1e-3, help="gradient horizon threshold (default 1e-3)")


def _limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-load-bytes", metavar="SIZE", default="4G",
                   help="refuse files that are, or declare once inflated, more than SIZE (e.g. 512M, 8G; "
                        "default 4G; 'none': no limit); zip bombs and lying headers are refused before "
                        "anything is read")


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option, checked before any file is read or any model probed."""
    def bad(name, value, expected):
        raise GradscopeError(f"{name} must be {expected}, got {value}.")

    if args.command == "demo":
        for name, value, lo in (("--seq-len", args.seq_len, 2), ("--steps", args.steps, 1)):
            if value < lo:
                bad(name, value, f"at least {lo}")
        return
    if not (0 < args.threshold < 1):
        bad("--threshold", args.threshold, "between 0 and 1 (exclusive), e.g. 1e-3")
    if args.command != "report":
        return
    for name, value, lo, hi in (("--seq-len", args.seq_len, 2, 1_000_000), ("--batch", args.batch, 1, 65_536),
                                ("--k", args.k, 1, 4096), ("--num-heads", args.num_heads, 1, 65_536)):
        if value is not None and value < lo:
            bad(name, value, f"at least {lo}")
        if value is not None and value > hi:
            bad(name, value, f"at most {hi} (probing needs neither more; pass a smaller value)")
    if not (args.input_scale > 0 and math.isfinite(args.input_scale)):
        bad("--input-scale", args.input_scale, "a positive number")
    if not (args.max_probe_seconds >= 0 and math.isfinite(args.max_probe_seconds)):
        bad("--max-probe-seconds", args.max_probe_seconds, "a number of seconds >= 0 (0: no limit)")
    if args.inputs is not None and not args.inputs.is_file():
        raise GradscopeError(f"--inputs {str(args.inputs)!r}: no such file; pass a file written with "
                             f"torch.save(tensor).")
    if args.model_args is not None:
        from ..checkpoint.rebuild import parse_model_args  # imports torch: only when given
        parse_model_args(args.model_args, name="--model-args")


def fail_kinds(text: str) -> Set[str]:
    """The finding kinds named by ``--fail-on`` (comma-separated), each checked against FINDING_KINDS."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds:
        if k not in FINDING_KINDS:
            raise GradscopeError(f"--fail-on: unknown finding kind {k!r}.{did_you_mean(k, FINDING_KINDS)} "
                                 f"Known: {', '.join(FINDING_KINDS)}.")
    return set(kinds)


def check_format(fmt: str) -> None:
    """Refuse a ``--format`` that is none of FORMATS, suggesting the closest."""
    if fmt not in FORMATS:
        raise GradscopeError(f"--format: unknown format {fmt!r}.{did_you_mean(fmt, FORMATS)} "
                             f"Use one of {', '.join(FORMATS)}.")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+]?[0-9]+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}


def parse_size(text: str) -> Optional[int]:
    """Parse ``--max-load-bytes``: ``"4G"``, ``"512MiB"``, ``"1e9"``, ``"100000"``, or ``"none"``.

    Units are binary (K = 1024). ``none`` (or ``off``) switches the checks off and returns None.

    Example:
        >>> parse_size("4G"), parse_size("1.5k"), parse_size("1e6"), parse_size("none")
        (4294967296, 1536, 1000000, None)
    """
    s = str(text).strip()
    if s.lower() in ("none", "off", "unlimited"):
        return None
    m = _SIZE.match(s)
    value = float(m.group(1)) * _UNITS[m.group(2).lower()] if m else float("nan")
    if not (m and math.isfinite(value) and value >= 1):
        raise GradscopeError(
            f"--max-load-bytes: expected a size such as 4G, 512M or 1000000 (bytes), or 'none' to switch "
            f"the checks off, got {text!r}.")
    return int(value)
