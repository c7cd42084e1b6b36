"""Shared helpers of the renderers: figures, site lists, log scales with bad values, messages.

Nothing here computes a measure: the helpers take what a Recording holds and prepare it for
drawing (logarithms, masks for zeros / NaN / inf, medians and ranges over samples).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._format import fmt  # the one number formatter; plots use it as C.fmt
from ..analysis.diagnose import Diagnosis
from ..errors import GradscopeError, MissingMeasureError
from ..recording import Recording

# Colours of values a log scale cannot show. Chosen outside viridis (purple → yellow).
BAD_COLORS = {
    "zero": "#9e9e9e",        # exactly zero: underflow, or no gradient reached it
    "nonfinite": "#e0115f",   # NaN or ±inf inside the sequence
    "notrun": "#f2f2f2",      # position beyond this step's sequence length (NaN padding)
}
BAD_LABELS = {
    "zero": "zero (underflow / no gradient)",
    "nonfinite": "NaN or inf",
    "notrun": "not run (shorter sequence)",
}
REGIME_COLORS = {"vanishing": "#1f77b4", "exploding": "#d62728", "stable": "#2ca02c", "inconclusive": "#7f7f7f"}

PROBE_HINT = ("Record it with gradscope.probe(model, batch), or during training with "
              "gradscope.watch(model, probe_every=N).")


def pyplot():
    """matplotlib.pyplot, imported on first use (importing gradscope.plot picks no backend)."""
    import matplotlib.pyplot as plt

    return plt


def new_figure(figsize: Tuple[float, float]):
    """A constrained-layout pyplot Figure (so notebooks show it)."""
    return pyplot().figure(figsize=figsize, layout="constrained")


def new_axes(ax, figsize: Tuple[float, float]):
    """``ax`` itself, or the single Axes of a new pyplot figure."""
    if ax is not None:
        return ax
    return new_figure(figsize).add_subplot()


def check_recording(rec, what: str) -> None:
    """Refuse anything that is not a Recording."""
    if not isinstance(rec, Recording):
        raise GradscopeError(f"{what} expects a gradscope Recording (scope.recording or gradscope.probe(...)), "
                             f"got {type(rec).__name__}.")


ARRAY_SITE = "array"

# what a plain array stands for, per function: (measure name or "grads"/"params", expected ndim)
_ARRAY_AS = {
    "gradient_heatmap": ("grads", (2,), "[S, T] gradient norms (training step × time step)"),
    "jacobian_decay": ("jacobian_norms", (1, 2), "[T+1] or [B, T+1] Jacobian norms by lag"),
    "lyapunov_spectrum": ("lyapunov", (1, 2), "[k] or [B, k] Lyapunov exponents"),
    "hidden_spectrum": ("hidden_sv", (1,), "[K] singular values"),
    "depth_heatmap": ("depth_grad_norms", (2, 3), "[L, T] or [S, L, T] gradient norms by layer and position"),
    "param_flow": ("params", (), "{name: [S]} parameter gradient norms"),
    "param_norms": ("params", (), "{name: [S]} parameter gradient norms"),
}


def as_recording(obj, what: str):
    """A Recording as it is, or a plain array (ndarray, list, Tensor) wrapped as a one-site Recording.

    The site of a wrapped array is named ``"array"`` (a forward site); no fit, horizon or other
    metadata comes with it, so only the array itself is drawn. ``param_flow`` takes a mapping
    ``{name: [S]}`` instead.
    """
    if isinstance(obj, Recording):
        return obj
    kind, ndims, shape = _ARRAY_AS[what]
    if kind == "params":
        if isinstance(obj, dict) and obj:
            vals = {str(k): _to_numpy(v, what).ravel() for k, v in obj.items()}
            S = {len(v) for v in vals.values()}
            if len(S) == 1:
                n = S.pop()
                return Recording(sites={}, steps=range(n), grads={}, seq_lens={}, params=vals)
        raise GradscopeError(f"{what} expects a gradscope Recording or a non-empty dict {shape} with one length S, "
                             f"got {type(obj).__name__}.")
    a = _to_numpy(obj, what)
    if a.ndim not in ndims:
        raise GradscopeError(f"{what} expects a gradscope Recording or an array {shape}, got an array of "
                             f"shape {list(a.shape)}.")
    site = {ARRAY_SITE: {"kind": "array", "module": "", "states": ["h"], "layer": None, "direction": "forward"}}
    if kind == "grads":
        S, T = a.shape
        return Recording(sites=site, steps=range(S), grads={(ARRAY_SITE, "h"): a},
                         seq_lens={ARRAY_SITE: [T] * S}, params={}, meta={"source": "array"})
    if kind in ("jacobian_norms", "lyapunov") and a.ndim == 1:
        a = a[None, :]
    return Recording(sites=site, steps=[], grads={}, seq_lens={}, params={}, measures={(ARRAY_SITE, kind): a},
                     meta={"source": "array"})


def _to_numpy(obj, what: str) -> np.ndarray:
    if hasattr(obj, "detach"):  # a torch Tensor; torch itself is not imported here
        obj = obj.detach().cpu().double().numpy()
    try:
        a = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError):
        raise GradscopeError(f"{what} expects a gradscope Recording (scope.recording or gradscope.probe(...)) "
                             f"or a numeric array, got {type(obj).__name__}.") from None
    return a


def recording_of(obj, what: str):
    """The Recording of a Recording or a Diagnosis (``diag.recording``)."""
    if isinstance(obj, Diagnosis):
        if obj.recording is None:
            raise GradscopeError(f"{what}: this Diagnosis carries no Recording (diag.recording is None); "
                                 f"pass the Recording it was made from.")
        return obj.recording
    check_recording(obj, what)
    return obj


def sites_of(rec, site: Optional[str], what: str) -> List[str]:
    """``[site]`` (checked by the Recording, which suggests a close name) or every site."""
    if site is not None:
        return [rec._check_site(site)]
    if not rec.sites:
        raise GradscopeError(f"{what}: the recording has no sites (no recurrent or attention module was "
                             f"found in the model), so there is nothing to draw per site.")
    return list(rec.sites)


def sites_with(rec, sites: Sequence[str], measure: str, what: str, explicit: bool) -> List[str]:
    """The sites that hold ``measure``; MissingMeasureError when none does.

    With one explicitly named site the Recording's own error is raised (it lists what that site has).
    """
    if explicit:
        rec.measure(sites[0], measure)  # raises MissingMeasureError naming the measure
        return list(sites)
    have = [s for s in sites if rec.has_measure(s, measure)]
    if not have:
        src = rec.meta.get("source", "?")
        raise MissingMeasureError(
            f"{what} needs the measure {measure!r}, which no site of this recording has "
            f"(source: {src}; watch() records only gradient norms unless probe_every is set). {PROBE_HINT}")
    return have


def direction_of(rec, site: str) -> str:
    """``"forward"`` or ``"reverse"`` (user cells count as forward)."""
    return "reverse" if rec.site_info(site).get("direction") == "reverse" else "forward"


def travel_text(direction: str) -> str:
    """How the gradient travels along t for a site of this direction."""
    if direction == "reverse":
        return "gradient travels forward in t →"
    return "← gradient travels backward in t"


def classify(a: np.ndarray, valid: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Boolean masks of the cells a log scale cannot show.

    Args:
        a: the values.
        valid: where the value belongs to the data (False: padding beyond a shorter sequence).

    Returns:
        ``{"ok", "zero", "nonfinite", "notrun"}`` masks of the shape of ``a``; ``ok`` is finite and > 0.
        Negative values (a norm never is) count as non-finite, so they are marked, not hidden.
    """
    a = np.asarray(a, dtype=np.float64)
    if valid is None:
        valid = np.ones(a.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(a) & (a > 0) & valid
        zero = (a == 0) & valid
    nonfinite = valid & ~ok & ~zero
    return {"ok": ok, "zero": zero, "nonfinite": nonfinite, "notrun": ~valid}


def safe_log10(a: np.ndarray, ok: np.ndarray) -> np.ma.MaskedArray:
    """log10 of ``a`` where ``ok``, masked elsewhere (no warnings for 0, NaN, inf)."""
    a = np.asarray(a, dtype=np.float64)
    out = np.zeros(a.shape)
    np.log10(a, out=out, where=ok)
    return np.ma.masked_array(out, mask=~ok)


def decade_limits(values: np.ndarray) -> Tuple[float, float]:
    """(vmin, vmax) of finite log10 values, widened when they are all equal."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return -1.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def bad_legend(ax, present: Sequence[str], *, loc="upper left", anchor=(0.0, -0.16)) -> None:
    """A small legend below ``ax`` naming the colours of the marked cells that occur."""
    from matplotlib.patches import Patch

    if not present:
        return
    handles = [Patch(facecolor=BAD_COLORS[k], edgecolor="0.4", linewidth=0.5, label=BAD_LABELS[k]) for k in present]
    ax.legend(handles=handles, loc=loc, bbox_to_anchor=anchor, ncols=len(handles), fontsize=7,
              frameon=False, handlelength=1.2, borderaxespad=0.0, columnspacing=1.0)


def message(ax, text: str, **kw) -> None:
    """Write a plain message in the middle of ``ax`` (for panels without data); no mathtext."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9,
            color="0.35", wrap=True, parse_math=False, **kw)


