"""The one line the ``gradscope`` command prints for an error.

The library raises errors in its own terms (keyword arguments such as ``max_load_bytes=``); this is
where they meet the command line.
"""
from __future__ import annotations

from ..errors import GradscopeError

__all__ = ["one_line", "format_error"]


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) squashed to one space."""
    return " ".join(text.split())


def format_error(exc: GradscopeError) -> str:
    """The line printed after ``gradscope: error:`` for an error the library raised on purpose."""
    return one_line(str(exc))
