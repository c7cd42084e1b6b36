"""The ``gradscope`` command line: argument parsing and error formatting only; the library raises.

Every failure the user can cause prints one line on stderr and exits with status 2; a traceback
is a bug.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from .. import __version__
from ..errors import GradscopeError

__all__ = ["main", "main_entry"]

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
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
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


def _check_numbers(args) -> None:
    """Every numeric option, checked before any file is read or any model probed."""
    import math

    def bad(name, value, expected):
        raise GradscopeError(f"{name} must be {expected}, got {value}.")

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
        from ..checkpoint.rebuild import parse_model_args
        parse_model_args(args.model_args)


def _fail_kinds(text: str):
    from ..errors import did_you_mean
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds:
        if k not in FINDING_KINDS:
            raise GradscopeError(f"--fail-on: unknown finding kind {k!r}.{did_you_mean(k, FINDING_KINDS)} "
                                 f"Known: {', '.join(FINDING_KINDS)}.")
    return set(kinds)


def _check_format(fmt: str) -> None:
    from ..errors import did_you_mean
    if fmt not in FORMATS:
        raise GradscopeError(f"--format: unknown format {fmt!r}.{did_you_mean(fmt, FORMATS)} "
                             f"Use one of {', '.join(FORMATS)}.")


def _emit(text: str, output) -> None:
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as e:
        raise GradscopeError(f"cannot write {str(output)!r}: {e.strerror}.") from None
    print(f"gradscope: wrote {output}", file=sys.stderr)


def _exit_for(findings, fail) -> int:
    hit = sorted({f.kind for f in findings if f.kind in fail})
    if hit:
        print(f"gradscope: failing on {', '.join(hit)} (--fail-on)", file=sys.stderr)
        return 1
    return 0


def _report(args) -> int:
    from .._archive import parse_size
    from ..report.checkpoint_report import report_checkpoint
    _check_format(args.format)
    fail = _fail_kinds(args.fail_on)
    _check_numbers(args)
    limit = parse_size(args.max_load_bytes)
    rep = report_checkpoint(args.path, unsafe=args.unsafe_load, model_spec=args.model,
                            model_args=args.model_args, rnn_nonlinearity=args.rnn_nonlinearity,
                            num_heads=args.num_heads, seq_len=args.seq_len, batch=args.batch,
                            seed=args.seed, input_scale=args.input_scale, inputs=args.inputs,
                            probe_sites=not args.no_probe, threshold=args.threshold, k=args.k,
                            max_load_bytes=limit, max_probe_seconds=args.max_probe_seconds or None,
                            train_mode=args.train_mode)
    if args.require_sites and not rep.modules and not args.model:
        raise GradscopeError(f"{args.path}: no recurrent or attention weights found (--require-sites); "
                             f"the state dict holds {rep.checkpoint['num_tensors']} tensors of other modules.")
    _emit(rep.render(args.format), args.output)
    return _exit_for(rep.findings, fail)


def _show(args) -> int:
    from .._archive import parse_size
    from ..analysis.diagnose import diagnose
    from ..recording import load
    _check_format(args.format)
    fail = _fail_kinds(args.fail_on)
    _check_numbers(args)
    rec = load(args.path, max_load_bytes=parse_size(args.max_load_bytes))
    try:
        diag = diagnose(rec, threshold=args.threshold)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # load() checked the schema it knows; deeper probe metadata that breaks diagnose is the file's fault
        raise GradscopeError(f"{str(args.path)!r} loaded, but its contents do not fit a gradscope recording "
                             f"({type(e).__name__}: {_one_line(str(e))[:120]}); the file is malformed: "
                             f"re-save it with Recording.save().") from None
    text = {"text": lambda: str(diag), "markdown": diag.to_markdown, "json": lambda: diag.to_json() + "\n",
            "html": diag.to_html}[args.format]()
    _emit(text, args.output)
    return _exit_for(diag.findings, fail)


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
            from ..demo import run_demo
            return run_demo(out=args.out, seq_len=args.seq_len, steps=args.steps, seed=args.seed)
        if args.command == "report":
            return _report(args)
        if args.command == "show":
            return _show(args)
    except GradscopeError as e:
        print(f"gradscope: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI never prints a traceback
        if os.environ.get("GRADSCOPE_DEBUG"):
            raise
        print(f"gradscope: error: unexpected {type(e).__name__}: {_one_line(str(e))} "
              f"(set GRADSCOPE_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradscope: interrupted", file=sys.stderr)
        return 130
    return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
