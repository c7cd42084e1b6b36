"""Small text helpers shared by every renderer: numbers, aligned tables, JSON-safe values.

Plain Python and numpy only (no torch), so the remedy catalogue and reports can use them.
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence

import numpy as np

__all__ = ["fmt", "text_table", "jsonable"]


def fmt(v: Any, digits: int = 3) -> str:
    """A number for people: ``—`` for None, ``∞``/``−∞``/``nan``, integers without decimals,
    scientific notation for very large or small magnitudes, else ``digits`` significant digits."""
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
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


def text_table(head: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> List[str]:
    """Lines of a left-aligned plain-text table (columns two spaces apart)."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    out = [indent + "  ".join(str(h).ljust(w) for h, w in zip(head, widths)).rstrip()]
    out += [indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return out


def jsonable(x: Any) -> Any:
    """JSON-safe copy: numpy scalars become Python numbers, tuples lists, and non-finite floats
    the strings ``'inf'``, ``'-inf'``, ``'nan'`` (strict JSON has no infinities)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x
