"""The one line the ``gradscope`` command prints for an error.

The library raises errors in its own terms (keyword arguments such as ``max_load_bytes=``) and
carries the facts a command line needs as attributes; this is where they meet the command line's
flags. Nothing here reads a message's text.
"""
from __future__ import annotations

from .._archive import fmt_bytes
from ..errors import (GradscopeError, InputsError, LoadLimitError, ModelSpecError, NotARecordingError,
                      PlainPickleError, UnsafeCheckpointError)

__all__ = ["one_line", "format_error", "flag_hint", "flag"]

#: ``report_checkpoint``'s settings whose flag is not the setting's name with dashes.
_FLAGS = {"model_spec": "--model"}


def flag(setting: str, value=None) -> str:
    """The flag of a library setting (and its value), as a checkpoint report's notes name it.

    Example:
        >>> flag("seq_len", 30), flag("max_probe_seconds"), flag("model_spec")
        ('--seq-len 30', '--max-probe-seconds', '--model')
    """
    name = _FLAGS.get(setting, "--" + setting.replace("_", "-"))
    return name if value is None else f"{name} {value}"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) squashed to one space."""
    return " ".join(text.split())


def flag_hint(exc: GradscopeError) -> str:
    """The command-line flag that addresses ``exc``, as a sentence; ``""`` when no flag does.

    Example:
        >>> flag_hint(LoadLimitError("too big", limit=1024))
        "On the command line: raise --max-load-bytes (now 1.0 KiB), or pass 'none' for no limit."
        >>> flag_hint(LoadLimitError("a zip bomb?", limit=1024, bomb=True))
        'On the command line: --max-load-bytes none.'
    """
    if isinstance(exc, LoadLimitError):
        if exc.bomb:
            return "On the command line: --max-load-bytes none."
        now = f" (now {fmt_bytes(exc.limit)})" if exc.limit is not None else ""
        return f"On the command line: raise --max-load-bytes{now}, or pass 'none' for no limit."
    if isinstance(exc, NotARecordingError) and exc.holds == "checkpoint":
        return "On the command line: gradscope report reads it."
    if isinstance(exc, NotARecordingError) and exc.holds == "torchscript":
        return "On the command line: gradscope report reads it with --unsafe-load (loading TorchScript runs its code)."
    if isinstance(exc, PlainPickleError):
        return "On the command line: --unsafe-load reads it with pickle.load (only for files you trust)."
    if isinstance(exc, InputsError):
        return "On the command line: --inputs FILE.pt." if exc.path is None else ""
    if isinstance(exc, UnsafeCheckpointError):
        if exc.loadable:
            return "On the command line: --unsafe-load (it runs code from the file; only for files you trust)."
        return "The command line cannot load it, not even with --unsafe-load."
    return ""


def _flag_prefix(exc: GradscopeError) -> str:
    """The option a message is about, put before it: ``"--model 'pkg:f': "``."""
    if isinstance(exc, ModelSpecError) and exc.spec is not None:
        return f"--model {exc.spec!r}: "
    return ""


def format_error(exc: GradscopeError) -> str:
    """The line printed after ``gradscope: error:`` for an error the library raised on purpose.

    Example:
        >>> format_error(UnsafeCheckpointError("refusing to load 'm.pt': it runs code;\\nre-save it."))
        "refusing to load 'm.pt': it runs code; re-save it. On the command line: --unsafe-load (it runs code from the file; only for files you trust)."
    """
    hint = flag_hint(exc)
    return one_line(f"{_flag_prefix(exc)}{exc}{' ' + hint if hint else ''}")
