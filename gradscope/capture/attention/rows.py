"""From the values attention capture collected to measures: one row per step, arrays per run.

Index letters: S recorded steps, L blocks of a stack, P positions, H heads.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

from .layout import AttentionLayout, Block

__all__ = ["finalize_row", "recording_measures"]


def finalize_row(items: Iterable[Tuple[Tuple[str, str, str, str], Any]],
                 grads: Dict[Tuple[str, str], np.ndarray]) -> Dict[Tuple[str, str], Any]:
    """Turn one step's collected attention values into measures.

    Values of one key are added up over calls and passes; a ``"sum"`` is divided by its ``"cnt"``
    (NaN where the count is 0), an ``"avg"`` by the number of values. A measure of a secondary
    attention module ``rel`` of a block is named ``name[rel]``.

    Args:
        items: ``((site, rel, name, mode), value)`` pairs as the collector copied them to the host
            (:class:`~gradscope.capture.collector.AttentionKey`; mode ``"sum"``, ``"cnt"`` or
            ``"avg"``); name ``"valid"`` holds, per position, the number of samples not padded there.
        grads: ``{(site, "h"): [P]}`` depth-flow norms of the step; positions that are padding in every
            sample become NaN (updated in place).

    Returns:
        ``{(site, measure): value}`` (a float, or an array per head), plus ``(site,
        "padding_positions")`` where some positions are padding in every sample.
    """
    acc: Dict[Tuple[str, str, str, str], Any] = {}
    navg: Dict[Tuple, int] = {}
    for key, v in items:
        site, rel, name, mode = key
        k = (site, rel, name, mode)
        v = np.asarray(v, dtype=np.float64)
        if k in acc and acc[k].shape == v.shape:
            acc[k] = acc[k] + v
        else:
            acc[k] = v.copy()
        navg[k] = navg.get(k, 0) + 1
    row: Dict[Tuple[str, str], Any] = {}
    for (site, rel, name, mode), v in acc.items():
        mname = name if not rel else f"{name}[{rel}]"
        if mode == "sum":
            if name == "valid":
                continue
            c = acc.get((site, rel, name, "cnt"))
            if c is None:
                continue
            with np.errstate(invalid="ignore", divide="ignore"):
                row[(site, mname)] = np.where(c > 0, v / np.where(c > 0, c, 1), np.nan)
        elif mode == "avg":
            row[(site, mname)] = v / navg[(site, rel, name, mode)]
    for (site, rel, name, mode), v in acc.items():
        if name == "valid":
            g = grads.get((site, "h"))
            if g is not None and len(g):
                n = min(len(g), len(v))
                g = g.copy()
                g[:n][v[:n] <= 0] = np.nan
                grads[(site, "h")] = g
                if np.any(v[:n] <= 0):
                    row[(site, "padding_positions")] = np.asarray(float(np.sum(v[:n] <= 0)))
    for k, v in row.items():
        if np.ndim(v) == 0:
            row[k] = float(v)
    return row

def recording_measures(layout: AttentionLayout, wanted_blocks: Dict[str, Block], rows: List[Dict[str, Any]],
                       grads: Dict[Tuple[str, str], np.ndarray]) -> Dict[Tuple[str, str], np.ndarray]:
    """The Recording's attention arrays from the recorded rows.

    Args:
        layout: the model's attention layout.
        wanted_blocks: the watched blocks, by block name.
        rows: one dict per recorded step; ``row["attn"]`` is what :func:`finalize_row` returned.
        grads: ``{(site, "h"): [S, P]}`` depth-flow norms of the recorded steps.

    Returns:
        ``{(site, measure): [S]`` or ``[S, H]}`` (NaN where a step lacks it), plus
        ``(stack, "depth_grad_norms")`` ``[S, L, P]`` for every stack with a watched block.
    """
    keys: Dict[Tuple[str, str], int] = {}
    for r in rows:
        for k, v in (r.get("attn") or {}).items():
            keys[k] = max(keys.get(k, 0), int(np.size(v)) if np.ndim(v) else 0)
    out: Dict[Tuple[str, str], np.ndarray] = {}
    S = len(rows)
    for k, width in keys.items():
        if k[1] == "padding_positions":
            continue
        a = np.full((S, width) if width else (S,), np.nan)
        for i, r in enumerate(rows):
            v = (r.get("attn") or {}).get(k)
            if v is None:
                continue
            if width:
                v = np.ravel(v)
                a[i, :len(v)] = v
            else:
                a[i] = float(v)
        out[k] = a
    for stack, names in layout.stacks.items():
        blks = [layout.blocks[b] for b in names if b in wanted_blocks]
        if not blks:
            continue
        arrs = [grads.get((b.site, "h"), np.zeros((S, 0))) for b in blks]
        P = max((a.shape[1] for a in arrs), default=0)
        d = np.full((S, len(arrs), P), np.nan)
        for i, a in enumerate(arrs):
            d[:, i, :a.shape[1]] = a
        out[(stack, "depth_grad_norms")] = d
    return out
