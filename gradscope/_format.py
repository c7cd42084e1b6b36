"""Small text helpers shared by every renderer: numbers, aligned tables, JSON-safe values.

Plain Python only (no torch; numpy values are recognised when numpy is loaded, never imported
here), so the remedy catalogue can use them without either. :func:`fmt` is gradscope's one number
formatter: reports, figures, the remedy catalogue and the trials all print numbers through it.
"""
from __future__ import annotations

import math
import numbers
import re
import sys
import textwrap
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["fmt", "text_table", "jsonable", "wrap", "wrap_lines", "remedy_index", "unique", "one_line", "WIDTH"]


def _np():
    """numpy if something has imported it (then values may be numpy scalars), else None."""
    return sys.modules.get("numpy")


def fmt(v: Any, digits: int = 3) -> str:
    """A number for people: ``—`` for None, ``∞``/``−∞``/``nan``, integers without decimals,
    scientific notation for very large or small magnitudes, else ``digits`` significant digits.

    Example:
        >>> [fmt(x) for x in (None, 12.0, 0.12345, 2.5e-5, 123456.7, float("inf"))]
        ['—', '12', '0.123', '2.50e-05', '1.23e+05', '∞']
    """
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    np = _np()
    if isinstance(v, bool) or (np is not None and isinstance(v, np.bool_)):
        return str(bool(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def text_table(head: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "",
               width: Any = None) -> List[str]:
    """Lines of a left-aligned plain-text table (columns two spaces apart).

    With ``width``, a last column that would run past it wraps under itself; when even the other
    columns do not fit, each row becomes ``head=value`` prose wrapped at ``width``.
    """
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    out = [indent + "  ".join(str(h).ljust(w) for h, w in zip(head, widths)).rstrip()]
    out += [indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if width is None or all(len(line) <= width for line in out):
        return out
    start = len(indent) + sum(w + 2 for w in widths[:-1])
    if width - start < 16:  # the fixed columns alone nearly fill the line
        return [line for r in rows for line in wrap(", ".join(f"{h}={c}" for h, c in zip(head, r)), indent,
                                                       "    ", width)]
    out = []
    for r in [list(head)] + [list(x) for x in rows]:
        first = indent + "  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths[:-1])) + "  "
        last = textwrap.wrap(str(r[-1]), width=width - start, break_on_hyphens=False) or [""]
        out.append((first + last[0]).rstrip())
        out += [(" " * start + x).rstrip() for x in last[1:]]
    return out


def jsonable(x: Any) -> Any:
    """JSON-safe copy: numpy scalars become Python numbers, tuples lists, and non-finite floats
    the strings ``'inf'``, ``'-inf'``, ``'nan'`` (strict JSON has no infinities)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    np = _np()
    if np is not None and isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


#: the widest line of a text report, and of the prose of a markdown one
WIDTH = 100


def wrap(text: str, indent: str = "", hang: str = "    ", width: int = WIDTH) -> List[str]:
    """Prose as lines of at most ``width`` characters: the first indented by ``indent``, the rest
    by ``indent + hang``. Words longer than a line are broken (a report never runs wider)."""
    lines = textwrap.wrap(str(text), width=width, initial_indent=indent, subsequent_indent=indent + hang,
                          break_on_hyphens=False, break_long_words=True)
    return lines or [indent.rstrip()]


def wrap_lines(lines: Sequence[str], width: int = WIDTH) -> List[str]:
    """Each line wrapped at ``width``, continuing under its own indentation (+2 after a ``- ``
    bullet, else +4). For prose only: code must never pass through here."""
    out: List[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        body = line.lstrip(" ")
        indent = line[:len(line) - len(body)]
        out += wrap(body, indent, "  " if body.startswith(("- ", "* ")) else "    ", width)
    return out


def _get(r: Any, key: str, default: Any = "") -> Any:
    return r.get(key, default) if isinstance(r, dict) else getattr(r, key, default)


def remedy_index(findings: Sequence[Any]) -> Tuple[List[Dict[str, Any]], List[List[int]]]:
    """Each remedy of a report once, and, per finding, the numbers of the remedies it points to.

    Two remedies are one when their name and code are the same (the same snippet proposed by
    several findings, or for several sites). Entries are numbered from 1 in order of first
    appearance (findings come most severe first, remedies best first), and keep each distinct
    ``why`` with the site it was written for.

    Returns:
        ``(entries, refs)``: ``entries`` dicts with ``id``, ``name``, ``title``, ``code``,
        ``reference``, ``testable``, ``sites`` and ``why`` (a list of ``{"site", "why"}``);
        ``refs[i]`` the ids, in order, of the remedies of ``findings[i]``.

    Example:
        >>> class F:
        ...     site, remedies = "l0", [{"name": "clip", "title": "Clip", "code": "clip()", "why": "w"}]
        >>> entries, refs = remedy_index([F(), F()])
        >>> len(entries), refs
        (1, [[1], [1]])
    """
    entries: List[Dict[str, Any]] = []
    by_key: Dict[Tuple[str, ...], Dict[str, Any]] = {}
    refs: List[List[int]] = []
    for f in findings:
        ids: List[int] = []
        for r in getattr(f, "remedies", None) or []:
            name = str(_get(r, "name", "") or "")
            title = str(_get(r, "title", "") or name or r)
            code = str(_get(r, "code", "") or "")
            key = (name, code) if code else (name, title, str(f.site))
            e = by_key.get(key)
            if e is None:
                e = {"id": len(entries) + 1, "name": name, "title": title, "code": code,
                     "reference": str(_get(r, "reference", "") or ""), "testable": bool(_get(r, "testable", False)),
                     "sites": [], "why": []}
                by_key[key] = e
                entries.append(e)
            if f.site not in e["sites"]:
                e["sites"].append(f.site)
            why = str(_get(r, "why", "") or "")
            if why and all(w["why"] != why for w in e["why"]):
                e["why"].append({"site": f.site, "why": why})
            if e["id"] not in ids:
                ids.append(e["id"])
        refs.append(ids)
    return entries, refs


def unique(items: Sequence[str]) -> List[str]:
    """``items`` without repeats, in order (the one list of notes every format renders)."""
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def one_line(text: str, limit: int = 160) -> str:
    """Squash whitespace (newlines, tabs, ANSI colour codes) and cap the length."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
