"""The ``gradscope`` subcommands: each takes the parsed arguments and returns the exit status.

The library does the work and raises; nothing here computes. Heavy modules (torch, the report) are
imported when a command runs, so ``gradscope --help`` and usage errors answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Set

from ..errors import GradscopeError
from .args import check_format, check_numbers, fail_kinds, parse_size
from .messages import flag, one_line

__all__ = ["COMMANDS", "demo", "report", "show"]


def demo(args: argparse.Namespace) -> int:
    """``gradscope demo``: the built-in demo (an Elman RNN and an LSTM on the recall task)."""
    from ..demo import run_demo
    check_numbers(args)
    return run_demo(out=args.out, seq_len=args.seq_len, steps=args.steps, seed=args.seed)


def _emit(text: str, output: Optional[Path]) -> None:
    """Write ``text`` to stdout, or to ``output`` with a line on stderr saying so."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as e:
        raise GradscopeError(f"cannot write {str(output)!r}: {e.strerror}.") from None
    print(f"gradscope: wrote {output}", file=sys.stderr)


def _exit_for(findings, fail: Set[str]) -> int:
    """Exit status 1 (with a line on stderr) when a finding is of a ``--fail-on`` kind, else 0."""
    hit = sorted({f.kind for f in findings if f.kind in fail})
    if hit:
        print(f"gradscope: failing on {', '.join(hit)} (--fail-on)", file=sys.stderr)
        return 1
    return 0


def report(args: argparse.Namespace) -> int:
    """``gradscope report PATH``: a checkpoint loaded, analysed, probed and rendered."""
    from ..checkpoint.report import report_checkpoint
    check_format(args.format)
    fail = fail_kinds(args.fail_on)
    check_numbers(args)
    limit = parse_size(args.max_load_bytes)
    rep = report_checkpoint(args.path, unsafe=args.unsafe_load, model_spec=args.model,
                            model_args=args.model_args, rnn_nonlinearity=args.rnn_nonlinearity,
                            num_heads=args.num_heads, seq_len=args.seq_len, batch=args.batch,
                            seed=args.seed, input_scale=args.input_scale, inputs=args.inputs,
                            probe_sites=not args.no_probe, threshold=args.threshold, k=args.k,
                            max_load_bytes=limit, max_probe_seconds=args.max_probe_seconds or None,
                            train_mode=args.train_mode)
    rep = dataclasses.replace(rep, setting_name=flag)  # its notes advise this command's flags
    if args.require_sites and not rep.modules and not args.model:
        raise GradscopeError(f"{args.path}: no recurrent or attention weights found (--require-sites); "
                             f"the state dict holds {rep.checkpoint['num_tensors']} tensors of other modules.")
    _emit(rep.render(args.format), args.output)
    return _exit_for(rep.findings, fail)


def show(args: argparse.Namespace) -> int:
    """``gradscope show PATH``: a saved Recording diagnosed and rendered."""
    from ..analysis.diagnose import diagnose
    from ..recording import load
    check_format(args.format)
    fail = fail_kinds(args.fail_on)
    check_numbers(args)
    rec = load(args.path, max_load_bytes=parse_size(args.max_load_bytes))
    try:
        diag = diagnose(rec, threshold=args.threshold)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # load() checked the schema it knows; deeper probe metadata that breaks diagnose is the file's fault
        raise GradscopeError(f"{str(args.path)!r} loaded, but its contents do not fit a gradscope recording "
                             f"({type(e).__name__}: {one_line(str(e))[:120]}); the file is malformed: "
                             f"re-save it with Recording.save().") from None
    text = {"text": lambda: str(diag), "markdown": diag.to_markdown, "json": lambda: diag.to_json() + "\n",
            "html": diag.to_html}[args.format]()
    _emit(text, args.output)
    return _exit_for(diag.findings, fail)


#: Subcommand name → its function.
COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {"demo": demo, "report": report, "show": show}