def log_quantiles(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max over axis 0 of positive finite values, and how many were usable.

    The median is taken of the logarithms (a typical sample, as :func:`~gradscope.estimators.decay_rate`
    does). Columns without a usable value give NaN — without numpy's all-NaN warnings.

    Args:
        a: ``[B, K]`` norms.

    Returns:
        ``(median, lo, hi, count)``, each ``[K]``.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    m = classify(a)["ok"]
    cnt = m.sum(axis=0)
    med = np.full(a.shape[1], np.nan)
    lo = np.full(a.shape[1], np.nan)
    hi = np.full(a.shape[1], np.nan)
    for j in np.flatnonzero(cnt):
        col = a[m[:, j], j]
        med[j] = math.exp(float(np.median(np.log(col))))
        lo[j] = float(col.min())
        hi[j] = float(col.max())
    return med, lo, hi, cnt


def finite_quantiles(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max over axis 0 of finite values (NaN where a column has none), no warnings."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    fin = np.isfinite(a)
    med = np.full(a.shape[1], np.nan)
    lo = np.full(a.shape[1], np.nan)
    hi = np.full(a.shape[1], np.nan)
    for j in np.flatnonzero(fin.any(axis=0)):
        col = a[fin[:, j], j]
        med[j], lo[j], hi[j] = float(np.median(col)), float(col.min()), float(col.max())
    return med, lo, hi




def decade_ticks(axis, lo: float, hi: float) -> None:
    """On a log ``axis`` spanning many decades, major ticks every 1, 2, 5, 10, … decades (≤ 8 ticks).

    Matplotlib's own choice on a 300-decade axis lands on odd exponents (10⁻³⁷, 10⁻⁷⁴); this keeps
    round ones. Spans up to 8 decades keep matplotlib's ticks.
    """
    from matplotlib.ticker import FixedLocator, LogFormatterMathtext, NullLocator

    if not (lo > 0 and hi > lo and math.isfinite(lo) and math.isfinite(hi)):
        return
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    span = e1 - e0
    if span <= 8:
        return
    step = next((s for s in (2, 3, 5, 10, 20, 25, 50, 100) if span / s <= 7), 100)
    ticks = [10.0 ** e for e in range(math.ceil(e0 / step) * step, e1 + 1, step)]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(LogFormatterMathtext())
    axis.set_minor_locator(NullLocator())
