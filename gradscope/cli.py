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

from . import __version__
from .errors import GradscopeError

__all__ = ["main", "main_entry"]

FINDING_KINDS = ("vanishing", "exploding", "short_memory", "saturated_gates", "dead_units", "nonfinite",
                 "precision_underflow", "attention_entropy_collapse", "rank_collapse", "postln_instability")
FORMATS = ("text", "markdown", "json", "html")

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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

    sh = sub.add_parser("show", help="diagnose a saved Recording and render it",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SHOW_EPILOG,
                        description="Read a Recording written by rec.save(path), diagnose it and render.")
    sh.add_argument("path", type=Path, help="a .npz file written by Recording.save")
    _output_args(sh)
    sh.add_argument("--fail-on", metavar="KINDS", default="", help="as for report")
    return p


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="text", help=f"one of {', '.join(FORMATS)} (default text)")
    p.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    p.add_argument("--threshold", type=float, default=1e-3, help="gradient horizon threshold (default 1e-3)")


def _fail_kinds(text: str):
    from .errors import did_you_mean
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds:
        if k not in FINDING_KINDS:
            raise GradscopeError(f"--fail-on: unknown finding kind {k!r}.{did_you_mean(k, FINDING_KINDS)} "
                                 f"Known: {', '.join(FINDING_KINDS)}.")
    return set(kinds)


def _check_format(fmt: str) -> None:
    from .errors import did_you_mean
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
    from .report.checkpoint_report import report_checkpoint
    _check_format(args.format)
    fail = _fail_kinds(args.fail_on)
    rep = report_checkpoint(args.path, unsafe=args.unsafe_load, model_spec=args.model,
                            model_args=args.model_args, rnn_nonlinearity=args.rnn_nonlinearity,
                            num_heads=args.num_heads, seq_len=args.seq_len, batch=args.batch,
                            seed=args.seed, input_scale=args.input_scale, inputs=args.inputs,
                            probe_sites=not args.no_probe, threshold=args.threshold, k=args.k,
                            train_mode=args.train_mode)
    if args.require_sites and not rep.modules and not args.model:
        raise GradscopeError(f"{args.path}: no recurrent or attention weights found (--require-sites); "
                             f"the state dict holds {rep.checkpoint['num_tensors']} tensors of other modules.")
    _emit(rep.render(args.format), args.output)
    return _exit_for(rep.findings, fail)


def _show(args) -> int:
    from .analysis.diagnose import diagnose
    from .recording import load
    _check_format(args.format)
    fail = _fail_kinds(args.fail_on)
    diag = diagnose(load(args.path), threshold=args.threshold)
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
            from .demo import run_demo
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
