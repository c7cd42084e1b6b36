"""Memory time of a keep gate: τ = −1/ln f, and of a gate bias: τ = −1/ln σ(b).

A gate that keeps a stored value with factor f ∈ (0, 1) each step (LSTM forget gate, GRU update
gate) shrinks it by f^k = exp(−k/τ) over k steps, τ = −1/ln f: the number of steps for a factor e.
With small weights the gate sits at σ(b), b its bias (SCIENCE.md, "LSTM constant error carousel").
Every memory time in gradscope (checkpoint rows, probe gate statistics, remedies) comes from here.

Plain Python at import (no torch, no numpy), so the remedy catalogue can use it without either.
"""
from __future__ import annotations

import math

__all__ = ["memory_time", "bias_of_memory_time", "memory_time_of_keep"]


def memory_time(bias):
    """τ = −1/ln σ(b): steps for a gate held at σ(b) to shrink a stored value by a factor e.

    ``ln σ(b) = −softplus(−b)``, computed stably in float64, so τ ≈ e^b for large b; τ = inf only
    once softplus(−b) underflows to 0 (b ≳ 745, or b = +inf).

    Args:
        bias: a float, or an array of biases (any shape).

    Returns:
        A float for a float (plain Python); a numpy array of the same shape for an array.

    Example:
        >>> [round(memory_time(b), 1) for b in (0.0, 1.0, 2.0, 3.0)]
        [1.4, 3.2, 7.9, 20.6]
    """
    if isinstance(bias, (int, float)):
        b = float(bias)
        if math.isnan(b):
            return math.nan
        # softplus(−b) = ln(1 + e^{−b}), without overflow for very negative b
        softplus = (-b + math.log1p(math.exp(b))) if b < 0 else math.log1p(math.exp(-b))
        return 1.0 / softplus if softplus > 0 else math.inf
    import numpy as np  # arrays only: the catalogue stays importable without numpy

    b = np.asarray(bias, dtype=np.float64)
    softplus = np.logaddexp(0.0, -b)
    with np.errstate(divide="ignore"):
        tau = np.where(softplus > 0, 1.0 / np.where(softplus > 0, softplus, 1.0), np.inf)
    return float(tau) if tau.ndim == 0 else tau


def bias_of_memory_time(tau: float) -> float:
    """The bias b with −1/ln σ(b) = τ (the inverse of :func:`memory_time`): b = −ln(exp(1/τ) − 1).

    Args:
        tau: a memory time in steps, > 0.

    Example:
        >>> round(memory_time(bias_of_memory_time(14.5)), 6)
        14.5
    """
    return -math.log(math.expm1(1.0 / tau))


def memory_time_of_keep(keep):
    """τ = −1/ln f of a mean keep-gate value f (inf once f ≥ 1, 0 once f ≤ 0).

    Args:
        keep: a float, or a tensor of gate values in (0, 1) (anything with a ``.log()`` method,
            e.g. a ``torch.Tensor``: the result stays on its device, in its dtype; clamp the values
            into (0, 1) first).

    Returns:
        A float for a float; a tensor of the same shape for a tensor.

    Example:
        >>> round(memory_time_of_keep(math.exp(-1 / 20)), 9)
        20.0
    """
    if isinstance(keep, (int, float)):
        f = float(keep)
        if math.isnan(f):
            return math.nan
        if f >= 1:
            return math.inf
        return -1.0 / math.log(f) if f > 0 else 0.0
    return -1.0 / keep.log()
