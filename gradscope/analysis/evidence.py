"""The regime rule: a pure function of evidence numbers, used everywhere.

:func:`regime` is the one rule that names a site's regime (vanishing / exploding / stable) from
the numbers :func:`gradscope.diagnose` collects; :func:`gradscope.diagnose`, the remedy catalogue
(:func:`~gradscope.analysis.remedies.folklore_verdicts`) and the remedy trials all go through it.
The memory time τ = −1/ln σ(b) of a gate is :func:`gradscope.estimators.gates.memory_time`.

Plain Python only (no torch, no numpy at import), so the remedy catalogue can use it anywhere.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Tuple

__all__ = ["regime", "HORIZON_THRESHOLD", "LYAPUNOV_MARGIN", "LYAPUNOV_MIN_GROWTH"]

#: The norm ratio that ends the gradient horizon: the first lag where ‖∂h_T/∂h_{T−k}‖ (or the
#: gradient-norm profile relative to its peak) falls below it. Growth past its inverse within the
#: sequence is "exploding" (SCIENCE/DESIGN: "default 1e-3").
HORIZON_THRESHOLD = 1e-3

#: λ₁ (per step, natural log) must be further than this from 0 to count as clearly positive or
#: negative: exponents within ±0.01 are the edge of chaos, where finite-sample noise decides the sign.
LYAPUNOV_MARGIN = 0.01

#: A positive λ₁ counts as exploding only when it grows perturbations by more than this factor over
#: the sequence (λ₁·T > ln 10): a slightly positive exponent on a short sequence does no harm.
LYAPUNOV_MIN_GROWTH = 10.0


def _value(ev: Mapping[str, Any], key: str, default: float) -> float:
    """``ev[key]`` as a float; ``default`` when missing, None, NaN or not a number."""
    v = ev.get(key) if ev else None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(v) else v


def regime(evidence: Mapping[str, Any], *, threshold: float = HORIZON_THRESHOLD,
           lyapunov_margin: float = LYAPUNOV_MARGIN) -> Tuple[str, str]:
    """``(regime, reason)`` of one site from its evidence numbers — the one regime rule.

    Keys read (any may be missing or NaN): ``seq_len`` T, ``explosion_lag``, ``horizon`` and
    ``lambda1`` (λ₁ per step). In this order:

    1. **exploding** — growth passes 1/``threshold`` within the sequence (``explosion_lag`` ≤ T);
    2. **exploding** — λ₁ > ``lyapunov_margin`` and λ₁·T > ln :data:`LYAPUNOV_MIN_GROWTH`
       (an unknown T counts as long enough);
    3. **vanishing** — the measured gradient horizon is shorter than the sequence (``horizon`` < T);
    4. **vanishing** — no horizon was measured, but λ₁ < −``lyapunov_margin`` puts the estimated
       horizon ln(1/``threshold``)/|λ₁| (‖∂h_T/∂h_t‖ ≈ exp(λ₁ (T−t))) inside the sequence (or T is
       unknown);
    5. **stable** — otherwise.

    Args:
        evidence: the site's evidence (as in :attr:`Diagnosis.site_summary`'s ``evidence``).
        threshold: the horizon threshold, in (0, 1).
        lyapunov_margin: how far from 0 λ₁ must be to count, per step.

    Example:
        >>> regime({"seq_len": 100, "horizon": 12.0})
        ('vanishing', 'gradient horizon shorter than the sequence')
        >>> regime({"seq_len": 100, "lambda1": -0.8})[0], regime({"seq_len": 100, "lambda1": 0.5})[0]
        ('vanishing', 'exploding')
        >>> regime({"seq_len": 100, "horizon": math.inf, "lambda1": 0.001})[0]
        'stable'
    """
    T = _value(evidence, "seq_len", math.nan)
    lam = _value(evidence, "lambda1", math.nan)
    hor = _value(evidence, "horizon", math.nan)
    if _value(evidence, "explosion_lag", math.inf) <= T:
        return "exploding", "growth passes 1/threshold within the sequence"
    T_lam = T if math.isfinite(T) else math.inf  # λ₁ needs T only to rule short sequences out
    if math.isfinite(lam) and lam > lyapunov_margin and lam * T_lam > math.log(LYAPUNOV_MIN_GROWTH):
        return "exploding", "top Lyapunov exponent clearly positive"
    if hor < T:
        return "vanishing", "gradient horizon shorter than the sequence"
    if math.isnan(hor) and math.isfinite(lam) and lam < -lyapunov_margin \
            and math.log(1.0 / threshold) / abs(lam) < T_lam:
        return "vanishing", "top Lyapunov exponent puts the gradient horizon ln(1/threshold)/|λ₁| inside the sequence"
    return "stable", "horizon covers the sequence and no growth"

