"""Decay rate and gradient horizon of a norm-versus-lag curve.

Index letters: B batch, T sequence length, k lag.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from scipy import stats

from ..errors import GradscopeError, NonFiniteWarning, ShapeError

__all__ = ["DecayFit", "decay_rate"]

# siegelslopes builds an n×n matrix of pairwise slopes; above this many points the curve is
# thinned to evenly spaced lags (the fit is robust, so this changes the slope very little).
_MAX_FIT_POINTS = 2000


@dataclass(frozen=True)
class DecayFit:
    """A robust straight-line fit of ln‖·‖ against lag, and where the curve crosses thresholds.

    Attributes:
        rate: Slope of ln-norm per lag step (natural log): negative = decaying, positive = growing.
            Per-step factor exp(rate).
        horizon: First lag k ≥ 1 at which the norm is below ``threshold`` (``math.inf`` if never
            within the curve).
        explosion_lag: First lag k ≥ 1 at which the norm exceeds 1/``threshold`` (``math.inf``
            if never).
        intercept: ln-norm of the fitted line at lag 0.
        n_used: Number of lags that entered the fit (finite, non-zero entries).
        threshold: The threshold used.
    """

    rate: float
    horizon: Union[int, float]
    explosion_lag: Union[int, float]
    intercept: float
    n_used: int
    threshold: float

    @property
    def time_constant(self) -> float:
        """−1/rate: lags per factor e of decay (``math.inf`` when not decaying)."""
        return -1.0 / self.rate if self.rate < 0 else math.inf


def decay_rate(norms, *, threshold: float = 1e-3, log: bool = False) -> DecayFit:
    """Fit ln‖∂h_T/∂h_{T−k}‖ ≈ intercept + rate·k robustly and find the gradient horizon.

    The fit is Siegel's repeated-median line (``scipy.stats.siegelslopes``; it tolerates up to
    half the points being outliers, e.g. a transient at short lags or a NaN stretch), on the lags
    whose entry is finite and non-zero. Zeros still count as "below threshold" for the horizon.

    With a batch ``[B, T+1]`` the samples are combined, lag by lag, by the **median of their
    ln-norms** (NaN entries left out): a typical sample's curve, not dominated by one exploding
    sample as a mean of norms would be.

    Args:
        norms: ``[T+1]`` or ``[B, T+1]`` (ndarray or Tensor), entry k the norm at lag k, as
            returned by :func:`jacobian_norms`; natural-log norms if ``log=True``.
        threshold: In (0, 1): the horizon is where the norm falls below it, the explosion lag where
            it rises above 1/threshold.
        log: ``norms`` holds natural logs (use this below 1e-308).

    Returns:
        :class:`DecayFit`. ``rate``/``intercept`` are NaN, with a
        :class:`~gradscope.errors.NonFiniteWarning`, when fewer than two lags are usable.

    Raises:
        ShapeError: ``norms`` is not 1-D or 2-D, has fewer than two lags, or holds negative norms.
        GradscopeError: ``threshold`` not in (0, 1).

    Example:
        >>> fit = decay_rate(0.5 ** np.arange(20))
        >>> round(fit.rate, 6), fit.horizon
        (-0.693147, 10)
    """
    if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
        raise GradscopeError(f"decay_rate: threshold must be in (0, 1), got {threshold!r}.")
    a = norms.detach().cpu().double().numpy() if isinstance(norms, torch.Tensor) else np.asarray(norms)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ShapeError(f"decay_rate: norms must be numeric, got dtype {a.dtype}.")
    a = a.astype(np.float64)
    if a.ndim not in (1, 2) or a.shape[-1] < 2:
        raise ShapeError(f"decay_rate: norms must be [T+1] or [B, T+1] with T+1 >= 2 lags, got "
                         f"shape {list(a.shape)}.")
    if log:
        ln = a
    else:
        if (a < 0).any():
            raise ShapeError("decay_rate: norms must be non-negative; pass log=True for log-norms.")
        with np.errstate(divide="ignore"):
            ln = np.log(a)                                   # 0 -> -inf, NaN stays NaN
    if ln.ndim == 2:
        ln = _median_over_batch(ln)

    lags = np.arange(ln.shape[0], dtype=np.float64)
    ok = np.isfinite(ln)
    x, y = lags[ok], ln[ok]
    n_used = int(ok.sum())
    if n_used > _MAX_FIT_POINTS:
        pick = np.unique(np.linspace(0, n_used - 1, _MAX_FIT_POINTS).round().astype(int))
        x, y = x[pick], y[pick]
        n_used = len(pick)
    if n_used >= 2:
        res = stats.siegelslopes(y, x)
        rate, intercept = float(res.slope), float(res.intercept)
    else:
        warnings.warn(f"decay_rate: only {n_used} lag(s) with a finite, non-zero norm; rate and "
                      f"intercept are NaN.", NonFiniteWarning, stacklevel=2)
        rate = intercept = float("nan")

    lt = math.log(threshold)
    k = np.arange(ln.shape[0])
    below = np.nonzero((ln < lt) & (k >= 1))[0]              # NaN compares False: skipped
    above = np.nonzero((ln > -lt) & (k >= 1))[0]
    horizon = int(below[0]) if len(below) else math.inf
    explosion = int(above[0]) if len(above) else math.inf
    return DecayFit(rate=rate, horizon=horizon, explosion_lag=explosion, intercept=intercept,
                    n_used=n_used, threshold=float(threshold))


def _median_over_batch(ln: np.ndarray) -> np.ndarray:
    """Median over axis 0 of ``[B, K]`` ignoring NaN (−inf, a zero norm, is a valid value)."""
    with np.errstate(invalid="ignore"):  # -inf and +inf in one column: the median is NaN
        if not np.isnan(ln).any():
            return np.median(ln, axis=0)
        out = np.full(ln.shape[1], np.nan)
        for j in range(ln.shape[1]):
            col = ln[:, j]
            col = col[~np.isnan(col)]
            if col.size:
                out[j] = np.median(col)
    return out
